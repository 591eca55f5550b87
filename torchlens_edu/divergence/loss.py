"""Which scalar ``compare(backward=True)`` differentiates, the same on both sides.

Tried in this order, and the report says which one it used:

1. the models' own loss, when both outputs carry one: Hugging Face's ``ModelOutput.loss``,
   or a 0-dim tensor in an output tuple (``(logits, loss)`` when targets were given);
2. next-token cross-entropy, when the first input holds integer token ids ``(B, T)`` and the
   outputs hold logits ``(B, T, V)``: the logits at positions ``0..T-2`` against the ids at
   ``1..T-1`` (what a language model is trained on);
3. otherwise ``sum(output * R)``, with ``R`` a fixed N(0, 1) tensor drawn from seed 0 (the
   caller's RNG is untouched): every output element gets its own fixed weight, so no
   difference in an output can hide in the gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from torchlens_edu._core.tree import iter_tensors
from torchlens_edu.divergence.align import pair_tensors

_SEED = 0


@dataclass(frozen=True, kw_only=True)
class Loss:
    """One scalar per side, from that side's output.

    >>> logits = torch.zeros(1, 3, 5, requires_grad=True)
    >>> choose_loss(logits, logits, (torch.tensor([[1, 2, 3]]),)).description
    'next-token cross-entropy of the logits (B, T, V) against the input ids shifted by one'
    """

    description: str
    of: Callable[[Any], torch.Tensor]  # the model's output -> its scalar
    reference_of: Callable[[Any], torch.Tensor]


def _own(output: Any) -> Callable[[Any], torch.Tensor] | None:
    """Where ``output`` keeps its own loss: ``.loss`` or a 0-dim floating tensor in a tuple."""
    loss = getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.dim() == 0 and loss.requires_grad:
        return _attribute_loss
    if isinstance(output, (tuple, list)):
        for i, item in enumerate(output):
            if isinstance(item, torch.Tensor) and item.dim() == 0 and \
                    item.is_floating_point() and item.requires_grad:
                return _item(i)
    return None


def _attribute_loss(value: Any) -> torch.Tensor:
    loss: torch.Tensor = value.loss
    return loss


def _item(i: int) -> Callable[[Any], torch.Tensor]:
    return lambda value: value[i]


def _nth(i: int) -> Callable[[Any], torch.Tensor]:
    return lambda value: list(iter_tensors(value))[i]


def choose_loss(output: Any, reference_output: Any, inputs: tuple[Any, ...]) -> Loss | None:
    """The loss for these outputs (see the module docstring); None: nothing to differentiate."""
    mine, theirs = _own(output), _own(reference_output)
    if mine is not None and theirs is not None:
        return Loss(description="the models' own loss (the loss in their outputs)", of=mine,
                    reference_of=theirs)
    tensors, ref_tensors = list(iter_tensors(output)), list(iter_tensors(reference_output))
    pairs = [(i, j) for i, j in pair_tensors(tensors, ref_tensors)
             if tensors[i].shape == ref_tensors[j].shape and tensors[i].requires_grad
             and ref_tensors[j].requires_grad and tensors[i].is_floating_point()]
    if not pairs:
        return None
    i, j = pairs[0]
    ids = next(iter_tensors(list(inputs)), None)
    logits = tensors[i]
    if ids is not None and ids.dim() == 2 and not ids.is_floating_point() and \
            ids.dtype != torch.bool and ids.shape[1] > 1 and logits.dim() == 3 and \
            logits.shape[:2] == ids.shape and int(ids.max()) < logits.shape[-1]:
        targets = ids[:, 1:].reshape(-1)

        def next_token(pick: Callable[[Any], torch.Tensor]) -> Callable[[Any], torch.Tensor]:
            def loss(value: Any) -> torch.Tensor:
                scores = pick(value)[:, :-1]  # (B, T-1, V): position t predicts token t+1
                return F.cross_entropy(scores.reshape(-1, scores.shape[-1]).float(),
                                       targets.to(scores.device))
            return loss

        return Loss(description="next-token cross-entropy of the logits (B, T, V) against the "
                                "input ids shifted by one", of=next_token(_nth(i)),
                    reference_of=next_token(_nth(j)))
    generator = torch.Generator(device="cpu").manual_seed(_SEED)
    weights = torch.randn(logits.shape, generator=generator)

    def projection(pick: Callable[[Any], torch.Tensor]) -> Callable[[Any], torch.Tensor]:
        def loss(value: Any) -> torch.Tensor:
            out = pick(value)
            return (out * weights.to(out.device, out.dtype)).sum()
        return loss

    return Loss(description="sum(output * R), R a fixed N(0, 1) tensor from seed 0 (the "
                            "outputs carry no loss and are not LM logits)",
                of=projection(_nth(i)), reference_of=projection(_nth(j)))
