"""Rich renderings of tensors: a value table tinted like a heatmap, or a compact block heatmap.

``show(t)`` prints through rich, so the same call gives colours in a terminal, HTML in Jupyter
and plain text in a pipe or under ``NO_COLOR`` (then shades ``░▒▓█`` carry the heat). The
views it prints (``TensorView``) are ordinary rich renderables with ``__repr__`` (plain text)
and ``_repr_html_`` (Jupyter), for embedding in other output.

Only what is displayed leaves the device: the summarised rows/columns (print options'
``edgeitems`` / ``threshold``) or a block-averaged thumbnail for the heatmap.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from rich.console import Console, ConsoleOptions, Group, RenderResult
from rich.style import Style
from rich.table import Table
from rich.text import Text

from torchlens_edu._core.arguments import console_argument, require_flag
from torchlens_edu._core.console import render_html, render_text
from torchlens_edu.dims import Dims
from torchlens_edu.printing.stats import (
    TensorStats,
    is_dtensor,
    local_shard,
    take,
    tensor_stats,
    unobserved,
)
from torchlens_edu.printing.summary_line import describe, format_stats

SHADES = " ░▒▓█"  # heat without colour
# colour ramps as RGB anchors: sequential (dark blue -> yellow, viridis-like) and diverging
_SEQUENTIAL = ((68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37))
_DIVERGING = ((33, 102, 172), (146, 197, 222), (247, 247, 247), (244, 165, 130), (178, 24, 43))
_MAX_HEAT = (32, 64)  # heatmap cells (rows, columns): bigger slices are block-averaged


class Heat:
    """Maps a value to a colour (and a shade character) on the scale of one tensor.

    Data with both signs gets a diverging ramp centred on 0, other data a sequential one.

    >>> Heat(-1.0, 1.0).position(0.0)
    0.5
    """

    def __init__(self, lo: float | None, hi: float | None) -> None:
        lo = 0.0 if lo is None else float(lo)
        hi = 0.0 if hi is None else float(hi)
        self.diverging = lo < 0 < hi
        if self.diverging:
            bound = max(-lo, hi)
            lo, hi = -bound, bound
        self.lo, self.span = lo, (hi - lo) or 1.0

    def position(self, value: float) -> float:
        """Where ``value`` sits on the scale, 0..1 (clamped)."""
        return min(1.0, max(0.0, (value - self.lo) / self.span))

    def style(self, value: float) -> Style:
        """Background colour for a cell, with a readable foreground."""
        r, g, b = _ramp(_DIVERGING if self.diverging else _SEQUENTIAL, self.position(value))
        dark = 0.299 * r + 0.587 * g + 0.114 * b < 140
        return Style.parse(f"{'white' if dark else 'black'} on rgb({r},{g},{b})")

    def shade(self, value: float) -> str:
        """A shade character for colourless output (magnitude from the scale's centre if
        diverging)."""
        p = self.position(value)
        level = abs(2 * p - 1) if self.diverging else p
        return SHADES[min(len(SHADES) - 1, round(level * (len(SHADES) - 1)))]


def _ramp(anchors: Sequence[tuple[int, int, int]], p: float) -> tuple[int, int, int]:
    x = p * (len(anchors) - 1)
    i = min(int(x), len(anchors) - 2)
    f = x - i
    a, b = anchors[i], anchors[i + 1]
    red, green, blue = (round(a[k] + (b[k] - a[k]) * f) for k in range(3))
    return red, green, blue


def is_plain(console: Console) -> bool:
    """True when the console will drop colours (``NO_COLOR``, a pipe, a dumb terminal)."""
    return console.no_color or console.color_system is None


class RichView:
    """Mixin for rich renderables that also work as ``repr`` (plain text) and in Jupyter."""

    def __repr__(self) -> str:
        return render_text(self)

    def _repr_html_(self) -> str:
        return render_html(self)


class TensorView(RichView):
    """A tensor as a tinted value table (``heatmap=False``) or as a block heatmap.

    >>> view = TensorView(torch.arange(4.0).reshape(2, 2), dims={"T": 2})
    >>> print(repr(view))  # doctest: +NORMALIZE_WHITESPACE
    Tensor[T=2, T=2] f32 cpu n=4 (16 B) μ=1.5 σ=1.291 [0, 3] █▁█▁▁█▁█ NaN:0 zeros:1
    ↓ T=2  → T=2
            0       1
    0  0.0000  1.0000
    1  2.0000  3.0000
    """

    def __init__(self, t: torch.Tensor, *, dims: Mapping[str, int] | None = None,
                 heatmap: bool = False) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"show() takes a torch.Tensor, got {type(t).__name__}")
        self.tensor, self.heatmap = t, heatmap
        self.dims = dims if isinstance(dims, Dims) else Dims(dims)
        self.stats: TensorStats = tensor_stats(t)

    def title(self) -> str:
        """The ``describe`` line, from the statistics computed once for this view.

        >>> TensorView(torch.zeros(2, 3)).title()
        'Tensor[2, 3] f32 cpu n=6 (24 B) all zeros NaN:0'
        """
        head = describe(self.tensor, dims=self.dims, stats=False)
        return f"{head} {format_stats(self.stats, self.tensor.dtype)}"

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield Text(self.title(), style="bold")
        with unobserved():  # gathering the shown values is not the model's work
            parts = list(self._body(console, options))
        yield from parts

    def _body(self, console: Console, options: ConsoleOptions) -> RenderResult:
        data, why = _displayable(local_shard(self.tensor))
        if is_dtensor(self.tensor) and data is not None:
            # the global values are spread over the ranks: gathering them is a collective
            # that would block when only this rank prints
            yield Text("values of this rank's local shard (other ranks hold the rest)",
                       style="dim")
        if data is None:
            if why:
                yield Text(why, style="dim")
            return
        heat = Heat(self.stats.min, self.stats.max)
        plain = is_plain(console)
        labels = self.dims.labels(tuple(data.shape))
        if data.dim() == 0:
            value = _host(data).item()
            yield Text(_fmt(value, data.dtype, abs(value) if _finite(value) else 0.0))
            return
        for index, block in _slices(data):
            caption = _caption(index, labels)
            if self.heatmap and data.dim() >= 2:
                yield _heat_block(block, heat, plain, caption, labels[-2:], options.max_width)
            else:
                yield _value_table(block, heat, plain, caption,
                                   labels[-2:] if block.dim() == 2 else labels[-1:],
                                   _summarize(data))


def show(t: torch.Tensor, *, dims: Mapping[str, int] | None = None, heatmap: bool = False,
         console: Console | None = None) -> None:
    """Print ``t`` as a tinted table (or, with ``heatmap=True``, a block heatmap per 2-D slice).

    Follows the current print options (``edgeitems``/``threshold``/``precision``; see
    ``set_printoptions``), labels axes with ``dims``, and prints through rich.

    >>> show(torch.eye(2))  # doctest: +NORMALIZE_WHITESPACE
    Tensor[2, 2] f32 cpu n=4 (16 B) μ=0.5 σ=0.5774 [0, 1] █▁▁▁▁▁▁█ NaN:0 zeros:2
            0       1
    0  1.0000  0.0000
    1  0.0000  1.0000
    """
    out = console_argument(console, "show")
    out.print(TensorView(t, dims=dims, heatmap=require_flag(heatmap, "heatmap", "show")))


def _displayable(t: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """A strided tensor to take the displayed values from, or None and why not."""
    if t.is_meta or isinstance(t, torch._subclasses.fake_tensor.FakeTensor):
        return None, ""
    if t.is_nested:
        return None, "(a nested tensor: show its components, e.g. show(t.unbind()[0]))"
    if t.numel() == 0:
        return None, ""
    t = t.detach()
    if t.is_quantized:
        t = t.dequantize()
    if t.layout != torch.strided:
        if t.numel() > 1 << 24:
            return None, "(sparse and too large to densify for display; see .values())"
        t = t.to_dense()
    return t, ""


def _edges(n: int, edgeitems: int, summarize: bool) -> list[int | None]:
    """Indices to show along an axis of size ``n``; ``None`` marks the elided middle."""
    if summarize and n > 2 * edgeitems:
        return [*range(edgeitems), None, *range(n - edgeitems, n)]
    return list(range(n))


def _summarize(t: torch.Tensor) -> tuple[bool, int]:
    """Like torch: a tensor over ``threshold`` elements shows ``edgeitems`` per end of every
    axis (its 2-D slices included, however small each one is)."""
    opts = torch._tensor_str.PRINT_OPTS
    return t.numel() > opts.threshold, max(1, int(opts.edgeitems))


def _slices(t: torch.Tensor) -> Iterator[tuple[tuple[int | None, ...], torch.Tensor]]:
    """(leading index, 1-D or 2-D block) pairs; an index of ``(None,)`` means "elided here"."""
    if t.dim() <= 2:
        yield (), t
        return
    lead = t.shape[:-2]
    flat = t.reshape(-1, *t.shape[-2:]) if t.is_contiguous() else t.flatten(0, -3)
    summarize, edge = _summarize(t)
    for i in _edges(math.prod(lead), edge, summarize):
        if i is None:
            yield (None,), flat[:0]
            continue
        yield tuple(_unravel(i, lead)), flat[i]


def _unravel(i: int, shape: Sequence[int]) -> list[int]:
    out = []
    for size in reversed(shape):
        out.append(i % size)
        i //= size
    return out[::-1]


def _caption(index: tuple[int | None, ...], labels: list[str]) -> str:
    if not index:
        return ""
    if index == (None,):
        return "…"
    return "[" + ", ".join([*map(str, index), ":", ":"]) + "]  " + " × ".join(labels[-2:])


def _axes(labels: list[str]) -> str:
    """``↓ T=8  → C=32`` when the axes have names; nothing to say when they are plain sizes."""
    if not any("=" in label or ":" in label for label in labels):
        return ""
    return ("↓ " + labels[0] + "  " if len(labels) == 2 else "") + "→ " + labels[-1]


def _host(block: torch.Tensor) -> torch.Tensor:
    """The displayed values on the CPU, as float64 (complex128 for complex, bool kept)."""
    if block.dtype.is_complex:
        return block.to("cpu", torch.complex128)
    if block.dtype == torch.bool:
        return block.cpu()
    if not block.dtype.is_floating_point and block.dtype != torch.uint64:
        return block.to("cpu", torch.int64)  # exact, also beyond 2**53
    return block.to("cpu", torch.float64)


def _pick(block: torch.Tensor, rows: list[int | None], cols: list[int | None]) -> torch.Tensor:
    """The shown rows x columns of a 1-D/2-D block, gathered on its device, as a 2-D array."""
    def ids(lst: list[int | None]) -> torch.Tensor:
        return torch.tensor([i for i in lst if i is not None], device=block.device,
                            dtype=torch.long)

    if block.dim() == 1:
        return _host(take(block, ids(cols)))[None]
    flat = ids(rows)[:, None] * block.shape[1] + ids(cols)[None, :]  # row-major positions
    return _host(take(block, flat))


def _value_table(block: torch.Tensor, heat: Heat, plain: bool, caption: str,
                 labels: list[str], summary: tuple[bool, int]) -> Table | Text:
    if block.numel() == 0 and caption == "…":
        return Text("  …", style="dim")
    summarize, edge = summary
    rows: list[int | None] = _edges(block.shape[0], edge, summarize) if block.dim() == 2 else [0]
    cols = _edges(block.shape[-1], edge, summarize)
    values = _pick(block, rows, cols).tolist()
    scale = max((abs(v) for row in values for v in row if _finite(v)), default=0.0)
    title = caption or _axes(labels)
    table = Table(title=title or None, title_justify="left", show_edge=False, pad_edge=False,
                  box=None, padding=(0, 1), title_style="dim")
    table.add_column("", style="dim", justify="right")
    for c in cols:
        table.add_column("…" if c is None else str(c), justify="right", header_style="dim")
    it = iter(values)
    for r in rows:
        if r is None:
            table.add_row("…", *("⋱" if c is None else "⋮" for c in cols), style="dim")
            continue
        row = iter(next(it))
        cells = [Text("…", style="dim") if c is None else _cell(next(row), block.dtype, heat,
                                                                  plain, scale) for c in cols]
        table.add_row(str(r) if block.dim() == 2 else "", *cells)
    return table


def _cell(v: Any, dtype: torch.dtype, heat: Heat, plain: bool, scale: float) -> Text:
    text = _fmt(v, dtype, scale)
    if isinstance(v, complex) or not _finite(v):
        return Text(text, style="bold red" if not _finite(v) else "")
    if plain:
        return Text(text)
    return Text(f" {text} ", style=heat.style(float(v)))


def _finite(v: Any) -> bool:
    if isinstance(v, complex):
        return math.isfinite(v.real) and math.isfinite(v.imag)
    return math.isfinite(v)


def _fmt(v: Any, dtype: torch.dtype, scale: float) -> str:
    """A value the way torch would print it under the current precision / sci_mode."""
    if isinstance(v, bool) or dtype == torch.bool:
        return str(bool(v))
    if isinstance(v, complex):
        return f"{_fmt(v.real, torch.float64, scale)}{'+' if v.imag >= 0 else '-'}" \
               f"{_fmt(abs(v.imag), torch.float64, scale)}j"
    if not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if not dtype.is_floating_point:
        return str(int(v))
    opts = torch._tensor_str.PRINT_OPTS
    sci = opts.sci_mode if opts.sci_mode is not None else (scale >= 1e8 or 0 < scale < 1e-4)
    return f"{v:.{opts.precision}e}" if sci else f"{v:.{opts.precision}f}"


def _heat_block(block: torch.Tensor, heat: Heat, plain: bool, caption: str,
                labels: list[str], width: int) -> Group:
    if block.numel() == 0 and caption == "…":
        return Group(Text("  …", style="dim"))
    rows, cols = block.shape
    # two characters per cell, and never wider than the console (a wrapped grid is unreadable)
    h, w = min(rows, _MAX_HEAT[0]), min(cols, _MAX_HEAT[1], max(1, width // 2))
    if block.dtype.is_complex:
        values = block.abs().float()
    else:
        values = block.to(torch.float32) if block.dtype != torch.float64 else block
    if (h, w) != (rows, cols):  # block-average a big slice into a thumbnail on its device
        values = torch.nn.functional.adaptive_avg_pool2d(values[None, None], (h, w))[0, 0]
    grid = values.to("cpu", torch.float64).tolist()
    title = caption or _axes(labels)
    lines = [Text(title, style="dim")] if title else []
    if (h, w) != (rows, cols):
        lines.append(Text(f"(block averages: {rows}×{cols} shown as {h}×{w})", style="dim"))
    for row in grid:
        line = Text()
        for v in row:
            if not math.isfinite(v):
                line.append("!!", style="bold red")
            elif plain:
                line.append(heat.shade(v) * 2)
            else:
                line.append("██", style=Style(color=heat.style(v).bgcolor))
        lines.append(line)
    return Group(*lines)
