"""Find the producer in a backward pass: the first autograd node whose incoming gradients are
finite and whose outgoing gradients are not.

The replayed forward records which call (and user line, and module) created each node; here a
hook goes on every node of the graph, and the first one that turns finite gradients into
non-finite ones stops the backward with its report. A zero incoming gradient times an infinite
local derivative is the ``torch.where`` trap, worth its own hint.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch

from torchlens_edu.nans.causes import backward_cause, hint_for
from torchlens_edu.nans.report import Kind, Producer, TensorSummary, bad_kinds


@dataclass(frozen=True, kw_only=True)
class Creation:
    """Where an autograd node came from: the forward call that made it."""

    index: int = -1
    op: str = ""
    module: str = ""
    source: str = ""
    inputs: tuple[torch.Tensor, ...] = ()


class GraphWatch:
    """Hooks on every node of a replayed graph that hand the producer to ``found``.

    ``found`` raises :class:`Found` to stop the backward there, or notes the producer and lets
    the backward run on (under FSDP every rank's backward must reach the same collectives).
    ``quiet`` keeps our own checks out of the replay's bookkeeping; ``params_of(path)``
    summarises a module's parameters for the report.
    """

    def __init__(self, created: Mapping[Any, Creation], kinds: frozenset[Kind],
                 dims: Mapping[str, int] | None,
                 params_of: Callable[[str], list[TensorSummary]],
                 quiet: Callable[[], AbstractContextManager[None]],
                 found: Callable[[Producer], None]) -> None:
        self.created, self.kinds, self.dims = created, kinds, dims
        self.params_of, self.quiet, self.found = params_of, quiet, found
        self._done = False  # a producer was handed on: the nodes after it are downstream

    def hook_graph(self, roots: list[torch.Tensor]) -> list[torch.Tensor]:
        """A hook on every node reachable from ``roots``; nodes made inside a call (the parts
        of a composite op) take the creation of the node they were first reached from.

        Returns the graph's leaves, the tensors to differentiate for: under FSDP they are the
        gathered parameters, not the sharded ones ``model.parameters()`` lists.
        """
        leaves: list[torch.Tensor] = []
        queue = deque(t.grad_fn for t in roots if t.grad_fn is not None)
        creation = {node: self.created.get(node, Creation()) for node in queue}
        while queue:
            node = queue.popleft()
            if type(node).__name__ == "AccumulateGrad":
                leaves.append(node.variable)  # type: ignore[attr-defined]  # not in the stubs
            else:
                node.register_hook(self._hook(node, creation[node]))
            for nxt, _ in node.next_functions:
                if nxt is not None and nxt not in creation:
                    creation[nxt] = self.created.get(nxt, creation[node])
                    queue.append(nxt)
        return leaves

    def _hook(self, node: Any, made: Creation) -> Callable:
        def hook(grad_inputs: tuple, grad_outputs: tuple) -> None:
            if self._done:
                return
            with self.quiet():
                self._check(node, made, grad_inputs, grad_outputs)

        return hook

    def _check(self, node: Any, made: Creation, grad_inputs: tuple,
               grad_outputs: tuple) -> None:
        incoming = [g for g in grad_outputs if g is not None]
        if any(bad_kinds(g, self.kinds) for g in incoming):
            return  # downstream of the producer
        outgoing = [g for g in grad_inputs if g is not None]
        if any(bad_kinds(g, self.kinds) for g in outgoing):
            self._done = True
            self.found(self._producer(node, made, incoming, outgoing))

    def _producer(self, node: Any, made: Creation, incoming: list[torch.Tensor],
                  outgoing: list[torch.Tensor]) -> Producer:
        ins = [TensorSummary.of(f"grad of output {i}", g, self.dims)
               for i, g in enumerate(incoming)]
        forward = [TensorSummary.of(f"forward input {i}", t, self.dims)
                   for i, t in enumerate(made.inputs)]
        ins += forward
        outs = [TensorSummary.of(f"grad of input {i}", g, self.dims)
                for i, g in enumerate(outgoing)]
        cause, detail = backward_cause(node.name(), made.op, zero_where_bad(incoming, outgoing),
                                       outs, forward if made.inputs else None)
        return Producer(phase="backward", index=made.index, op=node.name(), module=made.module,
                        source=made.source, cause=cause, hint=hint_for(cause, detail),
                        inputs=ins, outputs=outs, params=self.params_of(made.module),
                        forward_op=made.op)


def zero_where_bad(incoming: list[torch.Tensor], outgoing: list[torch.Tensor]) -> bool:
    """True when the incoming gradient is exactly 0 wherever the outgoing one is non-finite.

    >>> zero_where_bad([torch.tensor([0.0, 1.0])], [torch.tensor([float("nan"), 2.0])])
    True
    """
    if not incoming:
        return False
    g_in = incoming[0]
    for g_out in outgoing:
        if g_out.shape != g_in.shape:
            continue
        bad = ~torch.isfinite(g_out)
        if bool(bad.any()):
            return bool((g_in[bad] == 0).all())
    return False
