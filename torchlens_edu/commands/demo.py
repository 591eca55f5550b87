"""``torchlens-edu demo``: the toolkit at work on a real model, offline, in under a minute.

>>> from torchlens_edu.cli import main
>>> main(["demo", "--max-new-tokens", "8"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
from typing import Any

DEFAULT_PROMPT = "The old man looked at the sea and said"


def register(subparsers: Any) -> None:
    """Add the ``demo`` subcommand to the ``torchlens-edu`` parser."""
    p = subparsers.add_parser("demo", help="tour the toolkit on GPT-2 (offline)",
                              description="Load the best available GPT-2 (real weights if "
                              "cached, else the embedded model) and show what the toolkit sees.")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to run (default: auto = cuda if available)")
    p.add_argument("--model", default=None,
                   help="'gpt2', 'embedded', or a local HF-layout directory "
                        "(default: gpt2 if cached, else embedded)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="text to feed the model")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit code."""
    import torch

    from torchlens_edu._console import get_console
    from torchlens_edu.models import GPT2, get_tokenizer

    console = get_console()
    name = args.model or "embedded"
    model = GPT2.from_pretrained(name, device=args.device).eval()
    tok = get_tokenizer(name)
    console.print(model)
    idx = torch.tensor([tok.encode(args.prompt)], device=model.device)
    out = model.generate(idx, args.max_new_tokens, temperature=0)
    console.print(tok.decode(out[0].tolist()))
    return 0
