"""``torchlens-edu trace "prompt"``: the shapes a prompt takes through GPT-2, module by module.

    torchlens-edu trace "Hello world"                 # the small embedded GPT-2
    torchlens-edu trace --model gpt2 --ops "Hello"    # real weights, every op with its line
    torchlens-edu trace --model gpt2-xl --meta "Hi"   # shapes only: no weights are loaded

torch is imported only when the command runs, so ``torchlens-edu --help`` stays instant.
"""

from __future__ import annotations

import argparse
from typing import Any

from torchlens_edu.commands import _inputs

_PRESETS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


def register(subparsers: Any) -> None:
    """Add the ``trace`` subcommand to the CLI."""
    parser = subparsers.add_parser(
        "trace", help="trace the shapes of a prompt through GPT-2",
        description="Run a prompt through GPT-2 and print every module's (and with --ops every "
                    "op's) input and output shapes with named dimensions.")
    parser.add_argument("prompt", type=_inputs.prompt, help="the text to feed the model")
    parser.add_argument("--model", default="embedded",
                        help="'embedded' (default, shipped with the package), a GPT-2 preset "
                             f"({', '.join(_PRESETS)}) or a path to a Hugging Face checkpoint")
    parser.add_argument("--ops", action="store_true", help="also show every torch op with its line")
    parser.add_argument("--meta", action="store_true",
                        help="shapes only, on meta tensors: no weights loaded, any size is instant")
    parser.add_argument("--depth", type=_inputs.count, default=None, metavar="N",
                        help="show modules up to this depth (0 = the model itself)")
    parser.add_argument("--include", default=None, metavar="GLOB",
                        help="module-path glob, e.g. 'transformer.h.0*'")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the model (or only its config with ``--meta``), tokenize, trace, print."""
    import torch

    from torchlens_edu._core.console import get_console
    from torchlens_edu.models import GPT2, GPT2Config, get_tokenizer
    from torchlens_edu.shapes.tracer import trace_shapes

    if args.meta and args.model in _PRESETS:
        with torch.device("meta"):  # the config is enough: no weights are read or allocated
            model = GPT2(GPT2Config.preset(args.model))
    else:
        model = GPT2.from_pretrained(args.model)
    model.eval()
    tokenizer = get_tokenizer(args.model)
    ids = torch.tensor([_inputs.prompt_ids(args.prompt, tokenizer, model.config)])  # (1, T)
    trace = trace_shapes(model, ids, ops=args.ops, meta=args.meta, depth=args.depth,
                         include=args.include)
    get_console().print(trace)
    return 0
