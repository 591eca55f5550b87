"""Lesson 07: inspecting a Hugging Face model you did not write.

Everything in torchlens_edu works on any ``nn.Module``. Here: a small Llama (grouped-query
attention, rotary positions, RMSNorm, SwiGLU MLP) built from a config with random weights, so
it needs no download. The same calls work on a real checkpoint from ``from_pretrained``.

What to look at:
1. ``tle.inspect(model)``: the module tree, with identical layers folded, and the names of
   the sizes taken from the model's config (C hidden size, nh heads, V vocabulary, ...).
2. ``insp.trace(input_ids=...)``: keyword inputs work. Note k_proj/v_proj are narrower than
   q_proj: 2 key/value heads shared by 4 query heads (grouped-query attention).
3. ``insp.capture("model.layers.*.mlp")`` and ``describe``: activations by module path.
4. ``output_attentions=True`` (with eager attention): Hugging Face returns the weights, and
   ``tle.show_attention`` draws them with the tokens on the axes.

Run:  python demos/07_inspect_a_hugging_face_model.py
"""

import torch
from rich.console import Console
from rich.rule import Rule
from transformers import LlamaConfig, LlamaForCausalLM

import torchlens_edu as tle

console = Console(highlight=False)
torch.manual_seed(0)
config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=172, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                     attn_implementation="eager")
model = LlamaForCausalLM(config).eval()
text = "the cat sat"
input_ids = torch.tensor([list(text.encode())])  # bytes as token ids: (B=1, T=11)

insp = tle.inspect(model)
console.print(Rule("1. the module tree"))
console.print(insp)

console.print(Rule("2. shapes, with keyword inputs"))
console.print(insp.trace(input_ids=input_ids, depth=4))

console.print(Rule("3. capture the MLP outputs"))
with insp.capture("model.layers.*.mlp") as cache, torch.no_grad():
    out = model(input_ids=input_ids, output_attentions=True)
for (path, _), activation in cache.items():
    console.print(f"{path:22s}", tle.describe(activation, dims=cache.dims))

console.print(Rule("4. attention weights returned by the model"))
console.print(f"{len(out.attentions)} layers of", tle.describe(out.attentions[0], stats=False))
tle.show_attention(out.attentions[-1], list(text), head=1, console=console)
