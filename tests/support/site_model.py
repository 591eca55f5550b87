"""A small model whose ops run from every kind of place the op trace must name the user's line
for: a loop, a recursive helper, a generator, a lambda, einops, code generated with ``exec``
(``<string>``) and a nested helper function. ``tests/test_shapes_sites.py`` compares its full op
trace with ``site_model.expected.txt``, recorded before the per-code-location cache existed.

Line numbers are part of the expectation: edit this file only together with the expectation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn
from einops import rearrange

_GENERATED: dict[str, object] = {}
exec("def scale(t):\n    return t * 0.5\n", _GENERATED)  # code in <string>, like einx's


def halves(x: torch.Tensor) -> Iterator[torch.Tensor]:
    for part in x.chunk(2, dim=-1):  # (B, T, C/2) each
        yield part.tanh()  # (B, T, C/2)


def deeper(x: torch.Tensor, n: int) -> torch.Tensor:
    if n == 0:
        return x
    return deeper(x.sin(), n - 1)  # (B, T, C): the same line at every depth


class SiteModel(nn.Module):
    def __init__(self, width: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(3))
        self.act = lambda t: t.relu()  # a lambda's ops are on the lambda's line

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + self.act(layer(x))  # (B, T, C): one line, three iterations
        x = deeper(x, 2)  # (B, T, C)
        x = torch.cat(list(halves(x)), dim=-1)  # (B, T, C)
        heads = rearrange(x, "b t (h d) -> b h t d", h=self.heads)  # (B, h, T, d)
        x = rearrange(heads.exp(), "b h t d -> b t (h d)")  # (B, T, C)

        def centred(t: torch.Tensor) -> torch.Tensor:
            return t - t.mean(-1, keepdim=True)  # (B, T, C)

        x = centred(_GENERATED["scale"](x))  # type: ignore[operator]
        return x.sum(-1)  # (B, T)


def traced(trace_shapes: Callable[..., Any]) -> Any:
    """The op trace of a seeded SiteModel on a (2, 3, 8) input (the model is called from here)."""
    torch.manual_seed(0)
    model, x = SiteModel(), torch.randn(2, 3, 8)
    with torch.no_grad():
        return trace_shapes(model, x, ops=True)
