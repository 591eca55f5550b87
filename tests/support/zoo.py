"""A zoo of small models that every observer (hooks, capture, inspect, shape traces) must handle.

Each entry builds a model from a tiny config with seeded random weights (no downloads) and
gives inputs for one forward: ``model(*args, **kwargs)``. The families cover the containers and
call patterns that break naive hooks: tuples, dicts, dataclass outputs (Hugging Face
``ModelOutput``), modules called twice per forward, in-place ops right after a hooked module,
keyword-only inputs, encoder-decoders and recurrent nets.

>>> entry = ZOO_BY_NAME["mlp_twice"]
>>> model = entry.build(); args, kwargs = entry.inputs()
>>> model(*args, **kwargs).shape
torch.Size([3, 8])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass(frozen=True)
class ZooEntry:
    """One model family: ``build()`` -> model in eval mode, ``inputs()`` -> ``(args, kwargs)``."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], Inputs]
    needs: str | None = None  # optional package the family comes from (skip when missing)

    def run(self, model: nn.Module | None = None) -> Any:
        """Build (unless given) and run one forward."""
        model = self.build() if model is None else model
        args, kwargs = self.inputs()
        return model(*args, **kwargs)

    def build_or_skip(self) -> nn.Module:
        """``build()``, skipping the test when the family's package is not installed."""
        if self.needs:
            import pytest

            pytest.importorskip(self.needs)
        return self.build()


def reference_outputs(model: nn.Module, entry: ZooEntry
                      ) -> list[tuple[str, int, list[torch.Tensor]]]:
    """``(path, call, output tensors)`` of every module call, in the order the calls finish,
    recorded by plain torch forward hooks that share nothing with torchlens_edu: the reference
    every observer is compared against. Tensors are detached clones."""
    seen: list[tuple[str, int, list[torch.Tensor]]] = []
    calls: dict[str, int] = {}

    def record(path: str, out: object) -> None:
        from torchlens_edu._core.tree import iter_tensors

        calls[path] = calls.get(path, -1) + 1
        seen.append((path, calls[path], [t.detach().clone() for t in iter_tensors(out)]))

    # hook points (identities that only name a tensor: our GPT-2's attn.q ... attn.att) are
    # left out, as every observer leaves them out unless a pattern names them
    handles = [m.register_forward_hook(lambda mod, a, out, path=path: record(path, out))
               for path, m in model.named_modules()
               if not getattr(type(m), "is_hook_point", False)]
    try:
        with torch.no_grad():
            entry.run(model)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ids(batch: int, tokens: int, vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, tokens), generator=_gen(seed))


def _seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def seeded_build() -> nn.Module:
        torch.manual_seed(0)
        return build().eval()

    seeded_build.__name__ = getattr(build, "__name__", "build")
    return seeded_build


# --- our GPT-2 ------------------------------------------------------------------------------

def _our_gpt2() -> nn.Module:
    from torchlens_edu.models import GPT2, GPT2Config

    return GPT2(GPT2Config.preset("tiny"))


# --- Hugging Face (transformers) ------------------------------------------------------------

def _hf_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def _hf_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    return BertModel(config)


def _hf_t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=256, d_model=32, d_kv=16, d_ff=64, num_layers=2,
                      num_decoder_layers=2, num_heads=2, decoder_start_token_id=0)
    return T5ForConditionalGeneration(config)


def _hf_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    return LlamaForCausalLM(config)


def _t5_inputs() -> Inputs:
    return (), {"input_ids": _ids(2, 8, 256), "decoder_input_ids": _ids(2, 5, 256, seed=2)}


# --- TransformerLens -----------------------------------------------------------------------

def _hooked_transformer() -> nn.Module:
    """TransformerLens: ``TransformerBridge`` around its native model (TL >= 4, which removed
    ``HookedTransformer``), or ``HookedTransformer`` on TL 2 / 3. Both are full of HookPoints."""
    cfg = dict(n_layers=2, d_model=32, d_head=16, n_heads=2, d_mlp=64, d_vocab=256, n_ctx=64,
               act_fn="gelu", normalization_type="LN", device="cpu", seed=0)
    try:
        from transformer_lens import TransformerBridge, TransformerBridgeConfig
    except ImportError:
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        return HookedTransformer(HookedTransformerConfig(**cfg))
    bridge = TransformerBridge.boot_native(TransformerBridgeConfig(**cfg))
    # Its first forward with grad adds forward-pre hooks of its own (to its LayerNorms): run
    # one now, so that checks for hooks left behind compare against the settled model.
    bridge(_ids(1, 4, 256)).sum().backward()
    bridge.zero_grad(set_to_none=True)
    return bridge


# --- plain PyTorch -------------------------------------------------------------------------

def _nn_transformer() -> nn.Module:
    return nn.Transformer(d_model=32, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                          dim_feedforward=64, dropout=0.0, batch_first=True)


def _nn_transformer_inputs() -> Inputs:
    g = _gen(1)
    return (torch.randn(2, 7, 32, generator=g), torch.randn(2, 5, 32, generator=g)), {}


class LSTMTagger(nn.Module):
    """Embedding -> 2-layer LSTM -> per-token classifier; the LSTM returns ``(out, (h, c))``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.lstm = nn.LSTM(16, 24, num_layers=2, batch_first=True)
        self.head = nn.Linear(24, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, (_h, _c) = self.lstm(self.embed(ids))  # out: (B, T, 24)
        return self.head(out)  # (B, T, 5)


class SmallCNN(nn.Module):
    """Two conv blocks with batch norm and pooling, then a linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(16, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(images).flatten(1))  # (B, 10)


class DictHeads(nn.Module):
    """Submodules that return dicts and a nested dict/list output."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = _DictTrunk()
        self.cls = nn.Linear(16, 3)
        self.reg = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        feats = self.trunk(x)
        return {"logits": self.cls(feats["pooled"]),
                "extra": [self.reg(feats["pooled"]), feats["tokens"]]}


class _DictTrunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = torch.tanh(self.proj(x))  # (B, T, 16)
        return {"tokens": tokens, "pooled": tokens.mean(dim=1)}


class MLPTwice(nn.Module):
    """One block applied twice per forward (weight sharing across depth)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(8, 8), nn.GELU())
        self.out = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.block(self.block(x)))


class InplaceAfter(nn.Module):
    """In-place ops on a module's output: the case ``register_full_backward_hook`` breaks."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 16)
        self.act = nn.ReLU(inplace=True)
        self.fc3 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h.mul_(2.0)  # in place, right after fc1
        h = self.act(self.fc2(h))  # ReLU(inplace=True) writes into fc2's output
        out = self.fc3(h)
        out += 1.0  # in place on the last module's output
        return out


class KwargsOnly(nn.Module):
    """A forward that takes keyword-only inputs (like many Hugging Face models)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.mix(self.embed(input_ids)) * attention_mask.unsqueeze(-1)
        return self.head(F.relu(h)).sum(dim=1)  # (B, 4)


class SharedHead(nn.Module):
    """A tied projection registered under two parents, as tutorials write it: ``head`` is
    reachable as ``head`` and ``decoder.proj``, and its weight is the embedding's."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 16, bias=False)
        self.decoder = nn.Module()
        self.decoder.proj = self.head
        self.head.weight = self.emb.weight
        self.register_buffer("scale", torch.ones(8))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decoder.proj(self.emb(ids) * self.scale)


# --- checking that an observer left the model as it found it --------------------------------

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
               "_forward_hooks_always_called")
_GLOBAL_HOOK_DICTS = ("_global_forward_hooks", "_global_forward_pre_hooks",
                      "_global_backward_hooks", "_global_backward_pre_hooks")


class ModelGuard:
    """Snapshot of a model's state and hooks; :meth:`check` asserts nothing changed.

    Compares the state dict bit for bit, the parameter and buffer objects (by identity, under
    every path that reaches them), every module's hook dictionaries and training flag, torch's
    global module hooks, and (given tensors) that no tensor hook is left on them.

    >>> guard = ModelGuard(nn.Linear(2, 2))
    >>> guard.check()
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.state = {k: _bits(v) for k, v in model.state_dict(keep_vars=True).items()}
        self.tensors = self._tensors()
        self.hooks = self._hooks()
        self.training = [m.training for m in model.modules()]

    def _tensors(self) -> list[tuple[str, str, torch.Tensor | None]]:
        """Every parameter and buffer object under every path that reaches it (a module shared
        by two parents is listed twice), read from the modules' own dicts: models may override
        ``named_parameters``/``state_dict``. The objects themselves are kept, not their ids,
        which a new tensor could reuse."""
        return [(path, name, t) for path, m in self.model.named_modules(remove_duplicate=False)
                for name, t in (*m._parameters.items(), *m._buffers.items())]

    def _hooks(self) -> list[tuple[str, str, tuple]]:
        import torch.nn.modules.module as module_mod

        found = [(path, name, tuple(getattr(m, name, {}) or {}))
                 for path, m in self.model.named_modules() for name in _HOOK_DICTS]
        found += [("<global>", name, tuple(getattr(module_mod, name)))
                  for name in _GLOBAL_HOOK_DICTS]
        return found

    def check(self, *tensors: Any) -> None:
        now = self._tensors()
        assert [(p, n) for p, n, _ in now] == [(p, n) for p, n, _ in self.tensors], \
            "a parameter or buffer was added or removed"
        for (path, name, tensor), (_, _, before) in zip(now, self.tensors, strict=True):
            where = f"{path}.{name}" if path else name
            assert tensor is before, f"{where} is not the same tensor object any more " \
                f"(now on {getattr(tensor, 'device', None)})"
        state = {k: _bits(v) for k, v in self.model.state_dict(keep_vars=True).items()}
        assert state.keys() == self.state.keys(), "the state dict's keys changed"
        for key, bits in state.items():
            assert bits.dtype == self.state[key].dtype and torch.equal(bits, self.state[key]), \
                f"{key} changed"
        assert self._hooks() == self.hooks, "a module hook was left behind"
        assert [m.training for m in self.model.modules()] == self.training, "train/eval changed"
        from torchlens_edu._core.tree import iter_tensors

        for tensor in iter_tensors(list(tensors)):
            assert not tensor._backward_hooks, "a tensor hook was left on an output"


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a tensor (so that -0.0 != 0.0 and NaN == NaN), as a CPU copy."""
    data = tensor.detach().cpu().contiguous().clone()
    return data.view(torch.uint8) if data.dim() and data.element_size() else data


ZOO: list[ZooEntry] = [
    ZooEntry("gpt2_ours", _seeded(_our_gpt2), lambda: ((_ids(2, 8, 256),), {})),
    ZooEntry("hf_gpt2", _seeded(_hf_gpt2), lambda: ((_ids(2, 8, 256),), {}), "transformers"),
    ZooEntry("hf_bert", _seeded(_hf_bert),
             lambda: ((), {"input_ids": _ids(2, 8, 256),
                           "attention_mask": torch.ones(2, 8, dtype=torch.long)}),
             "transformers"),
    ZooEntry("hf_t5", _seeded(_hf_t5), _t5_inputs, "transformers"),
    ZooEntry("hf_llama", _seeded(_hf_llama), lambda: ((_ids(2, 8, 256),), {}), "transformers"),
    ZooEntry("hooked_transformer", _seeded(_hooked_transformer),
             lambda: ((_ids(2, 8, 256),), {}), "transformer_lens"),
    ZooEntry("nn_transformer", _seeded(_nn_transformer), _nn_transformer_inputs),
    ZooEntry("lstm", _seeded(LSTMTagger), lambda: ((_ids(2, 6, 50),), {})),
    ZooEntry("cnn", _seeded(SmallCNN),
             lambda: ((torch.randn(2, 3, 16, 16, generator=_gen(1)),), {})),
    ZooEntry("dict_outputs", _seeded(DictHeads),
             lambda: ((torch.randn(2, 5, 8, generator=_gen(1)),), {})),
    ZooEntry("mlp_twice", _seeded(MLPTwice), lambda: ((torch.randn(3, 8, generator=_gen(1)),), {})),
    ZooEntry("inplace_after", _seeded(InplaceAfter),
             lambda: ((torch.randn(3, 8, generator=_gen(1)),), {})),
    ZooEntry("kwargs_only", _seeded(KwargsOnly),
             lambda: ((), {"input_ids": _ids(2, 6, 32),
                           "attention_mask": torch.ones(2, 6)})),
]
ZOO_BY_NAME: dict[str, ZooEntry] = {entry.name: entry for entry in ZOO}
