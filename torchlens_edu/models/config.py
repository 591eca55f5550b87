"""The hyper-parameters of a GPT-2: :class:`GPT2Config` and the named sizes it knows.

Kept apart from the model so that loading (which reads configs) and the model (which is built
from one) both depend on this file, and not on each other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from numbers import Integral, Real
from typing import Any, Literal

AttnImpl = Literal["auto", "explicit", "sdpa"]

# Exact OpenAI values of the four released GPT-2 sizes.
_PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M parameters
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # Small custom sizes for tests, lessons and laptops.
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, vocab_size=256, n_positions=64),
    "small-test": dict(n_layer=4, n_head=4, n_embd=64, vocab_size=512, n_positions=128),
}


# The integer sizes every config needs, with what each one counts (for error messages).
_SIZES = {
    "vocab_size": "the number of token ids",
    "n_positions": "the context length",
    "n_embd": "the width C of the residual stream",
    "n_layer": "the number of blocks",
    "n_head": "the number of attention heads",
}


def _is_real(value: object) -> bool:
    """A real number that is not a bool (``True`` is an int to Python, not a size to us)."""
    return isinstance(value, Real) and not isinstance(value, bool)


def _check_positive_int(name: str, value: object, meaning: str) -> None:
    if not isinstance(value, Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"GPT2Config: {name}={value!r} must be a positive integer ({meaning})")


@dataclass(kw_only=True)
class GPT2Config:
    """Hyper-parameters of a GPT-2. Field names follow Hugging Face's ``GPT2Config``.

    >>> GPT2Config.preset("gpt2-xl").n_embd
    1600
    """

    vocab_size: int = 50257
    n_positions: int = 1024  # context length: the most tokens the model can see
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    dropout: float = 0.0
    attn_impl: AttnImpl = "auto"

    def __post_init__(self) -> None:
        # A bad size would otherwise surface far away (a ZeroDivisionError in attention, an
        # nn.Embedding error at build time): name the field and its value here, once.
        for name, meaning in _SIZES.items():
            _check_positive_int(name, getattr(self, name), meaning)
        if self.n_inner is not None:
            _check_positive_int("n_inner", self.n_inner, "the MLP width, or None for 4 * n_embd")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPT2Config: n_embd={self.n_embd} must be divisible by "
                             f"n_head={self.n_head} so that every head gets the same size "
                             "hs = n_embd // n_head")
        if not _is_real(self.dropout) or not 0 <= self.dropout < 1:
            raise ValueError(f"GPT2Config: dropout={self.dropout!r} must be a probability in "
                             "[0, 1): the share of activations zeroed in training")
        if not _is_real(self.layer_norm_epsilon) or not 0 < self.layer_norm_epsilon < 1:
            raise ValueError(f"GPT2Config: layer_norm_epsilon={self.layer_norm_epsilon!r} must "
                             "be a small positive number (GPT-2 uses 1e-5)")
        if self.attn_impl not in ("auto", "explicit", "sdpa"):
            raise ValueError(f"GPT2Config: attn_impl={self.attn_impl!r}: choose 'auto', "
                             "'explicit' or 'sdpa'")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GPT2Config:
        """A named size: ``gpt2``, ``gpt2-medium``, ``gpt2-large``, ``gpt2-xl``, ``tiny``, ...

        >>> GPT2Config.preset("gpt2", dropout=0.1).dropout
        0.1
        """
        if name not in _PRESETS:
            raise ValueError(f"unknown GPT-2 preset {name!r}; choose one of {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})

    @classmethod
    def presets(cls) -> list[str]:
        """The names :meth:`preset` accepts.

        >>> GPT2Config.presets()[:4]
        ['gpt2', 'gpt2-medium', 'gpt2-large', 'gpt2-xl']
        """
        return list(_PRESETS)

    @property
    def head_size(self) -> int:
        """hs: the width of one attention head.

        >>> GPT2Config.preset("gpt2").head_size
        64
        """
        return self.n_embd // self.n_head

    @property
    def mlp_width(self) -> int:
        """The MLP's hidden width: ``n_inner``, or 4C when it is None.

        >>> GPT2Config.preset("gpt2").mlp_width
        3072
        """
        return self.n_inner or 4 * self.n_embd

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (the Hugging Face ``config.json`` subset we use).

        >>> GPT2Config.preset("tiny").to_dict()["n_layer"]
        2
        """
        return asdict(self)
