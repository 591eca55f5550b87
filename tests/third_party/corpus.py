"""Models we did not write, built small with seeded random weights on CPU: from the packages a
learner uses (x-transformers, Hugging Face, TransformerLens) and in the styles learners copy
(nanoGPT's ``bias`` buffer mask, minGPT's ``ModuleDict`` called through a lambda, tutorial
masks with ``-1e9`` and ``finfo.min``, a tied projection registered under two parents, einops).

Each :class:`Specimen` builds the model in eval mode and its inputs, and names a module of its
MLP (where faults are planted) and a linear layer on the model's width (which the shape bug
replaces by one built for the wrong width).

>>> specimen = CORPUS_BY_NAME["nanogpt_bias_mask"]
>>> specimen.build()(*specimen.inputs()[0]).shape
torch.Size([2, 8, 64])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

Inputs = tuple[tuple[Any, ...], dict[str, Any]]
V, C, NH, T, B = 64, 32, 4, 8, 2  # vocabulary, width, heads, tokens, batch


@dataclass(frozen=True, kw_only=True)
class Specimen:
    """One model of the corpus and where to plant faults in it."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], Inputs]
    mlp_in: str  # path of a Linear that widens the features in an MLP (C -> ff)
    needs: str | None = None  # the package it comes from (the test skips without it)

    def model(self) -> nn.Module:
        """The model, seeded, in eval mode (skips the test when the package is missing)."""
        if self.needs:
            import pytest

            pytest.importorskip(self.needs)
        torch.manual_seed(0)
        return self.build().eval()


def padded_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy to compare: a nested tensor (nn.TransformerEncoder's padding fast path) padded."""
    return (t.to_padded_tensor(0.0) if t.is_nested else t).detach().clone()


def _ids(seed: int = 1, tokens: int = T) -> torch.Tensor:
    return torch.randint(0, V, (B, tokens), generator=torch.Generator().manual_seed(seed))


def _padding_mask(tokens: int = T) -> torch.Tensor:
    mask = torch.ones(B, tokens, dtype=torch.long)
    mask[1, tokens - 3:] = 0  # the second sequence is padded
    return mask


# --- hand-written, in the styles learners copy ------------------------------------------------

class NanoAttention(nn.Module):
    """nanoGPT's attention: a lower-triangular ``bias`` buffer, masked with -inf."""

    def __init__(self, n_embd: int, n_head: int, block_size: int, fill: str = "-inf") -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd, self.fill = n_head, n_embd, fill
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size))
                             .view(1, 1, block_size, block_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, T)
        fill = {"-inf": float("-inf"), "-1e9": -1e9,
                "finfo.min": torch.finfo(att.dtype).min}[self.fill]
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, fill)
        att = F.softmax(att, dim=-1)
        y = att @ v  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class NanoBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int, block_size: int, fill: str) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = NanoAttention(n_embd, n_head, block_size, fill)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(self.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """nanoGPT without a config object: sizes are plain attributes, the head is tied."""

    def __init__(self, fill: str = "-inf", block_size: int = 16) -> None:
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(V, C)
        self.wpe = nn.Embedding(block_size, C)
        self.h = nn.ModuleList([NanoBlock(C, NH, block_size, fill) for _ in range(2)])
        self.ln_f = nn.LayerNorm(C)
        self.lm_head = nn.Linear(C, V, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying, as nanoGPT does

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        _, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)  # (t,)
        x = self.wte(idx) + self.wpe(pos)  # (B, t, C)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (b, t, V)


class MinGPTBlock(nn.Module):
    """minGPT's block: the MLP is a ModuleDict whose children are called through a lambda."""

    def __init__(self) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(C)
        self.attn = NanoAttention(C, NH, 16, fill="-1e9")
        self.ln_2 = nn.LayerNorm(C)
        self.mlp = nn.ModuleDict(dict(
            c_fc=nn.Linear(C, 4 * C), c_proj=nn.Linear(4 * C, C), act=nn.GELU(),
            dropout=nn.Dropout(0.0)))
        m = self.mlp
        self.mlpf = lambda x: m.dropout(m.c_proj(m.act(m.c_fc(x))))  # MLP forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlpf(self.ln_2(x))


class MinGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, C), wpe=nn.Embedding(16, C), drop=nn.Dropout(0.0),
            h=nn.ModuleList([MinGPTBlock() for _ in range(2)]), ln_f=nn.LayerNorm(C)))
        self.lm_head = nn.Linear(C, V, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device).unsqueeze(0)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


class TutorialAttention(nn.Module):
    """The Annotated Transformer's multi-head attention: ``h`` heads of ``d_k``, a padding
    mask filled with ``finfo.min``."""

    def __init__(self, h: int, d_model: int) -> None:
        super().__init__()
        self.d_k, self.h = d_model // h, h
        self.linears = nn.ModuleList([nn.Linear(d_model, d_model) for _ in range(4)])

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        nbatches = query.size(0)
        query, key, value = [lin(x).view(nbatches, -1, self.h, self.d_k).transpose(1, 2)
                             for lin, x in zip(self.linears, (query, key, value), strict=False)]
        scores = torch.matmul(query, key.transpose(-2, -1)) / math.sqrt(self.d_k)
        scores = scores.masked_fill(mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
        x = torch.matmul(scores.softmax(dim=-1), value)  # (B, h, T, d_k)
        x = x.transpose(1, 2).contiguous().view(nbatches, -1, self.h * self.d_k)
        return self.linears[-1](x)


class TutorialEncoder(nn.Module):
    """A from-scratch BERT-style encoder with a tied projection registered under two parents:
    ``generator.proj`` and ``mlm.decoder`` are one Linear, whose weight is the embedding's."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, C)
        self.attn = TutorialAttention(NH, C)
        self.norm = nn.LayerNorm(C)
        self.ff = nn.Sequential(nn.Linear(C, 2 * C), nn.ReLU(), nn.Linear(2 * C, C))
        self.generator = nn.Module()
        self.generator.proj = nn.Linear(C, V)
        self.mlm = nn.Module()
        self.mlm.decoder = self.generator.proj  # the same module under a second parent
        self.generator.proj.weight = self.embed.weight

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) * math.sqrt(C)
        x = self.norm(x + self.attn(x, x, x, mask))
        x = x + self.ff(x)
        return self.mlm.decoder(x)  # (B, T, V)


class EinopsAttention(nn.Module):
    """Attention written with einops and einsum, as many research repositories do."""

    def __init__(self, dim: int = C, heads: int = NH) -> None:
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.embed = nn.Embedding(V, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from einops import rearrange

        x = self.embed(ids)
        q, k, v = rearrange(self.to_qkv(x), "b n (three h d) -> three b h n d", three=3,
                            h=self.heads)
        sim = torch.einsum("b h i d, b h j d -> b h i j", q, k) * q.shape[-1] ** -0.5
        out = torch.einsum("b h i j, b h j d -> b h i d", sim.softmax(dim=-1), v)
        x = x + self.to_out(rearrange(out, "b h n d -> b n (h d)"))
        return x + self.ff(x)


def precompute_freqs_cis(dim: int, end: int, theta: float = 10000.0) -> torch.Tensor:
    """Llama-from-scratch rotary frequencies as complex numbers (``torch.polar``)."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2)[: (dim // 2)].float() / dim))
    t = torch.arange(end)
    freqs = torch.outer(t, freqs).float()  # (end, dim/2)
    return torch.polar(torch.ones_like(freqs), freqs)  # complex64


def apply_rotary_emb(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))  # (B, T, nh, hs/2)
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))
    freqs_cis = freqs_cis[: xq.shape[1]].view(1, xq.shape[1], 1, xq_.shape[-1])
    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3)  # @rotary
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3)
    return xq_out.type_as(xq), xk_out.type_as(xk)


class ComplexRotaryLlama(nn.Module):
    """A Llama written from scratch with complex rotary embeddings, RMSNorm and SwiGLU."""

    def __init__(self) -> None:
        super().__init__()
        self.n_heads, self.head_dim = NH, C // NH
        self.tok_embeddings = nn.Embedding(V, C)
        self.attention_norm, self.ffn_norm = nn.RMSNorm(C), nn.RMSNorm(C)
        self.wq, self.wk = nn.Linear(C, C, bias=False), nn.Linear(C, C, bias=False)
        self.wv, self.wo = nn.Linear(C, C, bias=False), nn.Linear(C, C, bias=False)
        self.w1, self.w3 = nn.Linear(C, 3 * C, bias=False), nn.Linear(C, 3 * C, bias=False)
        self.w2 = nn.Linear(3 * C, C, bias=False)
        self.output = nn.Linear(C, V, bias=False)
        self.register_buffer("freqs_cis", precompute_freqs_cis(C // NH, 16), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok_embeddings(tokens)  # (B, T, C)
        b, t, _ = x.shape
        h = self.attention_norm(x)
        q = self.wq(h).view(b, t, self.n_heads, self.head_dim)  # (B, T, nh, hs)
        k = self.wk(h).view(b, t, self.n_heads, self.head_dim)
        v = self.wv(h).view(b, t, self.n_heads, self.head_dim)
        q, k = apply_rotary_emb(q, k, self.freqs_cis)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                           v.transpose(1, 2), is_causal=True)  # (B, nh, T, hs)
        x = x + self.wo(y.transpose(1, 2).reshape(b, t, -1))
        h = self.ffn_norm(x)
        x = x + self.w2(F.silu(self.w1(h)) * self.w3(h))
        return self.output(x)  # (B, T, V)


# --- from packages ----------------------------------------------------------------------------

def _x_decoder() -> nn.Module:
    from x_transformers import Decoder, TransformerWrapper

    return TransformerWrapper(num_tokens=V, max_seq_len=16, attn_layers=Decoder(
        dim=C, depth=2, heads=NH, attn_kv_heads=2, attn_dim_head=8, rotary_pos_emb=True,
        rotary_emb_dim=8))


def _x_encoder_decoder() -> nn.Module:
    from x_transformers import XTransformer

    return XTransformer(dim=C, enc_num_tokens=V, enc_depth=1, enc_heads=2, enc_max_seq_len=16,
                        dec_num_tokens=V, dec_depth=1, dec_heads=2, dec_max_seq_len=16,
                        tie_token_emb=True)


def _hf_t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(
        vocab_size=V, d_model=C, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
        num_heads=NH, decoder_start_token_id=0, pad_token_id=0))


def _hf_bart() -> nn.Module:
    from transformers import BartConfig, BartForConditionalGeneration

    return BartForConditionalGeneration(BartConfig(
        vocab_size=V, d_model=C, encoder_layers=1, decoder_layers=1, encoder_attention_heads=NH,
        decoder_attention_heads=NH, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=32, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2, forced_eos_token_id=None))


def _hf_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=V, hidden_size=C, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=NH, num_key_value_heads=2, max_position_embeddings=32))


def _hf_qwen2() -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=V, hidden_size=C, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=NH, num_key_value_heads=2, max_position_embeddings=32))


def _hf_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(
        vocab_size=V, hidden_size=C, num_hidden_layers=1, num_attention_heads=NH,
        intermediate_size=64, max_position_embeddings=32))


def _hooked_transformer() -> nn.Module:
    """TransformerLens: its native model inside a ``TransformerBridge`` (TL >= 4 removed
    ``HookedTransformer``; the zoo's builder takes whichever the installed version has)."""
    from support.zoo import ZOO_BY_NAME

    return ZOO_BY_NAME["hooked_transformer"].build()


def _torch_encoder() -> nn.Module:
    """PyTorch's own encoder, as learners build it: in eval under no_grad, with no hook on it,
    it takes a fused fast path (test_torch_modules.py: with a padding mask it packs the batch
    into a nested tensor)."""
    layer = nn.TransformerEncoderLayer(C, NH, 2 * C, dropout=0.1, batch_first=True)
    return nn.TransformerEncoder(layer, 2)


def _embedded(ids: torch.Tensor) -> torch.Tensor:
    return torch.randn(*ids.shape, C, generator=torch.Generator().manual_seed(3))


def _seq2seq_inputs() -> Inputs:
    return (), {"input_ids": _ids(), "attention_mask": _padding_mask(),
                "decoder_input_ids": _ids(seed=2, tokens=5)}


CORPUS: list[Specimen] = [
    Specimen(name="nanogpt_bias_mask", build=NanoGPT, inputs=lambda: ((_ids(),), {}),
             mlp_in="h.0.c_fc"),
    Specimen(name="nanogpt_minus_1e9", build=lambda: NanoGPT(fill="-1e9"),
             inputs=lambda: ((_ids(),), {}), mlp_in="h.1.c_fc"),
    Specimen(name="nanogpt_finfo_min", build=lambda: NanoGPT(fill="finfo.min"),
             inputs=lambda: ((_ids(),), {}), mlp_in="h.0.c_fc"),
    Specimen(name="mingpt_moduledict_lambda", build=MinGPT, inputs=lambda: ((_ids(),), {}),
             mlp_in="transformer.h.0.mlp.c_fc"),
    Specimen(name="tutorial_tied_two_parents", build=TutorialEncoder,
             inputs=lambda: ((_ids(), _padding_mask()), {}), mlp_in="ff.0"),
    Specimen(name="llama_complex_rotary", build=ComplexRotaryLlama,
             inputs=lambda: ((_ids(),), {}), mlp_in="w1"),
    Specimen(name="einops_attention", build=EinopsAttention, inputs=lambda: ((_ids(),), {}),
             mlp_in="ff.0", needs="einops"),
    Specimen(name="x_decoder_rotary_gqa", build=_x_decoder, inputs=lambda: ((_ids(),), {}),
             mlp_in="attn_layers.layers.1.1.ff.0.0", needs="x_transformers"),
    Specimen(name="x_encoder_decoder_tied", build=_x_encoder_decoder,
             inputs=lambda: ((_ids(), _ids(seed=2, tokens=5)),
                             {"mask": _padding_mask().bool()}),
             mlp_in="encoder.attn_layers.layers.1.1.ff.0.0", needs="x_transformers"),
    Specimen(name="hf_t5", build=_hf_t5, inputs=_seq2seq_inputs,
             mlp_in="encoder.block.0.layer.1.DenseReluDense.wi", needs="transformers"),
    Specimen(name="hf_bart", build=_hf_bart, inputs=_seq2seq_inputs,
             mlp_in="model.encoder.layers.0.fc1", needs="transformers"),
    Specimen(name="hf_llama", build=_hf_llama,
             inputs=lambda: ((), {"input_ids": _ids(), "attention_mask": _padding_mask()}),
             mlp_in="model.layers.0.mlp.up_proj", needs="transformers"),
    Specimen(name="hf_qwen2", build=_hf_qwen2,
             inputs=lambda: ((), {"input_ids": _ids(), "attention_mask": _padding_mask()}),
             mlp_in="model.layers.0.mlp.up_proj", needs="transformers"),
    Specimen(name="hf_bert_padding", build=_hf_bert,
             inputs=lambda: ((), {"input_ids": _ids(), "attention_mask": _padding_mask()}),
             mlp_in="encoder.layer.0.intermediate.dense", needs="transformers"),
    Specimen(name="torch_transformer_encoder", build=_torch_encoder,
             inputs=lambda: ((_embedded(_ids()),), {}),
             mlp_in="layers.0.linear1"),
    Specimen(name="hooked_transformer", build=_hooked_transformer,
             inputs=lambda: ((_ids(),), {}), needs="transformer_lens",
             mlp_in="blocks.0._original_component.mlp._original_component.fc_in"
                    "._original_component"),
]
CORPUS_BY_NAME: dict[str, Specimen] = {s.name: s for s in CORPUS}
