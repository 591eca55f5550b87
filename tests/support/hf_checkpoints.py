"""Small random Hugging Face GPT-2 checkpoints, saved the ways people meet them.

``GPT2LMHeadModel`` (transformers, the independent reference) is built at a few shapes with every
parameter randomised (biases and LayerNorm weights too, so that none of them can be silently
dropped), then written as:
- ``save_pretrained`` (config.json + model.safetensors, ``transformer.``-prefixed keys);
- ``pytorch_model.bin`` through ``torch.save`` with bare keys and the ``attn.bias`` /
  ``attn.masked_bias`` buffers, like OpenAI's original ``gpt2`` upload;
- a fake Hugging Face hub cache: ``models--<repo>/snapshots/<hash>/...`` + ``refs/main``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

# name -> GPT2Config fields: square and non-square MLPs, one and several heads, odd vocab sizes
SHAPES: dict[str, dict[str, Any]] = {
    "2L-32C-2h": dict(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64),
    "3L-48C-4h-inner80": dict(n_layer=3, n_head=4, n_embd=48, n_inner=80, vocab_size=131,
                              n_positions=40, layer_norm_epsilon=1e-6),
    "1L-64C-1h": dict(n_layer=1, n_head=1, n_embd=64, vocab_size=64, n_positions=32),
}


def hf_model(shape: str = "2L-32C-2h", *, seed: int = 0, **overrides: Any):
    """A random ``GPT2LMHeadModel`` of ``shape`` in eval mode with eager (reference) attention."""
    from transformers import GPT2Config, GPT2LMHeadModel

    fields = {**SHAPES[shape], **overrides}
    config = GPT2Config(**fields, bos_token_id=0, eos_token_id=0,
                        attn_implementation="eager")
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # lm_head is tied to wte: perturbed once, stays tied
            p.add_(torch.randn_like(p) * 0.05)
    return model


def save_safetensors(model, directory: Path) -> Path:
    """``save_pretrained``: config.json + model.safetensors (``transformer.``-prefixed keys)."""
    model.save_pretrained(directory)
    return directory


def save_bin(model, directory: Path, *, bare_keys: bool = True, buffers: bool = True) -> Path:
    """config.json + pytorch_model.bin, by default shaped like OpenAI's ``gpt2`` upload."""
    directory.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(directory / "config.json")
    state = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    if buffers:  # HF used to save the causal-mask buffers; loaders must skip them
        ctx = model.config.n_positions
        for i in range(model.config.n_layer):
            state[f"transformer.h.{i}.attn.bias"] = torch.ones(ctx, ctx).tril().view(1, 1, ctx, ctx)
            state[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    if bare_keys:
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
    torch.save(state, directory / "pytorch_model.bin")
    return directory


def fake_hub_cache(model, cache: Path, repo_id: str = "gpt2", *, fmt: str = "safetensors",
                   commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Lay ``model`` out as the hub cache does; returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    if fmt == "safetensors":
        save_safetensors(model, snapshot)
    else:
        save_bin(model, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def rewrite_config(directory: Path, **changes: Any) -> None:
    """Edit fields of ``directory/config.json`` in place (for bad-config tests)."""
    path = directory / "config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))
