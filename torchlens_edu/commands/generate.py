"""``torchlens-edu generate "prompt"``: continue a prompt with GPT-2, streaming token by token."""

from __future__ import annotations

import argparse
import time

from torchlens_edu._core.console import get_console


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``generate`` subcommand to the CLI."""
    parser = subparsers.add_parser(
        "generate",
        help="continue a prompt with GPT-2, token by token",
        description="Continue PROMPT with GPT-2 and print the new tokens as they are made.",
    )
    parser.add_argument("prompt", help="the text to continue")
    parser.add_argument("--model", default=None, metavar="gpt2|embedded|PATH",
                        help="a preset name (gpt2, gpt2-medium, ...; from the Hugging Face cache), "
                             "'embedded' (the small model shipped with torchlens-edu), or a "
                             "directory / weights file; default: gpt2 if cached, else embedded")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--max-new-tokens", type=int, default=40, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="0 is greedy; higher is more random (default 0.8)")
    parser.add_argument("--top-k", type=int, default=40, metavar="K",
                        help="sample only among the K most likely tokens (default 40; 0 = all)")
    parser.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Load the model, encode the prompt, stream the continuation; returns the exit code."""
    import torch
    from rich.markup import escape

    from torchlens_edu.models.devices import DeviceUnavailableError, resolve_device
    from torchlens_edu.models.gpt2 import GPT2
    from torchlens_edu.models.loading import load_pretrained
    from torchlens_edu.models.offline import load_best_available
    from torchlens_edu.models.tokenizer import get_tokenizer

    console = get_console()
    # soft_wrap: the terminal wraps long messages, so paths and commands copy-paste intact
    errors = get_console(stderr=True)
    errors.soft_wrap = True
    for flag, value in (("--max-new-tokens", args.max_new_tokens),
                        ("--temperature", args.temperature), ("--top-k", args.top_k)):
        if value < 0:
            errors.print(f"[red]error:[/] {flag} must be >= 0, got {value}")
            return 2
    try:
        device = resolve_device(args.device)
        if args.model is None:
            model, tokenizer, notice = load_best_available(device=device)
            if notice:
                errors.print(f"[yellow]note:[/] {escape(notice)}")
        else:
            model = load_pretrained(GPT2, args.model, device=device)
            tokenizer = get_tokenizer(args.model)
        ids = tokenizer.encode(args.prompt)
    # CheckpointError is a ValueError, WeightsNotFoundError a FileNotFoundError
    except (ValueError, FileNotFoundError, DeviceUnavailableError) as err:
        errors.print(f"[red]error:[/] {escape(str(err))}")
        return 1
    if not ids:
        eot = getattr(tokenizer, "eot_token", None)
        if eot is None:
            errors.print("[red]error:[/] the prompt is empty; give some text to continue")
            return 2
        ids = [eot]  # GPT-2 starts unconditional text after <|endoftext|>
    if max(ids) >= model.config.vocab_size:
        errors.print(f"[red]error:[/] the {escape(tokenizer.name)} tokenizer made token id "
                     f"{max(ids)}, but this model knows only {model.config.vocab_size} tokens; "
                     "put the model's own tokenizer.json next to its weights")
        return 1
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
