"""Bundled models: a readable GPT-2 that loads the real OpenAI / Hugging Face weights."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torchlens_edu.models.config import GPT2Config
from torchlens_edu.models.gpt2 import GPT2, KVCache, explicit_attention

if TYPE_CHECKING:
    from torchlens_edu.models.tokenizer import get_tokenizer

__all__ = ["GPT2", "GPT2Config", "KVCache", "explicit_attention", "get_tokenizer"]


def __getattr__(name: str) -> Any:
    if name == "get_tokenizer":  # tiktoken is imported only when a tokenizer is asked for
        from torchlens_edu.models.tokenizer import get_tokenizer

        return get_tokenizer
    raise AttributeError(f"module 'torchlens_edu.models' has no attribute {name!r}")
