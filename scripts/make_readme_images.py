"""Regenerate the README's pictures: SVG exports of the toolkit's rich output.

    python scripts/make_readme_images.py          # writes docs/images/*.svg

Each picture is printed to a recording rich Console and saved with ``Console.save_svg``, so it
shows exactly what a terminal shows. The embedded model keeps the pictures reproducible and
offline. Run it from the repository root (the NaN report names this file by its relative path).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from rich.console import Console

import torchlens_edu as tle
from torchlens_edu.models import GPT2, get_tokenizer
from torchlens_edu.models.analysis import attention_weights, previous_token_head

OUT = Path("docs/images")
WIDTH = 100
PROMPT = "Mr. Darcy looked at Elizabeth"


def record(name: str, title: str, draw: Callable[[Console], None]) -> None:
    console = Console(record=True, width=WIDTH, force_terminal=True, color_system="truecolor",
                      highlight=False, file=io.StringIO())
    draw(console)
    console.save_svg(str(OUT / f"{name}.svg"), title=title)
    print(f"wrote {OUT / name}.svg")


class HandWrittenCrossEntropy(nn.Module):
    """The forward NaN of lesson 04: log of a probability that underflowed to 0."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits, dim=-1)  # (B, V)
        log_probs = torch.log(probs)  # log(0) = -inf
        return -(nn.functional.one_hot(target, logits.shape[-1]) * log_probs).sum(-1).mean()


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # a model this small gains nothing from threads; a busy machine
    # makes threads wait on each other, and the trace's times would show that, not the model
    model = GPT2.from_pretrained("embedded", progress=False)
    tok = get_tokenizer("embedded")
    ids = torch.tensor([tok.encode(PROMPT)])  # (B=1, T)
    with torch.no_grad():
        model(ids)  # warm: the trace's times are a forward's, not the first call's set-up

    record("trace", "tle.trace_shapes(model, ids)",
           lambda c: c.print(tle.trace_shapes(model, ids)))

    att = attention_weights(model, ids)[:, 0]  # (L, nh, T, T)
    layer, head, _ = previous_token_head(att)
    pieces = [tok.decode([i]) for i in ids[0].tolist()]
    record("attention", "tle.show_attention(att, tokens)",
           lambda c: tle.show_attention(att[layer, head], pieces, layer=layer, head=head,
                                        console=c))

    loss = HandWrittenCrossEntropy()
    logits = torch.tensor([[30.0, -80.0, 5.0], [2.0, 1.0, -90.0]])
    try:
        with tle.watch_nans(loss):
            loss(logits, torch.tensor([0, 1]))
    except tle.NonFiniteError as err:
        report = err.report
    else:
        raise RuntimeError("the NaN example stopped producing a NaN; fix it before the README")
    record("nan_report", "tle.watch_nans(model)", lambda c: c.print(report))


if __name__ == "__main__":
    main()
