"""Lesson 02: hooks and capture, seeing the activations a forward pass makes.

What to look at:
1. ``tle.hooks(model)``: forward hooks chosen by module path. A glob's ``*`` crosses dots, so
   ``"transformer.h.*"`` would hook every module *inside* the blocks too; a predicate
   ``(path, module) -> bool`` picks exactly the blocks. One describe() line per block as the
   forward runs: the residual stream grows in scale layer after layer (watch σ).
2. ``insp.capture(...)``: keeps the outputs (and, with ``grads=True``, the gradients) in an
   ``ActivationCache``. Printing the cache gives a table with named dims.
3. The attention weights are a local variable inside attention, not an output. We capture
   ``c_attn`` (q, k, v side by side) and redo softmax(q kᵀ / √hs) ourselves: the rows sum to 1
   and the upper triangle is 0 (a token cannot look at the future).
4. After the ``with`` blocks, no hook is left on the model (the last line checks).

Run:  python demos/02_hooks_and_capture.py
"""

import math

import torch
from rich.console import Console
from rich.rule import Rule

import torchlens_edu as tle
from torchlens_edu.models.gpt2 import Block
from torchlens_edu.models.offline import load_best_available

console = Console(highlight=False, soft_wrap=True)
model, tok, notice = load_best_available(device="cpu")
if notice:
    console.print(f"[dim]{notice}[/dim]")
ids = torch.tensor([tok.encode("Emma could not but smile at her")])  # (B=1, T)
insp = tle.inspect(model, dims={"B": 1, "T": ids.shape[1]})

console.print(Rule("1. a forward hook on every block"))


def is_block(path, module):
    return isinstance(module, Block)  # transformer.h.0, transformer.h.1, ...



def show_block(call):  # call: HookCall with .path, .output, ...
    console.print(f"{call.path:18s}", tle.describe(call.output, dims=insp.dims))


with tle.hooks(model) as h, torch.no_grad():
    names = h.forward(is_block, show_block)
    model(ids)
console.print(f"hooked {len(names)} modules: {names[0]} ... {names[-1]}")

console.print(Rule("2. capture outputs and gradients"))
with insp.capture("transformer.h.*.mlp", grads=True) as cache:
    logits = model(ids)  # (B, T, V)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])  # next-token loss
    loss.backward()
console.print(cache)
last = f"transformer.h.{model.config.n_layer - 1}.mlp"
console.print("d loss / d (last MLP output):", tle.describe(cache.grad(last), dims=cache.dims))
model.zero_grad(set_to_none=True)

console.print(Rule("3. attention weights from the captured q and k"))
with insp.capture("transformer.h.0.attn.c_attn") as cache, torch.no_grad():
    model(ids)
qkv = cache["transformer.h.0.attn.c_attn"]  # (B, T, 3C)
B, T, C3 = qkv.shape
nh = model.config.n_head
q, k, v = (t.view(B, T, nh, -1).transpose(1, 2) for t in qkv.split(C3 // 3, dim=2))
scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, nh, T, T)
causal = torch.ones(T, T, dtype=torch.bool).tril()
att = scores.masked_fill(~causal, float("-inf")).softmax(-1)  # (B, nh, T, T)
console.print("att:", tle.describe(att, dims={"B": B, "nh": nh, "T": T}))
console.print("every row sums to 1:", bool(torch.allclose(att.sum(-1), torch.ones(B, nh, T))))
tle.show_attention(att, [tok.decode([i]) for i in ids[0].tolist()], head=0, console=console)

console.print(Rule("4. nothing left behind"))
left = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
console.print(f"hooks left on the model: {left}")
