"""``torchlens-edu demo``: the toolkit at work on a real model, offline, in under a minute.

It loads the best GPT-2 available (the real weights if they are in the Hugging Face cache,
else the small model shipped with the package), then shows, in order: the model summary, the
shape trace with named dims, the attention pattern of an interesting head, the residual stream
after every layer, a short generation, and an Inf being caught at its source and explained.

>>> from torchlens_edu.cli import main
>>> main(["demo", "--max-new-tokens", "8"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from torchlens_edu.commands import EXIT_USAGE, CommandError, _inputs

if TYPE_CHECKING:  # torch is imported lazily: `torchlens-edu --help` stays fast
    import torch
    from rich.console import Console

    from torchlens_edu.models import GPT2
    from torchlens_edu.models.tokenizer import Tokenizer

DEFAULT_PROMPT = "Mr. Darcy looked at Elizabeth"
HEATMAP_TOKENS = 32  # at most this many tokens on each axis: two columns each fit 80 columns
# Sampling for section 5: a low temperature keeps the embedded model to words it knows (about 96%
# of them; at 0.8 it invents some, like "langerfected"), yet does not loop as greedy decoding does.
TEMPERATURE = 0.3
TOP_K = 40


def register(subparsers: Any) -> None:
    """Add the ``demo`` subcommand to the ``torchlens-edu`` parser."""
    p = subparsers.add_parser("demo", help="tour the toolkit on GPT-2 (offline)",
                              description="Load the best available GPT-2 (real weights if "
                              "cached, else the embedded model) and show what the toolkit sees.")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where to run (default: auto = cuda if available)")
    p.add_argument("--model", default=None, metavar="gpt2|embedded|PATH",
                   help="'gpt2' (from the Hugging Face cache), 'embedded' (shipped with "
                        "torchlens-edu) or a local HF-layout directory "
                        "(default: gpt2 if cached, else embedded)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, type=_inputs.prompt,
                   help="text to feed the model")
    p.add_argument("--max-new-tokens", type=_inputs.count, default=60, metavar="N",
                   help="tokens to generate (default 60)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit code."""
    import torch
    from rich.markup import escape
    from rich.rule import Rule

    import torchlens_edu as tle
    from torchlens_edu._core.console import get_console
    from torchlens_edu.models.analysis import induction_head, previous_token_head

    console = get_console()
    errors = get_console(stderr=True)
    errors.soft_wrap = True  # long messages wrap in the terminal, commands copy-paste intact
    model, tok, notice = _load(args.model, args.device)
    ids = tok.encode(args.prompt)
    _inputs.check_vocabulary(ids, tok, model.config)
    if notice:
        errors.print(f"[yellow]note:[/] {escape(notice)}")
    if not 2 <= len(ids) <= model.config.n_positions // 2:
        raise CommandError(f"the prompt makes {len(ids)} tokens; give between 2 and "
                           f"{model.config.n_positions // 2} so that attention has something "
                           "to show", exit_code=EXIT_USAGE)
    idx = torch.tensor([ids], device=model.device)  # (B=1, T)
    pieces = [tok.decode([i]) for i in ids]
    insp = tle.inspect(model)
    C = model.config

    console.print(Rule(f"1. the model: {C.n_layer} layers, {C.n_head} heads, n_embd {C.n_embd}, "
                       f"vocabulary {C.vocab_size}, on {model.device}"))
    console.print(f"prompt: {escape(args.prompt)!r} -> {len(ids)} tokens "
                  f"{escape(str(pieces[:12]))}{' ...' if len(ids) > 12 else ''}")
    console.print(insp.summary(idx, depth=2))

    console.print(Rule("2. shapes with named dims: identical blocks folded into one"))
    console.print(insp.trace(idx, depth=3))

    console.print(Rule("3. attention: rows are queries, columns the keys they look at"))
    shown = idx[:, -HEATMAP_TOKENS:]  # (B=1, T'), T' <= HEATMAP_TOKENS
    if shown.shape[1] < idx.shape[1]:
        console.print(f"(the last {HEATMAP_TOKENS} tokens of the prompt)")
    with insp.capture("transformer.h.*.attn.att") as cache, torch.no_grad():  # hook points
        model(shown)
    att = torch.stack([cache[f"transformer.h.{i}.attn.att"][0]
                       for i in range(C.n_layer)])  # (L, nh, T', T'): every layer's pattern
    layer, head, score = previous_token_head(att)
    console.print(f"layer {layer}, head {head} puts {score:.0%} of its weight on the previous "
                  "token" + (": a 'previous-token head', a building block of induction (copying)"
                             if score > 0.5 else " (the most of any head)"))
    tle.show_attention(att[layer, head], pieces[-shown.shape[1]:], layer=layer, head=head,
                       console=console)
    layer, head, score = induction_head(model, tok)
    console.print(f"In a random string seen twice, layer {layer}, head {head} puts {score:.0%} "
                  "of its weight on the token that followed the earlier occurrence"
                  + (": an induction head, it copies" if score > 0.3 else " (no head copies)"))

    console.print(Rule("4. the residual stream, layer by layer (tle.describe)"))
    with insp.capture(_is_block) as cache, torch.no_grad():
        model(idx)
    for i in range(C.n_layer):  # every layer: the growth of σ from one to the next is the point
        line = tle.describe(cache[f"transformer.h.{i}"], dims=cache.dims)
        console.print(f"after h.{i:<2d} {escape(line)}")

    console.print(Rule(f"5. generation (KV cache, temperature {TEMPERATURE}, top-k {TOP_K}, "
                       "seed 0)"))
    _generate(console, model, tok, idx, args.max_new_tokens)

    target = min(1, C.n_layer - 1)
    console.print(Rule("6. an Inf caught at its source and explained (tle.watch_nans)"))
    console.print(f"We plant +inf in one weight of h.{target}.mlp.c_fc, as a too-large "
                  "learning-rate step would, and run a forward under watch_nans (it catches NaN "
                  "and ±Inf alike):")
    weight = model.get_parameter(f"transformer.h.{target}.mlp.c_fc.weight")
    with _planted_inf(weight), insp.watch_nans(mode="raise"):
        try:
            model(idx)
        except tle.NonFiniteError as err:
            console.print(err.report)
    console.print("[dim]the weight is restored; next: the lessons in demos/ "
                  "(python demos/01_tensors_and_print_options.py)[/dim]")
    return 0


def _is_block(path: str, module: Any) -> bool:
    """The blocks ``transformer.h.N`` themselves (the glob ``transformer.h.*`` also matches
    everything inside them)."""
    from torchlens_edu.models.gpt2 import Block

    return isinstance(module, Block)


def _load(name: str | None, device: str) -> tuple[GPT2, Tokenizer, str | None]:
    """The model and its tokenizer; with no name, the best available offline (and a notice)."""
    from torchlens_edu.models import GPT2, get_tokenizer
    from torchlens_edu.models.offline import load_best_available

    if name is None:
        return load_best_available(device=device)
    return GPT2.from_pretrained(name, device=device), get_tokenizer(name), None


def _generate(console: Console, model: GPT2, tok: Tokenizer, idx: torch.Tensor,
              max_new_tokens: int) -> None:
    """Print the prompt, then each new token as soon as it is made. A full context does not
    end the sample: the model goes on from the last half of it, as nanoGPT's ``generate``
    crops to ``block_size`` (the embedded model reads 64 characters), and a note says so."""
    import torch
    from rich.markup import escape

    ctx = model.config.n_positions
    console.print(escape(tok.decode(idx[0].tolist())), style="bold", end="", soft_wrap=True)
    window, made, refills = idx, 0, 0  # window: what the model reads now, (B=1, <= ctx)
    while made < max_new_tokens:
        stream = model.stream(window, max_new_tokens - made, temperature=TEMPERATURE,
                              top_k=TOP_K, seed=refills)  # seed 0, then one per refill
        next(stream)  # the window itself, printed already
        new = []
        for token in stream:  # (B=1, 1), printed as soon as it is made
            console.print(escape(tok.decode(token[0].tolist())), end="", soft_wrap=True)
            new.append(token)
        made += len(new)
        if made < max_new_tokens:  # the context is full: keep its last half
            window = torch.cat([window, *new], dim=1)[:, -(ctx // 2):]  # (B=1, ctx // 2)
            refills += 1
    console.print()
    if refills:
        console.print(f"[dim]the model reads at most {ctx} tokens: each time they were full "
                      f"it went on from the last {ctx // 2} ({refills}x)[/dim]")


@contextmanager
def _planted_inf(weight: torch.Tensor) -> Iterator[None]:
    """Set one element of ``weight`` to +inf for the block, then put the old value back."""
    import torch

    with torch.no_grad():
        old = weight[0, 0].clone()
        weight[0, 0] = float("inf")
    try:
        yield
    finally:
        with torch.no_grad():
            weight[0, 0] = old
