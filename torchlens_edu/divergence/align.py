"""Which module of the model under test answers to which module of the reference.

Three ways, tried in this order, and the comparison says which one it used:

- ``map``: globs from reference paths to model paths, ``{"h.*.attn.c_attn": "blocks.*.qkv"}``
  (each ``*`` is one path part and carries over in order); a list of model globs on the right,
  ``["blocks.*.q", "blocks.*.k", "blocks.*.v"]``, is one fused reference module split in parts
  whose outputs are side by side on the last axis;
- by module path, when the names agree (a copy of GPT-2 under Hugging Face's names);
- by structure: the order of module calls with the shapes of their outputs, when neither fits
  (a clean copy that names its modules differently).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import torch

PathMap: TypeAlias = Mapping[str, "str | Sequence[str]"]


@dataclass(kw_only=True)
class ModuleCall:
    """One call of one module during a recorded forward."""

    path: str  # "" is the model itself
    index: int  # the how-manieth call of this module (a module can run several times)
    parent: int | None  # position of the enclosing call in the recording, None for the root
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    finished: int = -1  # completion order: children finish before their parent

    @property
    def key(self) -> tuple[str, int]:
        """``(path, index)``: the call, as alignment knows it."""
        return self.path, self.index


def _glob_regex(glob: str) -> re.Pattern[str]:
    """``glob`` at the start of a path; what follows it (``.attn.c_attn``) is kept."""
    return re.compile("^" + r"\.".join("([^.]+)" if part == "*" else re.escape(part)
                                        for part in glob.split(".")) + r"(\..+)?$")


def _fill(glob: str, parts: Sequence[str]) -> str:
    filled = iter(parts)
    return ".".join(next(filled, "*") if part == "*" else part for part in glob.split("."))


def map_argument(path_map: object, who: str) -> PathMap | None:
    """``path_map`` if it is None or a dict of module globs to a glob (or a list of globs),
    else a TypeError with an example.

    >>> map_argument({"h.*.attn": "blocks.*.attention"}, "compare")
    {'h.*.attn': 'blocks.*.attention'}
    >>> map_argument("h.*.attn", "compare")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: compare(map='h.*.attn'): give a dict of module globs, ...
    """
    def target(value: object) -> bool:
        return isinstance(value, str) or (isinstance(value, (list, tuple)) and bool(value)
                                          and all(isinstance(v, str) for v in value))

    if path_map is None:
        return None
    if isinstance(path_map, Mapping) and all(isinstance(k, str) and target(v)
                                             for k, v in path_map.items()):
        return path_map
    raise TypeError(f"{who}(map={path_map!r:.60}): give a dict of module globs, the first "
                    "model's to the second's, each a glob or a list of globs (a fused weight "
                    "split in parts), e.g. {'h.*.attn.c_attn': 'blocks.*.qkv'}")


def translate(path: str, path_map: PathMap | None) -> list[str] | None:
    """The model path(s) that a reference ``path`` becomes under ``path_map`` (None: unmapped).

    >>> translate("h.3.attn.c_attn", {"h.*.attn.c_attn": "blocks.*.qkv"})
    ['blocks.3.qkv']
    >>> translate("h.0.attn.c_attn", {"h.*.attn.c_attn": ["b.*.q", "b.*.k", "b.*.v"]})
    ['b.0.q', 'b.0.k', 'b.0.v']
    >>> translate("transformer.h.2.mlp", {"transformer.h": "layers"})  # a prefix carries the rest
    ['layers.2.mlp']
    """
    for source, target in (path_map or {}).items():
        found = _glob_regex(source).match(path)
        if found:
            *parts, rest = found.groups()
            targets = [target] if isinstance(target, str) else list(target)
            return [_fill(glob, parts) + (rest or "") for glob in targets]
    return None


def pair_tensors(values: Sequence[torch.Tensor], references: Sequence[torch.Tensor]
                 ) -> list[tuple[int, int]]:
    """Pair the tensors of two outputs of different structure (``(logits, loss)`` against bare
    ``logits``): equal shapes first, in order; when no shape is shared, the first of each side
    (a shape difference, which the comparison reports as such).

    >>> a, b = torch.zeros(1, 4, 8), torch.zeros(())
    >>> pair_tensors([a, b], [a])
    [(0, 0)]
    """
    pairs, used = [], set()
    for i, value in enumerate(values):
        for j, reference in enumerate(references):
            if j not in used and value.shape == reference.shape:
                pairs.append((i, j))
                used.add(j)
                break
    if not pairs and values and references:
        pairs.append((0, 0))
    return pairs


@dataclass(kw_only=True)
class Alignment:
    """Pairs of call positions (model -> reference) and how they were found."""

    how: str  # "map", "path" or "structure"
    pairs: dict[int, int]  # model call position -> reference call position
    parts: dict[int, list[int]]  # a model call that stands for a fused reference module -> the
    # model calls (itself first) whose outputs, side by side on the last axis, are that output


def align(calls: Sequence[ModuleCall], references: Sequence[ModuleCall],
          path_map: PathMap | None = None) -> Alignment:
    """Align two recordings (see the module docstring)."""
    by_key = {call.key: position for position, call in enumerate(calls)}
    pairs: dict[int, int] = {}
    parts: dict[int, list[int]] = {}
    for ref_position, ref in enumerate(references):
        targets = translate(ref.path, path_map) or [ref.path]
        found = [by_key[target, ref.index] for target in targets if (target, ref.index) in by_key]
        if len(found) != len(targets):
            continue
        # a fused reference module is compared where its last part has finished
        last = max(found, key=lambda position: calls[position].finished)
        pairs[last] = ref_position
        if len(found) > 1:
            parts[last] = found
    named = sum(1 for call in calls if call.path) or 1
    covered = set(pairs).union(*parts.values())
    matched = sum(1 for position in covered if calls[position].path)
    if matched * 2 >= named:
        return Alignment(how="map" if path_map else "path", pairs=pairs, parts=parts)
    return Alignment(how="structure", pairs=_by_structure(calls, references), parts={})


def matching_pairs(first: Sequence[object], second: Sequence[object]) -> dict[int, int]:
    """Positions of equal items, in order, as :mod:`difflib` matches two sequences (the one
    place the toolkit aligns sequences; did-you-means live in ``_core/formatting.py``).

    >>> matching_pairs(["@", "masked_fill"], ["@", "div", "masked_fill"])
    {0: 0, 1: 2}
    """
    matcher = difflib.SequenceMatcher(None, first, second, autojunk=False)
    return {block.a + offset: block.b + offset
            for block in matcher.get_matching_blocks() for offset in range(block.size)}


def _signature(call: ModuleCall) -> tuple[object, ...]:
    return tuple(tuple(t.shape) for t in call.outputs)


def _by_structure(calls: Sequence[ModuleCall], references: Sequence[ModuleCall]
                  ) -> dict[int, int]:
    pairs = matching_pairs([_signature(c) for c in calls], [_signature(r) for r in references])
    if calls and references:  # the roots answer to each other whatever their outputs
        pairs = {mine: theirs for mine, theirs in pairs.items() if mine and theirs}
        pairs[0] = 0
    return pairs
