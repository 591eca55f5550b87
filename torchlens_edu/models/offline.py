"""The best GPT-2 this machine has without the network: real weights, embedded, or random.

Lessons and the CLI call :func:`load_best_available` so that they always run, offline too,
and say in one line which model they got.
"""

from __future__ import annotations

import torch

from torchlens_edu.models import tokenizer as _tokenizer
from torchlens_edu.models.config import GPT2Config
from torchlens_edu.models.devices import resolve_device
from torchlens_edu.models.gpt2 import GPT2
from torchlens_edu.models.hub import cached_snapshot
from torchlens_edu.models.loading import WEIGHT_FILES, load_pretrained
from torchlens_edu.models.tokenizer import CharTokenizer, GPT2Tokenizer, get_tokenizer

RANDOM_FALLBACK = GPT2Config.preset("gpt2")  # real GPT-2 shapes when no weights exist at all


def load_best_available(*, device: str | torch.device | None = "auto", progress: bool = True
                        ) -> tuple[GPT2, GPT2Tokenizer | CharTokenizer, str | None]:
    """The best GPT-2 available offline: real ``gpt2`` weights if cached, else the embedded
    model, else seeded random weights. Returns ``(model, tokenizer, notice)``; ``notice`` is a
    one-line explanation when the fallback was taken, else None. Never touches the network.

    >>> model, tok, notice = load_best_available(device="cpu")  # doctest: +SKIP
    """
    target = resolve_device(device)
    if cached_snapshot("gpt2", WEIGHT_FILES) is not None:
        return (load_pretrained(GPT2, "gpt2", device=target, progress=progress),
                get_tokenizer("gpt2"), None)
    if (_tokenizer.EMBEDDED_DIR / "config.json").is_file():
        return (load_pretrained(GPT2, "embedded", device=target, progress=progress),
                get_tokenizer("embedded"),
                "GPT-2 weights are not cached (`huggingface-cli download gpt2` gets them); "
                "using the small embedded model")
    with torch.random.fork_rng(devices=[]):  # the user's random state stays untouched
        torch.manual_seed(0)
        model = GPT2(RANDOM_FALLBACK)
    return (model.to(target).eval(), get_tokenizer("gpt2"),
            "no GPT-2 weights are cached and the embedded model is missing; using seeded random "
            "weights, so the text will be gibberish (`huggingface-cli download gpt2` fixes that)")
