"""``torchlens-edu generate "prompt"``: continue a prompt with GPT-2, streaming token by token."""

from __future__ import annotations

import argparse
import time

from torchlens_edu._core.console import get_console
from torchlens_edu.commands import EXIT_USAGE, CommandError, _inputs


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``generate`` subcommand to the CLI."""
    parser = subparsers.add_parser(
        "generate",
        help="continue a prompt with GPT-2, token by token",
        description="Continue PROMPT with GPT-2 and print the new tokens as they are made.",
    )
    parser.add_argument("prompt", help="the text to continue (empty: start a new text)")
    parser.add_argument("--model", default=None, metavar="gpt2|embedded|PATH",
                        help="a preset name (gpt2, gpt2-medium, ...; from the Hugging Face cache), "
                             "'embedded' (the small model shipped with torchlens-edu), or a "
                             "directory / weights file; default: gpt2 if cached, else embedded")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--max-new-tokens", type=_inputs.count, default=40, metavar="N",
                        help="how many tokens to add (default 40)")
    parser.add_argument("--temperature", type=_inputs.temperature, default=0.8, metavar="T",
                        help="0 is greedy; higher is more random (default 0.8)")
    parser.add_argument("--top-k", type=_inputs.count, default=40, metavar="K",
                        help="sample only among the K most likely tokens (default 40; 0 = all)")
    parser.add_argument("--seed", type=_inputs.seed, default=None, metavar="N",
                        help="make sampling reproducible (0 to 2**64 - 1)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the model, encode the prompt, stream the continuation; returns the exit code."""
    import torch
    from rich.markup import escape

    from torchlens_edu.models.devices import resolve_device
    from torchlens_edu.models.gpt2 import GPT2
    from torchlens_edu.models.loading import load_pretrained
    from torchlens_edu.models.offline import load_best_available
    from torchlens_edu.models.tokenizer import get_tokenizer

    console = get_console()
    # soft_wrap: the terminal wraps long messages, so paths and commands copy-paste intact
    errors = get_console(stderr=True)
    errors.soft_wrap = True
    device = resolve_device(args.device)
    if args.model is None:
        model, tokenizer, notice = load_best_available(device=device)
        if notice:
            errors.print(f"[yellow]note:[/] {escape(notice)}")
    else:
        model = load_pretrained(GPT2, args.model, device=device)
        tokenizer = get_tokenizer(args.model)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        eot = getattr(tokenizer, "eot_token", None)
        if eot is None:
            raise CommandError("the prompt is empty and this model's tokenizer has no "
                               "<|endoftext|> to start from; give some text to continue",
                               exit_code=EXIT_USAGE)
        ids = [eot]  # GPT-2 starts unconditional text after <|endoftext|>
    _inputs.check_vocabulary(ids, tokenizer, model.config)
    limit = model.config.n_positions
    if len(ids) >= limit:
        errors.print(f"[yellow]note:[/] the prompt has {len(ids)} tokens; keeping the last "
                     f"{limit - 1} (the context holds {limit})")
        ids = ids[-(limit - 1):]

    idx = torch.tensor([ids], dtype=torch.long, device=model.device)  # (1, T)
    console.print(args.prompt, style="bold", end="", markup=False, soft_wrap=True)
    new_ids: list[int] = []
    printed = ""
    start = time.perf_counter()
    stream = model.stream(idx, args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k or None, seed=args.seed)
    next(stream)  # the prompt itself
    for token in stream:
        new_ids.append(int(token[0, 0]))
        text = tokenizer.decode(new_ids)
        if text.endswith("\ufffd"):  # half of a UTF-8 character: wait for the rest
            continue
        console.print(text[len(printed):], style="cyan", end="", markup=False, soft_wrap=True)
        printed = text
    text = tokenizer.decode(new_ids)
    console.print(text[len(printed):], style="cyan", markup=False, soft_wrap=True)
    seconds = time.perf_counter() - start
    rate = len(new_ids) / seconds if seconds > 0 else float("inf")
    errors.print(f"[dim]{len(new_ids)} tokens in {seconds:.2f} s ({rate:.1f} tokens/s) on "
                 f"{model.device}[/]")
    return 0
