"""What the bundled GPT-2's heads do: attention patterns, previous-token and induction heads.

The patterns come from the ``att`` hook point of every layer (``transformer.h.N.attn.att``),
read with ordinary forward hooks: the numbers the model really used, not a recomputation.
Torch only, like the rest of ``models/``.
"""

from __future__ import annotations

import torch

from torchlens_edu.models.gpt2 import GPT2, CausalSelfAttention
from torchlens_edu.models.tokenizer import Tokenizer


@torch.no_grad()
def attention_weights(model: GPT2, idx: torch.Tensor) -> torch.Tensor:
    """Every layer's attention pattern ``(L, B, nh, T, T)`` for token ids ``idx`` ``(B, T)``.

    >>> from torchlens_edu.models import GPT2Config
    >>> m = GPT2(GPT2Config.preset("tiny")).eval()
    >>> attention_weights(m, torch.zeros(1, 5, dtype=torch.long)).shape
    torch.Size([2, 1, 2, 5, 5])
    """
    patterns: list[torch.Tensor] = []  # one (B, nh, T, T) per layer, in call order
    handles = [attn.att.register_forward_hook(
        lambda _module, _args, att: patterns.append(att.detach()))
        for attn in model.modules() if isinstance(attn, CausalSelfAttention)]
    try:
        model(idx)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(patterns)  # (L, B, nh, T, T)


def previous_token_head(att: torch.Tensor) -> tuple[int, int, float]:
    """``(layer, head, score)`` of the head that looks most at the previous token.

    ``att``: ``(L, nh, T, T)``; the score is the mean weight on key ``t - 1`` from query ``t``.

    >>> previous_token_head(torch.diag(torch.ones(3), -1).expand(2, 3, 4, 4))  # (L, nh, T, T)
    (0, 0, 1.0)
    """
    T = att.shape[-1]
    prev = att[..., torch.arange(1, T), torch.arange(T - 1)].mean(-1)  # (L, nh)
    layer, head = divmod(int(prev.argmax()), att.shape[1])
    return layer, head, float(prev[layer, head])


def induction_head(model: GPT2, tok: Tokenizer, n: int | None = None
                   ) -> tuple[int, int, float]:
    """``(layer, head, score)`` of the head that best copies: on a random string of ``n``
    letters repeated once, the mean weight of query ``n + i`` on key ``i + 1``.

    ``n`` defaults to 40 letters, or half the context when that is shorter (the embedded
    model reads 64 tokens: 32 letters, twice).

    >>> from torchlens_edu.models import get_tokenizer
    >>> m, tok = GPT2.from_pretrained("embedded", progress=False), get_tokenizer("embedded")
    >>> induction_head(m, tok)  # doctest: +ELLIPSIS
    (1, 3, 0.88...)
    """
    ctx = model.config.n_positions
    n = min(40, ctx // 2) if n is None else n
    if not 2 <= n <= ctx // 2:
        raise ValueError(f"n={n}: the string is seen twice, so 2 * n must fit the context of "
                         f"{ctx} tokens; give n between 2 and {ctx // 2}")
    # one token per letter, also for GPT-2's BPE (which would merge "abc")
    letters = torch.tensor([tok.encode(c)[0] for c in " abcdefghijklmnopqrstuvwxyz"])
    pick = torch.randint(len(letters), (n,), generator=torch.Generator().manual_seed(0))
    idx = torch.cat([letters[pick], letters[pick]])[None].to(model.device)  # (1, 2n)
    att = attention_weights(model, idx)[:, 0]  # (L, nh, 2n, 2n)
    score = att[..., torch.arange(n, 2 * n - 1), torch.arange(1, n)].mean(-1)  # (L, nh)
    layer, head = divmod(int(score.argmax()), score.shape[1])
    return layer, head, float(score[layer, head])
