"""``show_attention``: one attention pattern, token strings on both axes, causal triangle visible.

Rows are queries, columns are keys. Cells a causal mask zeroed print as ``·``, so the lower
triangle stands out. Small patterns show the weights as numbers on a colour scale; bigger ones
as colour blocks (shades without colour), block-averaged when wider than a terminal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from rich.console import Console, ConsoleOptions, RenderResult
from rich.style import Style
from rich.table import Table
from rich.text import Text

from torchlens_edu._core.arguments import console_argument
from torchlens_edu.printing.stats import unobserved
from torchlens_edu.printing.table import Heat, RichView, is_plain

_NUMBERS_UP_TO = 16  # keys; beyond this, blocks instead of numbers
_MAX_KEYS = 64  # beyond this, key columns are block-averaged
_LABEL = 6  # characters of a token label


def select_attention(weights: Any, *, layer: int | None = None, head: int | None = None,
                     batch: int = 0) -> tuple[torch.Tensor, str]:
    """The (T_q, T_k) matrix to draw, and a title saying what was selected.

    ``weights``: ``(T, T)``, ``(nh, T, T)``, ``(B, nh, T, T)``, ``(L, B, nh, T, T)`` or a list of
    per-layer tensors. ``head=None`` averages the heads.

    >>> m, title = select_attention(torch.rand(2, 4, 5, 5).softmax(-1), head=1, batch=1)
    >>> tuple(m.shape), title
    ((5, 5), 'attention  batch 1 of 2 · head 1 of 4')
    """
    for name, index, meaning in (("layer", layer, "None when there is one layer"),
                                 ("head", head, "None to average the heads"),
                                 ("batch", batch, "")):
        if not (isinstance(index, int) and not isinstance(index, bool)) and (
                index is not None or name == "batch"):
            raise TypeError(f"show_attention({name}={index!r:.40}): give an int index (negative "
                            f"ones count from the end){', or ' + meaning if meaning else ''}")
    parts: list[str] = []
    if isinstance(weights, (list, tuple)):
        if not weights or not all(isinstance(w, torch.Tensor) for w in weights):
            raise TypeError("show_attention() takes a tensor or a list of per-layer tensors")
        weights = torch.stack([w.detach() for w in weights])
        if weights.dim() < 5:  # a list of (nh, T, T) or (T, T): give every layer a batch axis
            weights = weights.reshape(weights.shape[0], 1, -1, *weights.shape[-2:])
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"show_attention() takes a tensor of attention weights, "
                        f"got {type(weights).__name__}")
    w = weights.detach()
    if w.dim() not in (2, 3, 4, 5):
        raise ValueError(f"attention weights of shape {tuple(w.shape)}: expected (T, T), "
                         "(nh, T, T), (B, nh, T, T) or (L, B, nh, T, T)")
    if w.dim() == 5:
        if layer is None and w.shape[0] > 1:
            raise ValueError(f"the weights hold {w.shape[0]} layers: pass layer=0.."
                             f"{w.shape[0] - 1}")
        w = _index(w, 0 if layer is None else layer, "layer", parts)
    elif layer is not None:
        parts.append(f"layer {layer}")
    if w.dim() == 4:
        w = _index(w, batch, "batch", parts)
    if w.dim() == 3:
        if head is None:
            if w.shape[0] > 1:
                parts.append(f"mean of {w.shape[0]} heads")
            w = w.float().mean(0)
        else:
            w = _index(w, head, "head", parts)
    elif head is not None:
        parts.append(f"head {head}")
    return w, "attention  " + " · ".join(parts) if parts else "attention"


def _index(w: torch.Tensor, i: int, name: str, parts: list[str]) -> torch.Tensor:
    n = w.shape[0]
    if not -n <= i < n:
        raise ValueError(f"{name}={i} is out of range: the weights have {n} {name}s "
                         f"(axis 0 of shape {tuple(w.shape)}), use {name}=0..{n - 1}")
    if n > 1:
        parts.append(f"{name} {i % n} of {n}")
    return w[i]


def token_label(token: Any, width: int = _LABEL) -> str:
    """A token as a short label with its whitespace visible.

    >>> token_label(" hello!"), token_label("\\n")
    ('␣hell…', '↵')
    """
    text = str(token).replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")
    return text if len(text) <= width else text[: width - 1] + "…"


class AttentionView(RichView):
    """A rich renderable for one attention matrix (see ``show_attention``).

    >>> w = torch.tril(torch.ones(3, 3)); w = w / w.sum(-1, keepdim=True)
    >>> print(repr(AttentionView(w, ["a", "b", "c"])))  # doctest: +NORMALIZE_WHITESPACE
    attention  (3 queries × 3 keys; rows: queries, columns: keys)
           a     b     c
    a   1.00     ·     ·
    b   0.50  0.50     ·
    c   0.33  0.33  0.33
    """

    def __init__(self, weights: Any, tokens: Sequence[Any] | None = None, *,
                 layer: int | None = None, head: int | None = None, batch: int = 0) -> None:
        with unobserved():  # selecting and copying the weights is not the model's work
            matrix, self.title = select_attention(weights, layer=layer, head=head, batch=batch)
            self._check(matrix, tokens)
            self.matrix = matrix.to("cpu", torch.float64)
        tq, tk = self.matrix.shape
        labels = [token_label(t) for t in tokens] if tokens is not None else \
            [str(i) for i in range(tk)]
        self.keys, self.queries = labels, labels[tk - tq:]  # queries are the last T_q tokens

    @staticmethod
    def _check(matrix: torch.Tensor, tokens: Sequence[Any] | None) -> None:
        if not matrix.is_floating_point():
            raise TypeError(f"attention weights must be floating point, got {matrix.dtype}")
        if matrix.is_meta:
            raise ValueError("attention weights on the meta device hold no values to draw")
        tq, tk = matrix.shape
        if tq > tk:
            raise ValueError(f"attention of shape ({tq}, {tk}) has more queries than keys; "
                             "expected (T_q, T_k) with T_q <= T_k (the last two axes)")
        if tokens is not None and len(tokens) != tk:
            given = f"{len(tokens)} token{'s' if len(tokens) != 1 else ''}"
            raise ValueError(f"{given} for {tk} key positions: pass one token "
                             f"per position (the last axis of the weights has size {tk})")

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        tq, tk = self.matrix.shape
        yield Text(f"{self.title}  ({tq} queries × {tk} keys; rows: queries, columns: keys)",
                   style="bold")
        with unobserved():  # drawing is not the model's work: keep it out of traces
            parts = list(self._body(is_plain(console), options.max_width))
        yield from parts

    def _body(self, plain: bool, width: int) -> RenderResult:
        tq, tk = self.matrix.shape
        # masked cells: exact zeros above the (shifted) diagonal, as a causal mask leaves them
        shift = tk - tq
        masked = torch.ones(tq, tk, dtype=torch.bool).triu(shift + 1) & (self.matrix == 0)
        # scale to the 98th percentile of the visible weights: the first query's lone 1.0
        # would otherwise leave every other cell of a long sequence at the bottom of the ramp
        visible = self.matrix[~masked & ~self.matrix.isnan()]
        visible = visible[:: max(1, visible.numel() // 100_000)]  # quantile's input is bounded
        top = float(visible.quantile(0.98)) if visible.numel() else 1.0
        heat = Heat(0.0, top or 1.0)
        if tk <= _NUMBERS_UP_TO and (_LABEL + 1) + 6 * tk <= width:
            yield self._numbers(masked, heat, plain)
        else:  # two characters per key, never wider than the console
            yield from self._blocks(masked, heat, plain, max(2, (width - _LABEL - 1) // 2))

    def _numbers(self, masked: torch.Tensor, heat: Heat, plain: bool) -> Table:
        table = Table(box=None, show_edge=False, pad_edge=False, padding=(0, 1))
        table.add_column("", justify="left", style="bold")
        for key in self.keys:
            table.add_column(key, justify="right", header_style="bold", min_width=4)
        for q, (label, row) in enumerate(zip(self.queries, self.matrix.tolist(), strict=True)):
            cells = [Text("·", style="dim") if masked[q, k] else
                     Text(f"{v:.2f}", style="" if plain or v != v else heat.style(v))
                     for k, v in enumerate(row)]
            table.add_row(label, *cells)
        return table

    def _blocks(self, masked: torch.Tensor, heat: Heat, plain: bool,
                fit: int) -> RenderResult:
        matrix, keys, tk = self.matrix, self.keys, self.matrix.shape[1]
        cols = min(_MAX_KEYS, fit)
        if tk > cols:  # average groups of keys so that a row fits the terminal
            matrix = torch.nn.functional.adaptive_avg_pool1d(matrix[None], cols)[0]
            masked = torch.nn.functional.adaptive_max_pool1d(
                (~masked).double()[None], cols)[0] == 0
            keys = [keys[round(i * (tk - 1) / (cols - 1))] for i in range(cols)]
            yield Text(f"(keys block-averaged: {tk} shown as {cols} columns)", style="dim")
        pad = " " * (_LABEL + 1)
        for line in range(max(map(len, keys))):  # key tokens written downwards, a column each
            yield Text(pad + "".join((k[line] if line < len(k) else " ") + " " for k in keys),
                       style="bold")
        for q, row in enumerate(matrix.tolist()):
            text = Text(self.queries[q].ljust(_LABEL) + " ", style="bold")
            for k, v in enumerate(row):
                if masked[q, k]:
                    text.append("· ", style="dim")
                elif v != v:
                    text.append("!!", style="bold red")
                elif plain:
                    text.append(heat.shade(v) * 2)
                else:
                    text.append("██", style=Style(color=heat.style(v).bgcolor))
            yield text


def show_attention(weights: Any, tokens: Sequence[Any] | None = None, *,
                   layer: int | None = None, head: int | None = None, batch: int = 0,
                   console: Console | None = None) -> None:
    """Draw an attention pattern: queries down, keys across, token strings on both axes.

    ``weights`` is ``(T, T)``, ``(nh, T, T)``, ``(B, nh, T, T)``, ``(L, B, nh, T, T)`` or a list
    of per-layer tensors; ``layer``/``head``/``batch`` pick one (``head=None`` averages heads).

    >>> show_attention(torch.eye(2), ["hi", " there"])  # doctest: +NORMALIZE_WHITESPACE
    attention  (2 queries × 2 keys; rows: queries, columns: keys)
            hi  ␣there
    hi     1.00      ·
    ␣there 0.00   1.00
    """
    view = AttentionView(weights, tokens, layer=layer, head=head, batch=batch)
    console_argument(console, "show_attention").print(view)
