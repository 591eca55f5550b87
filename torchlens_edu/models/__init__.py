"""Bundled models: a readable GPT-2 that loads the real OpenAI / Hugging Face weights.

The errors worth catching: :class:`CheckpointError` (a file that is not a loadable GPT-2),
:class:`WeightsNotFoundError` (weights neither cached nor downloadable) and
:class:`DeviceUnavailableError` (``device="cuda"`` on a machine without it).

>>> from torchlens_edu.models import GPT2, CheckpointError, WeightsNotFoundError
>>> try:  # doctest: +SKIP
...     model = GPT2.from_pretrained("gpt2", progress=False)
... except WeightsNotFoundError:  # offline and not cached: the message says how to get them
...     model = GPT2.from_pretrained("embedded", progress=False)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torchlens_edu.models.config import GPT2Config
from torchlens_edu.models.devices import DeviceUnavailableError
from torchlens_edu.models.gpt2 import GPT2, KVCache, explicit_attention
from torchlens_edu.models.hub import WeightsNotFoundError
from torchlens_edu.models.loading import CheckpointError

if TYPE_CHECKING:
    from torchlens_edu.models.tokenizer import get_tokenizer

__all__ = ["GPT2", "CheckpointError", "DeviceUnavailableError", "GPT2Config", "KVCache",
           "WeightsNotFoundError", "explicit_attention", "get_tokenizer"]


def __getattr__(name: str) -> Any:
    if name == "get_tokenizer":  # tiktoken is imported only when a tokenizer is asked for
        from torchlens_edu.models.tokenizer import get_tokenizer

        return get_tokenizer
    raise AttributeError(f"module 'torchlens_edu.models' has no attribute {name!r}")
