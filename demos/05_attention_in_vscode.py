"""Lesson 05: stepping through attention in the VS Code debugger.

The bundled GPT-2 has a *stop point* right after the attention softmax of each layer. When it
is enabled and a debugger is attached, execution pauses there with ``q``, ``k``, ``v``,
``scores`` and ``att`` as local variables: hover them, or type ``att[0, 1]`` in the Debug
Console; F10 steps line by line through ``y = att @ v``, F5 goes on to the next layer.

How to get there:
1. ``torchlens-edu vscode init`` writes the launch configurations printed below into
   ``.vscode/launch.json`` (your own configurations are kept).
2. In VS Code: Run and Debug (Ctrl+Shift+D), pick "GPT-2: stop inside attention (CPU)", F5.
   Or open THIS file and pick "Debug current file with torchlens_edu print options": under a
   debugger this lesson asks for a stop in layer 0 itself (``tle.stop_at``).
3. Without VS Code: ``TORCHLENS_EDU_STOP=attention:layer=0 python demos/05_attention_in_vscode.py``
   in a terminal opens pdb at the same place (``p att.shape``, ``n``, ``c``).

Run plainly (``python demos/05_attention_in_vscode.py``) it never pauses: it shows the launch
configurations and, op by op, the locals you would see at the stop.

What to look at: the shapes of q/k/v ``(B, nh, T, hs)``, scores/att ``(B, nh, T, T)``, and that
the explicit attention path (the one you step through) gives the same logits as the fast one.
"""

import os

import torch
from rich.console import Console
from rich.rule import Rule
from rich.syntax import Syntax

import torchlens_edu as tle
from torchlens_edu import debug
from torchlens_edu.commands.vscode import printable
from torchlens_edu.models import explicit_attention
from torchlens_edu.models.offline import load_best_available

console = Console(highlight=False)
model, tok, notice = load_best_available(device="cpu")
if notice:
    console.print(f"[dim]{notice}[/dim]")
ids = torch.tensor([tok.encode("Fanny sat by the fire")])  # (B=1, T)

console.print(Rule("1. the launch configurations (torchlens-edu vscode init)"))
# wrapped by us, not by the terminal: every comment line keeps its //, so a copy still parses
console.print(Syntax(printable("launch.json", console.width), "json", theme="ansi_dark"),
              soft_wrap=True)

console.print(Rule("2. the stop point"))
stop_from_env = os.environ.get("TORCHLENS_EDU_STOP")
if stop_from_env:
    console.print(f"TORCHLENS_EDU_STOP={stop_from_env}: pausing there (pdb in a terminal)")
elif debug.debugger_attached():
    tle.stop_at("attention", layer=0)
    console.print("a debugger is attached: stopping inside attention of layer 0")
else:
    console.print("no stop requested: running straight through (see the docstring to stop)")
try:
    with torch.no_grad():
        logits = model(ids)  # pauses in CausalSelfAttention.forward when a stop is active
finally:
    debug.clear_stops()

console.print(Rule("3. what you see at the stop: the explicit path, op by op"))
console.print(tle.trace_shapes(model, ids, ops=True, include="transformer.h.0.attn"))

console.print(Rule("4. the explicit path and the fast path agree"))
with explicit_attention(), torch.no_grad():
    explicit = model(ids)
console.print(f"max |explicit - fast| = {(explicit - logits).abs().max().item():.2e}")
