"""How numbers and names are written, once for the whole package.

Bytes use binary units (1 KiB = 1024 B) and say so; counts of things (parameters) use
K/M/B/T as model cards do (``124.4M params``, ``1.6B params``); amounts of work use SI prefixes
on their unit (``613 TFLOP``). dtypes have one short name each, and every "did you mean" is
computed here. ``dtype_name`` is torch's name (``float32``) for messages and code hints;
``short_dtype`` (``f32``) is for dense one-line summaries.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

import torch

_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
_COUNT_UNITS = (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3))
_SI_PREFIXES = (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3))

_SHORT_DTYPES = {
    torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16",
    torch.complex64: "c64", torch.complex128: "c128", torch.complex32: "c32",
    torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
    torch.uint8: "u8", torch.uint16: "u16", torch.uint32: "u32", torch.uint64: "u64",
    torch.bool: "bool",
}


def format_bytes(n: int | float) -> str:
    """A size in binary units: ``512 B``, ``24 KiB``, ``392.6 KiB``, ``147.2 MiB``.

    >>> format_bytes(512), format_bytes(24 * 1024), format_bytes(402_056)
    ('512 B', '24 KiB', '392.6 KiB')
    >>> format_bytes(154_389_504), format_bytes(6_230_444_800)
    ('147.2 MiB', '5.8 GiB')
    """
    size = float(n)
    for unit in _BYTE_UNITS:
        if abs(size) < 1024 or unit == _BYTE_UNITS[-1]:
            if unit == "B":
                return f"{int(size)} B"
            return f"{size:.1f}".removesuffix(".0") + f" {unit}"
        size /= 1024
    raise AssertionError("unreachable: the last unit returns")


def format_count(n: int | float) -> str:
    """A count of things, as model cards write it: ``8``, ``33.9K``, ``124.4M``, ``70.6B``.

    >>> format_count(8), format_count(33_920), format_count(124_439_808)
    ('8', '33.9K', '124.4M')
    >>> format_count(70_553_706_496)
    '70.6B'
    """
    for unit, size in _COUNT_UNITS:
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:g}"


def format_si(n: int | float, unit: str) -> str:
    """An amount of ``unit`` with an SI prefix and three significant digits.

    >>> format_si(613_338.5e9, "FLOP"), format_si(2_150_000, "FLOP"), format_si(512, "FLOP")
    ('613 TFLOP', '2.15 MFLOP', '512 FLOP')
    """
    for prefix, scale in _SI_PREFIXES:
        if abs(n) >= scale:
            return f"{n / scale:.3g} {prefix}{unit}"
    return f"{n:.3g} {unit}"


def short_dtype(dtype: torch.dtype) -> str:
    """The one short name of a dtype: ``f32``, ``bf16``, ``i64``, ``f8e4m3fn``, ``qint8``...

    >>> short_dtype(torch.bfloat16), short_dtype(torch.float8_e4m3fn), short_dtype(torch.qint8)
    ('bf16', 'f8e4m3fn', 'qint8')
    """
    name = _SHORT_DTYPES.get(dtype)
    if name:
        return name
    text = dtype_name(dtype)
    return text.replace("float8_", "f8") if text.startswith("float8_") else text


def dtype_name(dtype: torch.dtype) -> str:
    """torch's own name of a dtype, as written after ``torch.``: for messages and code hints.

    >>> dtype_name(torch.float32), dtype_name(torch.bfloat16)
    ('float32', 'bfloat16')
    """
    return str(dtype).removeprefix("torch.")


def close_matches(word: str, choices: Iterable[str], *, n: int = 1,
                  cutoff: float = 0.6) -> list[str]:
    """The choices closest to a mistyped ``word``: same letters in another case first, then
    what :func:`difflib.get_close_matches` finds.

    >>> close_matches("c", ["B", "T", "C"]), close_matches("precison", ["precision", "profile"])
    (['C'], ['precision'])
    """
    if not isinstance(word, str):
        return []  # not a name at all: nothing was mistyped (the caller says what to give)
    options = sorted(set(choices))
    same = [c for c in options if c.lower() == word.lower() and c != word]
    found = same + [c for c in difflib.get_close_matches(word, options, n=n, cutoff=cutoff)
                    if c not in same]
    return found[:n]


def did_you_mean(word: str, choices: Iterable[str], *, n: int = 1, cutoff: float = 0.6,
                 quote: bool = True, start: bool = False) -> str:
    """``"did you mean 'x'?"`` for a mistyped ``word``, or ``""`` when nothing is close.

    ``quote`` puts names in quotes (leave them bare for dotted paths); ``start`` capitalises
    the phrase for the start of a sentence.

    >>> did_you_mean("atention", ["attention", "mlp"])
    "did you mean 'attention'?"
    >>> did_you_mean("blok", ["block", "blocks", "head"], n=2, quote=False, start=True)
    'Did you mean block, blocks?'
    >>> did_you_mean("zzz", ["attention"])
    ''
    """
    found = close_matches(word, choices, n=n, cutoff=cutoff)
    if not found:
        return ""
    names = ", ".join(repr(f) if quote else f for f in found)
    return f"{'Did' if start else 'did'} you mean {names}?"


__all__ = ["close_matches", "did_you_mean", "dtype_name", "format_bytes", "format_count",
           "format_si", "short_dtype"]
