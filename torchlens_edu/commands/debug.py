"""``torchlens-edu debug``: what the VS Code launch configurations run.

Without a file: GPT-2 (the embedded model by default) reads a prompt once, so that a stop
point (``--stop attention:layer=0`` or ``$TORCHLENS_EDU_STOP``) pauses inside its attention,
then prints the most likely next tokens. With a file: runs it as ``__main__`` under the same
print options, stop points and debugger server.

>>> from torchlens_edu.cli import main
>>> main(["debug", "--stop", "attention:layer=0", "--device", "cpu"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
from typing import Any

DEFAULT_PROMPT = "The old man looked at the sea and said"
DESCRIPTION = ("What the VS Code launch configurations run. Without a file: GPT-2 (the embedded "
               "model by default) reads a prompt once, so that a stop point (--stop "
               "attention:layer=0 or $TORCHLENS_EDU_STOP) pauses inside its attention, then "
               "prints the most likely next tokens. With a file: runs it as __main__ under the "
               "same print options, stop points and debugger server.")


def register(subparsers: Any) -> None:
    """Add the ``debug`` subcommand to the ``torchlens-edu`` parser."""
    from torchlens_edu import debug

    p = subparsers.add_parser("debug", help="run GPT-2 (or a script) with stop points for a "
                                            "debugger",
                              description=DESCRIPTION)
    p.add_argument("file", nargs="?", help="a Python script to run (its own arguments follow)")
    p.add_argument("script_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    p.add_argument("--model", default="embedded",
                   help="'embedded' (default, offline), 'gpt2', or a Hugging Face layout folder")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the text GPT-2 reads")
    p.add_argument("--print", dest="print_preset", metavar="PRESET", default=None,
                   help="torch print options preset: edu, short, full, default "
                        "(default: $TORCHLENS_EDU_PRINT, else edu)")
    debug.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run GPT-2 or the script; returns the exit code."""
    from rich.text import Text

    from torchlens_edu import debug
    from torchlens_edu._core.console import get_console
    from torchlens_edu._core.formatting import did_you_mean
    from torchlens_edu.printing import PRESETS, printoptions

    err_console = get_console(stderr=True)
    preset = args.print_preset or os.environ.get("TORCHLENS_EDU_PRINT", "").strip() or "edu"
    try:  # what the user can fix (device, flags, paths, names) is one clear line, no traceback
        debug.parse_stops(os.environ.get(debug.ENV_VAR, ""))
        if preset not in PRESETS:
            hint = did_you_mean(preset, PRESETS)
            hint = f" ({hint})" if hint else ""
            raise ValueError(f"unknown print preset {preset!r}{hint}; choose one of "
                             f"{', '.join(PRESETS)}")
        if args.file and not os.path.isfile(args.file):
            raise FileNotFoundError(f"{args.file} is not a file; give the Python script to run")
        stops = debug.apply_arguments(args)
    except (ValueError, RuntimeError, OSError) as err:
        err_console.print(Text.assemble(("error: ", "bold red"), str(err)), soft_wrap=True)
        return 2
    try:
        loaded = None if args.file else _load(args)
    except (ValueError, RuntimeError, OSError) as err:
        for stop in stops:
            stop.remove()
        err_console.print(Text.assemble(("error: ", "bold red"), str(err)), soft_wrap=True)
        return 2
    try:
        with printoptions(preset):
            if loaded is None:
                return _run_script(args.file, args.script_args)
            return _run_gpt2(args, *loaded)
    finally:
        for stop in stops:
            stop.remove()


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from torchlens_edu.models import GPT2, get_tokenizer
    from torchlens_edu.models.devices import DeviceUnavailableError, resolve_device

    try:
        device = resolve_device(args.device)
    except DeviceUnavailableError as err:
        raise RuntimeError(str(err)) from None
    model = GPT2.from_pretrained(args.model, device=device, progress=False).eval()
    return model, get_tokenizer(args.model)


def _run_script(path: str, script_args: list[str]) -> int:
    old_argv, old_path0 = sys.argv, sys.path[0]
    sys.argv = [path, *script_args]
    sys.path[0] = os.path.dirname(os.path.abspath(path))  # as `python path` would
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv, sys.path[0] = old_argv, old_path0
    return 0


def _run_gpt2(args: argparse.Namespace, model: Any, tok: Any) -> int:
    import torch
    from rich.table import Table
    from rich.text import Text

    from torchlens_edu import debug
    from torchlens_edu._core.console import get_console

    console = get_console()
    idx = torch.tensor([tok.encode(args.prompt)], device=model.device)  # (B=1, T)
    if not any(debug.stop_requested("attention", layer=i) for i in range(model.config.n_layer)):
        console.print("[dim]no stop point asked for: add --stop attention:layer=0 (or set "
                      f"{debug.ENV_VAR}) to pause inside attention[/]", soft_wrap=True)
    with torch.no_grad():
        logits = model(idx)  # (1, T, V): the stop points pause in here
    probs = logits[0, -1].float().softmax(-1)  # (V,)
    top = probs.topk(5)
    console.print(Text.assemble("most likely next token after ", (repr(args.prompt), "bold")),
                  soft_wrap=True)
    table = Table("token", "p")
    for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True):
        table.add_row(repr(tok.decode([i])), f"{p:.3f}")
    console.print(table)
    return 0
