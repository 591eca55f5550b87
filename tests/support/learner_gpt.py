"""A learner's GPT-2, written independently of torchlens_edu/models/gpt2.py but under the same
module names, with bugs that can be planted one at a time (``LearnerGPT(config, bug="...")``).

Each planted bug's line carries a ``# bug: NAME`` comment; the tests find the line by it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LearnerConfig:
    vocab_size: int = 64
    n_positions: int = 16
    n_embd: int = 32
    n_head: int = 4
    n_layer: int = 2
    dropout: float = 0.1
    layer_norm_epsilon: float = 1e-5
    attn: str = "explicit"  # or "sdpa": F.scaled_dot_product_attention


class Attention(nn.Module):
    def __init__(self, config: LearnerConfig, bug: str) -> None:
        super().__init__()
        self.n_head, self.bug, self.p = config.n_head, bug, config.dropout
        self.sdpa = config.attn == "sdpa"
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if self.sdpa:
            return self.c_proj(self._sdpa(q, k, v).transpose(1, 2).contiguous().view(B, T, C))
        if self.bug == "no_scale":
            scores = q @ k.transpose(-2, -1)  # bug: no_scale
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, T)
        if self.bug == "mask_off_by_one":
            mask = torch.ones(T, T, dtype=torch.bool).tril(diagonal=1)  # bug: mask_off_by_one
        else:
            mask = torch.ones(T, T, dtype=torch.bool).tril()  # (T, T)
        scores = scores.masked_fill(~mask, float("-inf"))
        if self.bug == "softmax_axis":  # noqa: SIM108 (the bug has a line of its own)
            att = F.softmax(scores, dim=-2)  # bug: softmax_axis
        else:
            att = F.softmax(scores, dim=-1)  # (B, nh, T, T)
        if self.bug == "dropout_active":
            att = F.dropout(att, self.p, training=True)  # bug: dropout_active
        else:
            att = self.attn_dropout(att)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        attend = F.scaled_dot_product_attention
        if self.bug == "sdpa_not_causal":
            return attend(q, k, v)  # bug: sdpa_not_causal
        if self.bug == "sdpa_scale":
            return attend(q, k, v, is_causal=True, scale=1.0)  # bug: sdpa_scale
        return attend(q, k, v, is_causal=True)  # (B, nh, T, hs)


class MLP(nn.Module):
    def __init__(self, config: LearnerConfig, bug: str) -> None:
        super().__init__()
        self.bug = bug
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.bug == "erf_gelu":  # noqa: SIM108 (the bug has a line of its own)
            h = F.gelu(h)  # bug: erf_gelu
        else:
            h = F.gelu(h, approximate="tanh")
        return self.c_proj(h)


class Block(nn.Module):
    def __init__(self, config: LearnerConfig, bug: str) -> None:
        super().__init__()
        eps = 0.1 if bug == "layernorm_eps" else config.layer_norm_epsilon  # bug: layernorm_eps
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=eps)
        self.attn = Attention(config, bug)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config, bug)
        self.bug = bug

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bug == "detach_residual":  # the forward is the same, the gradient is not
            x = x.detach() + self.attn(self.ln_1(x))  # bug: detach_residual
        else:
            x = x + self.attn(self.ln_1(x))  # ln_1 runs here
        return x + self.mlp(self.ln_2(x))


class LearnerGPT(nn.Module):
    def __init__(self, config: LearnerConfig, bug: str = "") -> None:
        super().__init__()
        self.config, self.bug = config, bug
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config, bug) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        T = idx.shape[1]
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(torch.arange(T))  # (T, C)
        if self.bug == "no_positions":
            x = self.transformer.drop(tok_emb)  # bug: no_positions
        else:
            x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if self.bug == "last_only":
            x = x[:, [-1], :]  # bug: last_only
        logits = self.lm_head(x)
        if self.bug == "tuple_output":
            loss = None if targets is None else F.cross_entropy(logits.flatten(0, 1),
                                                                targets.flatten())
            return logits, loss
        return logits


def pair(bug: str, *, seed: int = 0, attn: str = "explicit", reference_attn: str = "explicit"
         ) -> tuple[LearnerGPT, LearnerGPT]:
    """``(model with the bug, clean reference)``, same weights, both in eval mode; ``attn``:
    each side's attention, written out ("explicit") or ``F.scaled_dot_product_attention``."""
    torch.manual_seed(seed)
    reference = LearnerGPT(LearnerConfig(attn=reference_attn)).eval()
    model = LearnerGPT(LearnerConfig(attn=attn), bug=bug).eval()
    model.load_state_dict(reference.state_dict())
    return model, reference


def bug_line(bug: str) -> str:
    """``learner_gpt.py:LINE`` of the line marked ``# bug: NAME``."""
    with open(__file__) as source:
        for number, line in enumerate(source, start=1):
            if line.rstrip().endswith(f"# bug: {bug}"):
                return f"learner_gpt.py:{number}"
    raise LookupError(bug)
