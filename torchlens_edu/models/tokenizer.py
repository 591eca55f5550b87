"""Tokenizers: text <-> token ids, offline.

- ``"gpt2"``: the exact GPT-2 byte-pair encoding, run by tiktoken over OpenAI's vocabulary files
  (``encoder.json``, ``vocab.bpe``) shipped inside this package, so nothing is downloaded.
- ``"embedded"`` (or any directory with a character ``tokenizer.json``): the small character
  tokenizer of the model shipped in ``torchlens_edu/data/embedded/``.

A character ``tokenizer.json`` looks like ``{"type": "chars", "vocab": ["\\n", " ", "a", ...]}``:
token id ``i`` is the string ``vocab[i]``; an optional ``"unk"`` names the token that stands for
characters outside the vocabulary (without it, such characters are an error).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
GPT2_VOCAB_DIR = DATA_DIR / "gpt2_vocab"
EMBEDDED_DIR = DATA_DIR / "embedded"

# sha256 of OpenAI's GPT-2 vocabulary files (the same values tiktoken pins for its download).
GPT2_VOCAB_SHA256 = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
ENDOFTEXT = "<|endoftext|>"


class Tokenizer(Protocol):
    """What every tokenizer here offers."""

    @property
    def name(self) -> str: ...

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class GPT2Tokenizer:
    """GPT-2's byte-pair encoding (50257 tokens), through tiktoken.

    >>> tok = get_tokenizer("gpt2")
    >>> tok.encode("Hello world")
    [15496, 995]
    >>> tok.decode([15496, 995])
    'Hello world'
    """

    name = "gpt2"
    eot_token = 50256  # <|endoftext|>
    vocab_size_of_gpt2 = 50257

    def __init__(self, vocab_dir: Path = GPT2_VOCAB_DIR) -> None:
        self._enc = _gpt2_encoding(str(vocab_dir))

    @property
    def vocab_size(self) -> int:
        return self._enc.n_vocab

    def encode(self, text: str) -> list[int]:
        # Text that merely contains "<|endoftext|>" is encoded as plain text, never as the
        # special token: a prompt cannot smuggle control tokens in.
        return self._enc.encode(text, disallowed_special=())

    def decode(self, ids: list[int]) -> str:
        return self._enc.decode(list(ids))

    def decode_piece(self, token_id: int) -> bytes:
        """The raw bytes of one token (a token can be half a UTF-8 character)."""
        return self._enc.decode_single_token_bytes(token_id)

    def __repr__(self) -> str:
        return f"GPT2Tokenizer(vocab_size={self.vocab_size})"


@dataclass(frozen=True, kw_only=True)
class CharTokenizer:
    """One token per character, for small models trained on one text.

    >>> tok = CharTokenizer(vocab=("a", "b", " "))
    >>> tok.encode("ab a")
    [0, 1, 2, 0]
    >>> tok.decode([1, 0])
    'ba'
    """

    vocab: tuple[str, ...]
    unk: str | None = None
    name: str = "chars"
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(set(self.vocab)) != len(self.vocab) or any(len(c) != 1 for c in self.vocab):
            raise ValueError("a character vocabulary must list distinct single characters")
        if self.unk is not None and self.unk not in self.vocab:
            raise ValueError(f"unk={self.unk!r} is not in the vocabulary")
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(self.vocab)})

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        unknown = sorted({c for c in text if c not in self._index})
        if unknown and self.unk is None:
            raise ValueError(f"characters {''.join(unknown)!r} are not in the {self.name} "
                             f"tokenizer's vocabulary of {self.vocab_size}; use only "
                             f"{''.join(self.vocab)!r}")
        fallback = self._index[self.unk] if self.unk is not None else -1
        return [self._index.get(c, fallback) for c in text]

    def decode(self, ids: list[int]) -> str:
        bad = [i for i in ids if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary "
                             f"0..{self.vocab_size - 1}")
        return "".join(self.vocab[int(i)] for i in ids)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, name: str = "chars") -> CharTokenizer:
        """Read ``{"type": "chars", "vocab": [...], "unk": optional}`` from ``path``."""
        path = Path(path)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read the tokenizer description {path}: {err}") from err
        if not isinstance(spec, dict) or spec.get("type") != "chars" or not isinstance(
                spec.get("vocab"), list):
            raise ValueError(f"{path} is not a character tokenizer: expected "
                             '{"type": "chars", "vocab": ["a", "b", ...]}')
        return cls(vocab=tuple(spec["vocab"]), unk=spec.get("unk"), name=name)


def get_tokenizer(source: str | os.PathLike[str] | HasConfig = "gpt2"
                  ) -> GPT2Tokenizer | CharTokenizer:
    """The tokenizer for a model: the model itself (the tokenizer of the weights it was loaded
    from), ``"gpt2"`` (also ``gpt2-medium`` etc.), ``"embedded"``, or a model directory (its
    character ``tokenizer.json`` if it has one, else GPT-2's BPE).

    >>> tok = get_tokenizer()
    >>> tok.decode(tok.encode("naïve café 🤗"))
    'naïve café 🤗'
    >>> from torchlens_edu.models import GPT2
    >>> get_tokenizer(GPT2.from_pretrained("embedded", progress=False)).name
    'embedded'
    """
    if not isinstance(source, (str, os.PathLike)):
        return _model_tokenizer(source)
    name = os.fspath(source)
    path = Path(name)
    if name == "embedded":
        if not (EMBEDDED_DIR / "tokenizer.json").is_file():
            raise FileNotFoundError(f"the embedded model's tokenizer {EMBEDDED_DIR}/tokenizer.json "
                                    "is missing; reinstall torchlens-edu or run "
                                    "scripts/train_tiny.py to rebuild the embedded model")
        return _char_tokenizer(str(EMBEDDED_DIR / "tokenizer.json"), "embedded")
    if path.exists():  # a model directory, or a weights file inside one
        spec = (path if path.is_dir() else path.parent) / "tokenizer.json"
        if spec.is_file() and _is_char_spec(spec):
            return _char_tokenizer(str(spec.resolve()), spec.parent.name)
        return GPT2Tokenizer()
    if "gpt2" in name.lower():  # gpt2, gpt2-xl, openai-community/gpt2, ...
        return GPT2Tokenizer()
    raise ValueError(f"unknown tokenizer {name!r}: use a model, 'gpt2', 'embedded' or a model "
                     "directory")


class _Config(Protocol):
    @property
    def vocab_size(self) -> int: ...


class HasConfig(Protocol):
    """A model with a ``config`` (a :class:`GPT2`; its ``name_or_path`` says where it was loaded
    from)."""

    @property
    def config(self) -> _Config: ...


def _model_tokenizer(model: HasConfig) -> GPT2Tokenizer | CharTokenizer:
    """The tokenizer of the weights ``model`` was loaded from, checked against its vocabulary."""
    config = getattr(model, "config", None)
    vocab_size = getattr(config, "vocab_size", None)
    if not isinstance(vocab_size, int):
        raise TypeError(f"get_tokenizer expects a model (a GPT2), a name or a directory, got "
                        f"{type(model).__name__}")
    source: str | None = getattr(model, "name_or_path", None)
    if source is None:  # built from a config, not loaded: only GPT-2's own vocabulary fits
        if vocab_size != GPT2Tokenizer.vocab_size_of_gpt2:
            raise ValueError(f"this model was built from a config with vocab_size={vocab_size}, "
                             "not loaded from weights, so it has no tokenizer of its own; GPT-2's "
                             f"BPE has {GPT2Tokenizer.vocab_size_of_gpt2} tokens. Use token ids "
                             f"below {vocab_size}, or get_tokenizer('embedded') with the "
                             "embedded model")
        return GPT2Tokenizer()
    tokenizer = get_tokenizer(source)
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer found for {source} has {tokenizer.vocab_size} tokens, "
                         f"more than the model's vocabulary of {vocab_size}: it is not this "
                         "model's tokenizer; put the right tokenizer.json next to the weights")
    return tokenizer


def _is_char_spec(path: Path) -> bool:
    # Hugging Face's own tokenizer.json is a large, different format: peek at the type only.
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(spec, dict) and spec.get("type") == "chars"


@functools.cache
def _char_tokenizer(path: str, name: str) -> CharTokenizer:
    return CharTokenizer.from_file(path, name=name)


@functools.cache
def _gpt2_encoding(vocab_dir: str):  # -> tiktoken.Encoding (imported lazily)
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    files = {}
    for filename, expected in GPT2_VOCAB_SHA256.items():
        path = Path(vocab_dir) / filename
        try:
            data = path.read_bytes()
        except OSError as err:
            raise FileNotFoundError(f"GPT-2 vocabulary file {path} is missing ({err}); "
                                    "reinstall torchlens-edu") from err
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise ValueError(f"GPT-2 vocabulary file {path} is corrupted: sha256 {actual}, "
                             f"expected {expected}; reinstall torchlens-edu")
        files[filename] = str(path)
    # tiktoken copies local files into its download cache unless the cache is disabled with an
    # empty TIKTOKEN_CACHE_DIR; the files are verified above, so read them straight.
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=files["vocab.bpe"],
                                                encoder_json_file=files["encoder.json"])
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: GPT2Tokenizer.eot_token},
                             explicit_n_vocab=GPT2Tokenizer.vocab_size_of_gpt2)
