"""Lesson 01: tensors, and printing them so you can actually read them.

What to look at:
1. torch's default print of a (1, 8, 64) activation: long, and ``sci_mode`` can flip every
   number to 1.2345e-02 style when values span a wide range.
2. ``tle.printoptions("edu")``: 4 decimals, 4 edge items, summarised above 30 elements, and
   never e-notation (``sci_mode=False``), the same preset the debugger's stops use. The
   ``with`` block puts back the *exact* previous options afterwards (check the last print).
3. ``tle.describe(t)``: one line with the shape in named dims (B, T, C), dtype, device, mean,
   std, range, a sparkline histogram and the NaN count. This is the line to print in a loop.
4. ``tle.installed()``: inside it, ``repr(tensor)`` starts with that line, so the debugger's
   hover and ``print`` show it too.

Run:  python demos/01_tensors_and_print_options.py
"""

import torch
from rich.console import Console
from rich.rule import Rule

import torchlens_edu as tle

console = Console(highlight=False, soft_wrap=True)  # torch wraps its own lines
torch.manual_seed(0)
x = torch.randn(1, 8, 64) * torch.logspace(-4, 2, 64)  # an activation with a wide range
dims = {"B": 1, "T": 8, "C": 64}

console.print(Rule("1. torch's default print"))
console.print(str(x[0, :2]))

console.print(Rule('2. with tle.printoptions("edu")'))
with tle.printoptions("edu"):
    console.print(str(x[0, :2]))
with tle.printoptions("edu", precision=2):  # a preset, and one option changed on top of it
    console.print(str(x[0, :2, -6:]))

console.print(Rule("3. tle.describe: one line per tensor"))
console.print(tle.describe(x, dims=dims))
console.print(tle.describe(x.softmax(-1), dims=dims))
console.print(tle.describe(torch.tensor([1.0, float("nan"), float("inf")])))
console.print(tle.describe(torch.arange(12).reshape(3, 4)))
console.print(tle.describe(torch.zeros(2, 3, device="meta")), "  <- meta: shape only, no data")

console.print(Rule("4. repr with the summary line (tle.installed)"))
with tle.installed():
    console.print(repr(torch.linspace(0, 1, 5)))
console.print(Rule("back to the exact previous print options"))
console.print(str(x[0, :1, :4]))
