"""Copy weights between two implementations of one architecture, and say what did not fit.

The step every from-scratch GPT-2 needs (nanoGPT's ``from_pretrained`` does it by hand): keys
are aligned by name (through ``map`` globs when the names differ), Hugging Face's ``Conv1D``
weights, stored ``(in, out)``, are transposed for ``nn.Linear``'s ``(out, in)``, and a fused
``c_attn`` can be split into ``q/k/v`` parts. Missing, unexpected and shape-mismatched keys are
reported together in one table, and then nothing is copied: never a half-loaded model.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeAlias

import torch
import torch.nn as nn
from rich.console import Console, ConsoleOptions, RenderableType
from rich.table import Table
from rich.text import Text

from torchlens_edu._core.console import render_html, render_text
from torchlens_edu._core.modules import require_module
from torchlens_edu.divergence.align import PathMap, map_argument, translate

# True/False for every 2-D weight, "auto" (Hugging Face Conv1D), or key globs
Transpose: TypeAlias = "bool | str | Sequence[str]"


@dataclass(frozen=True, kw_only=True)
class Mismatch:
    """A key both sides have, with shapes that do not fit even after a transpose."""

    source: str
    target: str
    source_shape: tuple[int, ...]
    target_shape: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class WeightReport:
    """What :func:`copy_weights` did (or, with problems, would not do)."""

    copied: list[str] = field(default_factory=list)  # target keys
    transposed: list[str] = field(default_factory=list)  # target keys copied as a transpose
    missing: list[str] = field(default_factory=list)  # target keys no source key fills
    unexpected: list[str] = field(default_factory=list)  # source parameters with no target
    mismatched: list[Mismatch] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # source buffers with no target (masks)

    @property
    def ok(self) -> bool:
        """Every target key filled, every source parameter used, every shape fitting."""
        return not (self.missing or self.unexpected or self.mismatched)

    def __rich_console__(self, console: Console, options: ConsoleOptions
                         ) -> Iterator[RenderableType]:
        summary = f"copied {len(self.copied)} tensors ({len(self.transposed)} transposed)"
        if self.ok:
            yield Text(summary, style="green")
        else:
            yield Text(f"{summary.replace('copied', 'would copy')}, but these keys do not fit "
                       f"(nothing was copied):", style="bold red")
            table = Table()
            for column in ("problem", "source key", "target key", "shapes"):
                table.add_column(column, overflow="fold")
            for key in self.missing:
                table.add_row("missing", "-", key, "")
            for key in self.unexpected:
                table.add_row("unexpected", key, "-", "")
            for m in self.mismatched:
                table.add_row("shape", m.source, m.target, f"{m.source_shape} -> {m.target_shape}")
            yield table
        if self.ignored:
            yield Text(f"ignored {len(self.ignored)} buffers the target does not have: "
                       f"{', '.join(self.ignored[:4])}{' ...' if len(self.ignored) > 4 else ''}",
                       style="dim")

    def __str__(self) -> str:
        return render_text(self)

    def _repr_html_(self) -> str:
        return render_html(self)


class WeightsMismatchError(ValueError):
    """The weights do not fit; ``report`` says which keys (nothing was copied)."""

    def __init__(self, report: WeightReport) -> None:
        super().__init__(render_text(report))
        self.report = report


def transposes(key: str, module: nn.Module | None, tensor: torch.Tensor,
                transpose: Transpose) -> bool:
    """Whether ``key`` (a 2-D ``tensor`` of ``module``) is copied as its transpose."""
    if tensor.dim() != 2:
        return False
    if transpose == "auto":  # Hugging Face's Conv1D keeps (in, out)
        return type(module).__name__ == "Conv1D" and key.endswith(".weight")
    if isinstance(transpose, bool):
        return transpose
    if isinstance(transpose, str):
        return fnmatch.fnmatchcase(key, transpose)
    return any(fnmatch.fnmatchcase(key, glob) for glob in transpose)


def copy_weights(src: nn.Module, dst: nn.Module, map: PathMap | None = None,
                 transpose: Transpose = "auto") -> WeightReport:
    """Copy ``src``'s weights into ``dst`` by aligned names; raise one clear error otherwise.

    ``map`` turns source module globs into target ones (``{"h.*.attn.c_attn": "blocks.*.qkv"}``,
    or a list of targets to split a fused weight along its output axis). ``transpose`` is
    ``"auto"`` (Hugging Face ``Conv1D`` weights), ``True``/``False`` for every 2-D weight, or
    key globs. Raises :class:`WeightsMismatchError` (a ``ValueError``) listing every missing,
    unexpected and shape-mismatched key, before copying anything.

    >>> import torch.nn as nn
    >>> src, dst = nn.Sequential(nn.Linear(2, 3)), nn.Sequential(nn.Linear(2, 3))
    >>> print(copy_weights(src, dst))
    copied 2 tensors (0 transposed)
    >>> torch.equal(src[0].weight, dst[0].weight)
    True
    """
    require_module(src, "copy_weights(src, dst)")
    require_module(dst, "copy_weights(src, dst)")
    map = map_argument(map, "copy_weights")
    modules = dict(src.named_modules())
    parameters = {name for name, _ in src.named_parameters(remove_duplicate=False)}
    targets = dst.state_dict(keep_vars=True)
    planned: list[tuple[str, torch.Tensor]] = []
    transposed: list[str] = []
    mismatched: list[Mismatch] = []
    unexpected: list[str] = []
    ignored: list[str] = []
    for key, tensor in src.state_dict(keep_vars=True).items():
        owner, _, leaf = key.rpartition(".")
        names = translate(owner, map) or [owner]
        keys = [f"{name}.{leaf}" if name else leaf for name in names]
        if not all(k in targets for k in keys):
            (unexpected if key in parameters else ignored).append(key)
            continue
        value = tensor.detach()
        flip = transposes(key, modules.get(owner), value, transpose)
        value = value.t() if flip else value
        parts = value.chunk(len(keys), dim=0) if len(keys) > 1 else (value,)
        for target, part in zip(keys, parts, strict=False):
            if part.shape != targets[target].shape:
                mismatched.append(Mismatch(source=key, target=target,
                                           source_shape=tuple(tensor.shape),
                                           target_shape=tuple(targets[target].shape)))
                continue
            planned.append((target, part))
            if flip:
                transposed.append(target)
    filled = {target for target, _ in planned} | {m.target for m in mismatched}
    missing = [key for key in targets if key not in filled]
    report = WeightReport(copied=[t for t, _ in planned], transposed=transposed,
                          missing=missing, unexpected=unexpected, mismatched=mismatched,
                          ignored=ignored)
    if not report.ok:
        raise WeightsMismatchError(report)
    with torch.no_grad():
        for target, value in planned:
            targets[target].copy_(value)
    return report
