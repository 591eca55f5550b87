"""GPT-2, written to be read and stepped through.

One file in the spirit of minGPT / nanoGPT, with the OpenAI / Hugging Face module names
(``transformer.h.3.attn.c_attn``, ``lm_head``, ...) so that the same module-path patterns and
state dicts work here and on Hugging Face's ``GPT2LMHeadModel``.

Shapes in the comments:  B batch, T tokens in this call, Tk tokens attended to (cache + T),
C n_embd, nh n_head, hs head size (C // nh), V vocab_size.

Attention has two paths that give the same numbers:
- ``explicit``: q, k, v, scores, mask, softmax weights and weighted sum, one named local per
  line: what you step through with F10 in the debugger.
- ``sdpa``: ``F.scaled_dot_product_attention``, the fast fused kernel.
``attn_impl="auto"`` (the default) takes the fast path unless someone may look inside: a hook
on one of attention's hook points (``attn.q``, ``attn.k``, ``attn.v``, ``attn.scores``,
``attn.att``), a global module hook, a debugger or tracer, or an op-level ``TorchFunctionMode``
(see ``hook_points.py``). So a breakpoint you set on the explicit path is hit under a debugger.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._guards import detect_fake_mode

from torchlens_edu.models.config import AttnImpl, GPT2Config
from torchlens_edu.models.hook_points import HookPoint, observed


class KVCache:
    """Keys and values of the tokens seen so far, preallocated for the whole context.

    Writing into a fixed buffer (instead of ``torch.cat`` at every step) keeps generation
    linear in the number of tokens.

    >>> m = GPT2(GPT2Config.preset("tiny")).eval()
    >>> cache = KVCache(m.config, 1, device=torch.device("cpu"), dtype=torch.float32)
    >>> _ = m(torch.zeros(1, 4, dtype=torch.long), cache)  # the prompt: 4 tokens
    >>> _ = m(torch.zeros(1, 1, dtype=torch.long), cache)  # one more, reading the 4 cached
    >>> cache.length
    5
    """

    def __init__(self, config: GPT2Config, batch_size: int, *, device: torch.device,
                 dtype: torch.dtype) -> None:
        shape = (batch_size, config.n_head, config.n_positions, config.head_size)
        layers = range(config.n_layer)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in layers]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in layers]
        self.length = 0  # tokens already stored

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this call's k, v for ``layer``; return every key/value so far (B, nh, Tk, hs).

        >>> config = GPT2Config.preset("tiny")  # nh=2, hs=16
        >>> cache = KVCache(config, 1, device=torch.device("cpu"), dtype=torch.float32)
        >>> k, v = cache.append(0, torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16))
        >>> k.shape
        torch.Size([1, 2, 3, 16])
        """
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


# True inside explicit_attention(); a context variable, so other threads keep the fast path
_explicit: ContextVar[bool] = ContextVar("torchlens_edu_explicit_attention", default=False)


@contextmanager
def explicit_attention() -> Iterator[None]:
    """Within this block (in this thread), ``attn_impl="auto"`` takes the explicit,
    step-through path.

    >>> with explicit_attention(): pass
    """
    token = _explicit.set(True)
    try:
        yield
    finally:
        _explicit.reset(token)  # the value before the block, also after an error or Ctrl-C


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.attn_impl = config.attn_impl
        self.layer_idx = layer_idx
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        # hook points of the explicit path: identities that observers hook (no parameters)
        self.q, self.k, self.v = HookPoint(), HookPoint(), HookPoint()
        self.scores, self.att = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape  # (B, T, C)
        nh, hs = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        past = cache.length if cache is not None else 0
        if cache is not None:
            k, v = cache.append(self.layer_idx, k, v)  # (B, nh, Tk, hs), Tk = past + T

        if self._use_explicit():
            q, k, v = self.q(q), self.k(k), self.v(v)  # hook points: observers see them here
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, Tk)
            mask = _causal_mask(T, past, x.device)  # (T, Tk): True where a query may look
            scores = self.scores(scores.masked_fill(~mask, float("-inf")))  # (B, nh, T, Tk)
            att = self.att(F.softmax(scores, dim=-1))  # (B, nh, T, Tk): each row sums to 1
            att = self.attn_dropout(att)  # (B, nh, T, Tk); a stop point pauses on this line
            y = att @ v  # (B, nh, T, hs)
        else:
            p = self.attn_dropout.p if self.training else 0.0
            if past == 0:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=T > 1)
            elif T == 1:  # one new query may look at every cached key: no mask to build
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
            else:  # new queries see the whole cache and the causal part of themselves
                mask = _causal_mask(T, past, x.device)  # (T, Tk)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
            # y: (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y))  # (B, T, C)

    def _use_explicit(self) -> bool:
        if self.attn_impl != "auto":
            return self.attn_impl == "explicit"
        return _explicit.get() or observed((self.q, self.k, self.v, self.scores, self.att))


def _causal_mask(T: int, past: int, device: torch.device) -> torch.Tensor:
    """``(T, past + T)`` booleans: query i (at position past + i) may see keys 0 .. past + i."""
    return torch.ones(T, past + T, dtype=torch.bool, device=device).tril(diagonal=past)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_width)
        self.c_proj = nn.Linear(config.mlp_width, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, 4C)
        h = F.gelu(h, approximate="tanh")  # (B, T, 4C): GPT-2 uses the tanh approximation
        return self.dropout(self.c_proj(h))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)  # (B, T, C): the residual stream
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


class Trunk(nn.ModuleDict):
    """``transformer``: the embeddings, the blocks and the final LayerNorm, under Hugging Face's
    names so that checkpoints load key for key. A ModuleDict that declares what it holds, so a
    type checker knows ``transformer.wte`` is an Embedding.

    >>> trunk = GPT2(GPT2Config.preset("tiny")).transformer
    >>> list(trunk), trunk.wte.embedding_dim
    (['wte', 'wpe', 'drop', 'h', 'ln_f'], 32)
    """

    wte: nn.Embedding  # token embeddings
    wpe: nn.Embedding  # learned position embeddings
    drop: nn.Dropout
    h: nn.ModuleList  # the blocks, in order
    ln_f: nn.LayerNorm


class GPT2(nn.Module):
    """The GPT-2 language model: token ids ``(B, T)`` in, next-token logits ``(B, T, V)`` out.

    >>> m = GPT2(GPT2Config.preset("tiny"))
    >>> m(torch.zeros(1, 5, dtype=torch.long)).shape
    torch.Size([1, 5, 256])
    """

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.name_or_path: str | None = None  # where from_pretrained loaded the weights from
        self.transformer = Trunk(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.n_positions, config.n_embd),  # learned position embeddings
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: the same (V, C) matrix
        if not any(p.is_meta for p in self.parameters()):
            self.apply(self._init_weights)
            # GPT-2 paper, section 2.3: the projections that write into the residual stream
            # (attn.c_proj, mlp.c_proj; 2 per block) get std 0.02 / sqrt(2 * n_layer), so the
            # stream's variance does not grow with depth. As nanoGPT does.
            residual_std = 0.02 / math.sqrt(2 * config.n_layer)
            for module in self.transformer.h.modules():
                if isinstance(module, (CausalSelfAttention, MLP)):
                    nn.init.normal_(module.c_proj.weight, mean=0.0, std=residual_std)

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2's initialisation: N(0, 0.02), zero biases, unit LayerNorm (the residual
        # projections are then scaled down in __init__).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def device(self) -> torch.device:
        """Where the weights are.

        >>> GPT2(GPT2Config.preset("tiny")).device
        device(type='cpu')
        """
        return self.transformer.wte.weight.device

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, *,
                last_only: bool = False) -> torch.Tensor:
        """Logits ``(B, T, V)`` for token ids ``(B, T)``; with ``last_only``, ``(B, 1, V)`` for
        the last position only (all that generation needs: the (T, C) x (C, V) matmul for
        every position is the biggest cost of a prompt's first step).

        >>> m = GPT2(GPT2Config.preset("tiny")).eval()
        >>> m(torch.zeros(2, 5, dtype=torch.long), last_only=True).shape
        torch.Size([2, 1, 256])
        """
        _check_ids(idx, self.config)
        T = idx.shape[1]  # idx: (B, T)
        past = cache.length if cache is not None else 0
        if past + T > self.config.n_positions:
            raise ValueError(f"{past + T} tokens do not fit GPT-2's context of "
                             f"{self.config.n_positions}; crop the input to the last "
                             f"{self.config.n_positions} tokens")
        pos = torch.arange(past, past + T, device=idx.device)  # (T,)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        pos_emb = self.transformer.wpe(pos)  # (T, C), broadcast over the batch
        x = self.transformer.drop(tok_emb + pos_emb)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, cache)  # (B, T, C)
        x = self.transformer.ln_f(x)  # (B, T, C)
        if cache is not None:
            cache.length += T
        if last_only:
            x = x[:, -1:, :]  # (B, 1, C)
        return self.lm_head(x)  # (B, T, V), or (B, 1, V) with last_only

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, seed: int | None = None,
                 use_cache: bool = True) -> torch.Tensor:
        """Append up to ``max_new_tokens`` sampled tokens to ``idx`` ``(B, T)``.

        ``temperature=0`` is greedy. Generation stops early, cleanly, when the context is full.

        >>> m = GPT2(GPT2Config.preset("tiny")).eval()
        >>> m.generate(torch.zeros(1, 3, dtype=torch.long), 4, temperature=0).shape
        torch.Size([1, 7])
        """
        return torch.cat(list(self.stream(idx, max_new_tokens, temperature=temperature,
                                          top_k=top_k, seed=seed, use_cache=use_cache)), dim=1)

    def stream(self, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
               top_k: int | None = None, seed: int | None = None,
               use_cache: bool = True) -> Iterator[torch.Tensor]:
        """Like :meth:`generate`, but yields ``idx`` first and then each new token ``(B, 1)``.

        Bad arguments raise here, at the call, not at the first ``next()``.

        >>> m = GPT2(GPT2Config.preset("tiny")).eval()
        >>> [t.shape[1] for t in m.stream(torch.zeros(1, 2, dtype=torch.long), 2, temperature=0)]
        [2, 1, 1]
        """
        _check_ids(idx, self.config)
        ctx = self.config.n_positions
        if idx.shape[1] > ctx:
            raise ValueError(f"the prompt has {idx.shape[1]} tokens, more than the context of "
                             f"{ctx}: keep the last {ctx} with idx[:, -{ctx}:]")
        _check_sampling(max_new_tokens, temperature, top_k, seed)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=idx.device).manual_seed(seed)
        steps = min(max_new_tokens, ctx - idx.shape[1])  # stop cleanly when the context is full
        return self._stream(idx, steps, float(temperature), top_k, generator, use_cache)

    @torch.no_grad()
    def _stream(self, idx: torch.Tensor, steps: int, temperature: float, top_k: int | None,
                generator: torch.Generator | None, use_cache: bool) -> Iterator[torch.Tensor]:
        yield idx
        if steps <= 0:
            return
        param = self.transformer.wte.weight
        cache = (KVCache(self.config, idx.shape[0], device=idx.device, dtype=param.dtype)
                 if use_cache else None)
        seq, feed = idx, idx
        for _ in range(steps):
            logits = self(feed, cache, last_only=True)[:, -1, :].float()  # (B, V)
            next_id = _sample(logits, temperature, top_k, generator)  # (B, 1)
            yield next_id
            seq = torch.cat([seq, next_id], dim=1)  # (B, T + 1)
            feed = next_id if cache is not None else seq

    @classmethod
    def from_pretrained(cls, name_or_path: str = "gpt2", *,
                        device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, progress: bool = True) -> GPT2:
        """Load GPT-2 weights: a preset name (``"gpt2"``, through the Hugging Face cache), a
        directory in Hugging Face layout, a single weights file, or ``"embedded"``.

        >>> m = GPT2.from_pretrained("embedded")  # doctest: +SKIP
        """
        from torchlens_edu.models.loading import load_pretrained

        return load_pretrained(cls, name_or_path, device=device, dtype=dtype, progress=progress)

    def num_params(self, *, count_tied_once: bool = True) -> int:
        """Parameter count; the tied ``lm_head``/``wte`` matrix counts once by default.

        >>> m = GPT2(GPT2Config.preset("tiny"))
        >>> m.num_params(), m.num_params(count_tied_once=False)  # wte is 256 x 32 = 8192
        (35712, 43904)
        """
        if count_tied_once:
            return sum(p.numel() for p in self.parameters())  # parameters() skips repeats
        return sum(p.numel() for _, p in self.named_parameters(remove_duplicate=False))

    def with_attn_impl(self, impl: AttnImpl) -> GPT2:
        """Switch every attention layer to ``impl`` (in place) and return the model.

        >>> GPT2(GPT2Config.preset("tiny")).with_attn_impl("explicit").config.attn_impl
        'explicit'
        """
        self.config = replace(self.config, attn_impl=impl)
        for module in self.transformer.h.modules():
            if isinstance(module, CausalSelfAttention):
                module.attn_impl = impl
        return self


def _check_ids(idx: torch.Tensor, config: GPT2Config) -> None:
    if not isinstance(idx, torch.Tensor):
        raise TypeError(f"GPT2 expects a tensor of token ids of shape (B, T), got "
                        f"{type(idx).__name__}; use torch.tensor([tokenizer.encode(text)])")
    if idx.dim() != 2:
        raise ValueError(f"GPT2 expects token ids of shape (B, T), got shape {tuple(idx.shape)}; "
                         "add a batch axis with idx[None] or idx.unsqueeze(0)")
    if idx.dtype not in (torch.long, torch.int):  # what nn.Embedding accepts
        raise TypeError(f"token ids must be torch.long (or torch.int), got {idx.dtype}; "
                        "use idx.long()")
    if idx.numel() == 0:
        raise ValueError(f"no token ids (shape {tuple(idx.shape)}): give at least one token, "
                         "e.g. torch.tensor([tokenizer.encode(text)]) with a non-empty text")
    if idx.is_meta or torch.compiler.is_compiling() or detect_fake_mode((idx,)) is not None:
        return  # shapes only (meta, fake tensors, a compile trace): no values to check
    # An id outside the vocabulary is an IndexError deep in nn.Embedding on CPU and a
    # device-side assert on CUDA. One reduction finds it; hidden from torch-function modes so
    # that an op-level trace shows the model's ops, not this check.
    with torch._C.DisableTorchFunction():
        low, high = (int(v) for v in torch.aminmax(idx))
    if low < 0 or high >= config.vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"token id {bad} is outside this model's vocabulary of "
                         f"{config.vocab_size} ids (0..{config.vocab_size - 1}); were the ids "
                         "made by another model's tokenizer? use get_tokenizer(model)")


def _check_sampling(max_new_tokens: object, temperature: object, top_k: object,
                    seed: object) -> None:
    """Refuse what would otherwise silently return the prompt or fail inside torch."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or (
            max_new_tokens < 0):
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    if (not isinstance(temperature, (int, float)) or isinstance(temperature, bool)
            or not math.isfinite(temperature) or temperature < 0):
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 "
                         "(0 means greedy, 1 samples from the model's own distribution)")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool)
                              or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be a positive number of candidates or None")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)
                             or not -2**63 <= seed < 2**64):
        raise ValueError(f"seed={seed!r} must be an integer in [-2**63, 2**64) or None")


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None,
            generator: torch.Generator | None) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1): greedy
    logits = logits / temperature  # (B, V)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))  # (B, V)
    probs = F.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)
