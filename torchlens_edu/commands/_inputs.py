"""What the subcommands accept: argparse types (checked before anything loads) and the checks
a prompt needs once the model is known.

An argparse type raises ``argparse.ArgumentTypeError``; argparse then reports
``argument --seed: ...`` through ``cli.main`` with exit code 2.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from torchlens_edu.commands import EXIT_USAGE, CommandError

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 64 bits


def _number(text: str, kind: type, what: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def count(text: str) -> int:
    """A whole number >= 0 (token counts, depths, top-k).

    >>> count("3")
    3
    """
    value = _number(text, int, "a whole number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def temperature(text: str) -> float:
    """A finite number >= 0 (0 is greedy).

    >>> temperature("0.8")
    0.8
    """
    value = _number(text, float, "a number")
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (0 is greedy, 1 samples "
                                         f"the model's own probabilities), got {text}")
    return value


def seed(text: str) -> int:
    """A whole number from 0 to 2**64 - 1 (what torch's generators take).

    >>> seed("42")
    42
    """
    value = _number(text, int, "a whole number")
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**64 - 1 = {MAX_SEED}, got "
                                         f"{value}")
    return value


def prompt(text: str) -> str:
    """Text that is not empty.

    >>> prompt("Hello")
    'Hello'
    """
    if not text:
        raise argparse.ArgumentTypeError('the prompt is empty; give some text, e.g. "Hello"')
    return text


def check_vocabulary(ids: list[int], tokenizer: Any, config: Any) -> None:
    """Every token id must exist in the model (a BPE tokenizer on a small-vocabulary model)."""
    if ids and max(ids) >= config.vocab_size:
        raise CommandError(f"the {tokenizer.name} tokenizer made token id {max(ids)}, but this "
                           f"model knows only {config.vocab_size} tokens; put the model's own "
                           "tokenizer.json next to its weights")


def prompt_ids(text: str, tokenizer: Any, config: Any) -> list[int]:
    """The prompt's token ids, checked to fit the model (not empty, known ids, context).

    >>> from torchlens_edu.models import GPT2Config, get_tokenizer
    >>> prompt_ids("Hi", get_tokenizer("gpt2"), GPT2Config())
    [17250]
    """
    ids = tokenizer.encode(text)  # characters a tokenizer lacks: its own clear ValueError
    if not ids:
        raise CommandError("the prompt makes no tokens; give some text", exit_code=EXIT_USAGE)
    check_vocabulary(ids, tokenizer, config)
    if len(ids) > config.n_positions:
        raise CommandError(f"the prompt makes {len(ids)} tokens, but the model reads at most "
                           f"{config.n_positions} (its context); shorten the prompt",
                           exit_code=EXIT_USAGE)
    return ids
