"""Lesson 03: shapes with named dimensions, and a shape error explained.

What to look at:
1. ``trace_shapes(model, ids)``: every module's input -> output shape, written with the names
   of the sizes (B batch, T tokens, C n_embd, nh heads, hs head size, V vocabulary). Identical
   blocks are folded into one line ``transformer.h.0..N (xN)``.
2. ``ops=True`` inside one attention layer: every torch op with its source line. Follow
   ``(B, T, C)`` -> ``(B, nh, T, hs)`` -> scores ``(B, nh, T, T)`` -> back to ``(B, T, C)``.
3. ``meta=True``: the same shapes for GPT-2 XL (1.5B parameters) without allocating a weight.
4. A classic bug: ``q @ k`` instead of ``q @ k.transpose(-2, -1)``. torch says
   "Expected size ... [8, 8] but got [8, 5]"; the trace names the operands with their dims
   and suggests the fix.

Run:  python demos/03_shapes_and_named_dims.py
"""

import torch
import torch.nn as nn
from rich.console import Console
from rich.rule import Rule

import torchlens_edu as tle
from torchlens_edu.models import GPT2, GPT2Config
from torchlens_edu.models.offline import load_best_available

console = Console(highlight=False)
model, tok, notice = load_best_available(device="cpu")
if notice:
    console.print(f"[dim]{notice}[/dim]")
ids = torch.tensor([tok.encode("Anne walked to the sea")] * 2)  # (B=2, T)

console.print(Rule("1. module shapes with named dims"))
console.print(tle.trace_shapes(model, ids))

console.print(Rule("2. op by op inside the first attention layer"))
console.print(tle.trace_shapes(model, ids, ops=True, include="transformer.h.0.attn"))

console.print(Rule("3. GPT-2 XL on meta tensors: shapes without weights"))
with torch.device("meta"):
    xl = GPT2(GPT2Config.preset("gpt2-xl"))
xl_ids = torch.zeros(1, 512, dtype=torch.long, device="meta")  # (B=1, T=512)
console.print(tle.trace_shapes(xl, xl_ids, meta=True, depth=2))


console.print(Rule("4. a shape error, explained"))


class BuggyAttention(nn.Module):
    """Scores from queries and keys, with the transpose forgotten."""

    def __init__(self, n_embd: int = 32, n_head: int = 4) -> None:
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape  # (B, T, C)
        q, k, _ = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C); v is not needed here
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        return (q @ k).softmax(-1)  # BUG: should be q @ k.transpose(-2, -1) -> (B, nh, T, T)


x = torch.randn(2, 5, 32)
try:
    tle.trace_shapes(BuggyAttention(), x, ops=True,
                     dims={"B": 2, "T": 5, "C": 32, "nh": 4, "hs": 8})
except RuntimeError as err:
    console.print(f"torch says: [red]{err}[/red]")
    console.print("torchlens_edu's trace up to the failure, with the explanation:")
    console.print(err.shape_trace)
