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

from torchlens_edu.commands import EXIT_USAGE, CommandError, _inputs, from_user_code

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
    p.add_argument("--prompt", default=DEFAULT_PROMPT, type=_inputs.prompt,
                   help="the text GPT-2 reads")
    p.add_argument("--print", dest="print_preset", metavar="PRESET", default=None,
                   help="torch print options preset: edu, short, full, default "
                        "(default: $TORCHLENS_EDU_PRINT, else edu)")
    debug.add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run GPT-2 or the script; returns the exit code."""
    from torchlens_edu import debug
    from torchlens_edu._core.formatting import did_you_mean
    from torchlens_edu.printing import PRESETS, printoptions

    preset = args.print_preset or os.environ.get("TORCHLENS_EDU_PRINT", "").strip() or "edu"
    try:  # the command line and environment, checked before anything runs
        debug.parse_stops(os.environ.get(debug.ENV_VAR, ""))
        if preset not in PRESETS:
            hint = did_you_mean(preset, PRESETS)
            hint = f" ({hint})" if hint else ""
            raise ValueError(f"unknown print preset {preset!r}{hint}; choose one of "
                             f"{', '.join(PRESETS)}")
        if args.listen is not None and not 0 <= args.listen <= 65535:
            raise ValueError(f"argument --listen: a port is 0 to 65535 (0: any free port), got "
                             f"{args.listen}; VS Code's attach configuration uses 5678")
        if args.file and not os.path.isfile(args.file):
            raise ValueError(f"{args.file} is not a file; give the Python script to run")
        stops = debug.apply_arguments(args)
    except (ValueError, RuntimeError, OSError) as err:
        raise CommandError(str(err), exit_code=EXIT_USAGE) from None
    try:
        if args.file:
            with printoptions(preset):
                return _run_script(args.file, args.script_args)
        model, tokenizer = _load(args)
        _check_range(stops, model.config)
        ids = _inputs.prompt_ids(args.prompt, tokenizer, model.config)
        with printoptions(preset):
            return _run_gpt2(args, model, tokenizer, ids)
    finally:
        for stop in stops:
            stop.remove()


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from torchlens_edu.models import GPT2, get_tokenizer
    from torchlens_edu.models.devices import resolve_device

    model = GPT2.from_pretrained(args.model, device=resolve_device(args.device), progress=False)
    return model.eval(), get_tokenizer(args.model)


def _check_range(stops: list[Any], config: Any) -> None:
    """``--stop attention:layer=7`` on a 4-layer model: an error that says the valid range."""
    for stop in stops:
        reason = stop.request.out_of_range(n_layer=config.n_layer, n_head=config.n_head)
        if reason is not None:
            raise CommandError(f"--stop {reason}", exit_code=EXIT_USAGE)


def _run_script(path: str, script_args: list[str]) -> int:
    """Run ``path`` as ``python path args...`` would, with the same exit code and messages."""
    import bdb

    from torchlens_edu._core.debugger import debugger_attached

    old_argv, old_path0 = sys.argv, sys.path[0]
    sys.argv = [path, *script_args]
    sys.path[0] = os.path.dirname(os.path.abspath(path))  # as `python path` would
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as exit_:
        return _exit_status(exit_.code)
    except bdb.BdbQuit:
        raise  # quitting pdb at a stop is not the script's error
    except Exception as err:  # the script's own error: its traceback, from its own frames
        if debugger_attached():  # VS Code stops at uncaught errors: keep this one uncaught
            from_user_code(err)
            raise
        _print_script_error(err, path)
        return 1
    finally:
        sys.argv, sys.path[0] = old_argv, old_path0
    return 0


def _exit_status(code: object) -> int:
    """What ``sys.exit(code)`` means to Python: None is 0, an int is itself, anything else
    (``sys.exit("message")``) is printed to stderr and is 1."""
    if code is None or isinstance(code, int):
        return int(code or 0)
    from torchlens_edu._core.console import get_console

    get_console(stderr=True).print(str(code), markup=False, soft_wrap=True)
    return 1


def _print_script_error(err: BaseException, path: str) -> None:
    import traceback

    from torchlens_edu._core.console import get_console

    tb = err.__traceback__
    script = os.path.abspath(path)
    while tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename) != script:
        tb = tb.tb_next  # runpy's and torchlens-edu's frames: not what the learner wrote
    if tb is None:  # it never ran (a SyntaxError): Python shows only the error and its line
        text = "".join(traceback.format_exception_only(type(err), err))
    else:
        text = "".join(traceback.format_exception(type(err), err, tb))
    get_console(stderr=True).print(text.rstrip("\n"), markup=False, soft_wrap=True)


def _run_gpt2(args: argparse.Namespace, model: Any, tok: Any, ids: list[int]) -> int:
    import torch
    from rich.table import Table
    from rich.text import Text

    from torchlens_edu import debug
    from torchlens_edu._core.console import get_console

    console = get_console()
    idx = torch.tensor([ids], device=model.device)  # (B=1, T)
    if not debug.requested_stops():
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
