"""Lesson 09: my logits differ from GPT-2's; where is my bug?

What to look at:
1. ``MyGPT`` below is a learner's copy of the bundled GPT-2 (same module names, nanoGPT style)
   with one planted bug: the attention scores are not scaled by ``1 / sqrt(hs)``.
2. ``tle.copy_weights(reference, mine)`` copies the embedded GPT-2's weights in, and reports
   any key that does not fit in one table instead of leaving a half-loaded model.
3. ``tle.compare(mine, reference, idx)`` runs both, module by module, and names the first
   module whose own code made the difference, then, inside it, the op and YOUR line: the
   reference divides by ``sqrt(hs)`` there and your model does not.
4. With the bug fixed they agree; an erf GELU instead of GPT-2's tanh one is reported as
   drift (about 1e-3, legal), not as a bug.

Run:  python demos/09_find_my_bug.py      (same from the shell: torchlens-edu compare FILE:GPT)
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.console import Console
from rich.rule import Rule

import torchlens_edu as tle
from torchlens_edu.models import GPT2, GPT2Config, get_tokenizer
from torchlens_edu.models.loading import load_pretrained

console = Console(highlight=False)


class Attention(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.fixed = False  # flipped in part 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if self.fixed:  # noqa: SIM108 (the bug keeps a line of its own)
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, T)
        else:
            scores = q @ k.transpose(-2, -1)  # (B, nh, T, T)   <- the planted bug
        mask = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T)
        att = F.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)  # (B, nh, T, T)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.approximate = "tanh"  # GPT-2's GELU; "none" (erf) in part 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = Attention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class MyGPT(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(T))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))  # (B, T, V)


console.print(Rule("1. the reference, and my copy with its weights"))
# the explicit attention path: ops a learner writes by hand, so op by op they line up
reference = load_pretrained(GPT2, "embedded", progress=False).with_attn_impl("explicit")
mine = MyGPT(reference.config).eval()
console.print(tle.copy_weights(reference, mine))
ids = get_tokenizer("embedded").encode("Hello, my name is")
idx = torch.tensor([ids])  # (1, T)

console.print(Rule("2. where do they differ?"))
result = tle.compare(mine, reference, idx)
console.print(result)
console.print(f"result.first.source = {result.first.source!r}" if result.first else "no bug?")

console.print(Rule("3. fixed, and with an erf GELU: drift, not a bug"))
for block in mine.transformer.h:
    block.attn.fixed = True
    block.mlp.approximate = "none"
console.print(tle.compare(mine, reference, idx))
