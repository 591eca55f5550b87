"""Training under DDP and FSDP2 with every feature of the toolkit used along the way leaves the
parameters bit-identical to those of a twin trained without it (gloo, 2 CPU ranks).

Each rank trains the same small model twice from the same seed, the same batches and the same
optimizer: once plainly, once with describe/show, hooks, a capture with gradients, module and op
traces, a meta trace (refused under FSDP2) and the NaN watch around every step (which finds a
diagnostic's overflow and replays the step each time). Afterwards the
parameters must be equal bit for bit (a DTensor compared by ``full_tensor()``), FSDP2's sharding
as it was (DTensors with the same placements), and the process group still working.
"""

from __future__ import annotations

import io
import json
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from rich.console import Console

import torchlens_edu as tle
from torchlens_edu.capture import capture

STEPS = 3


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(self.ln(x)))  # (B, 8) residual


class Probe(nn.Module):
    """A diagnostic that overflows: its second output is +inf, but nothing trains on it, so
    the NaN watch (in ``mode="warn"``) reports and replays every step without a NaN in any
    gradient: the replays must leave the training as it was."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, torch.exp(x.detach().abs().amax() * 1e3)  # exp(large): +inf


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.probe, self.head = Probe(), nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        x, _ = self.probe(x)
        return self.head(x)  # (B, 1)


def _wrapped(kind: str) -> tuple[nn.Module, nn.Module]:
    """(what the training loop calls, the model inside it), built from seed 0."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    model = Net()
    if kind == "ddp":
        return DistributedDataParallel(model), model
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model, model


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank's own batch for ``step`` (the ranks differ: DDP/FSDP average gradients)."""
    g = torch.Generator().manual_seed(1000 * dist.get_rank() + step)
    return torch.randn(4, 8, generator=g), torch.randn(4, 1, generator=g)


def _use_the_toolkit(model: nn.Module, inner: nn.Module, x: torch.Tensor, kind: str,
                     seen: dict) -> None:
    """Every observer once, between two training steps."""
    console = Console(file=io.StringIO(), width=100)
    seen["describe"] = [tle.describe(p) for p in inner.parameters()]
    tle.show(next(inner.parameters()), console=console)
    calls: list[str] = []
    with tle.hooks(model) as h:
        h.forward("*", lambda call: calls.append(call.path))
        model(x).sum().backward()
    seen["hooked"] = calls
    with capture(model, "*", grads=True) as cache:
        model(x).sum().backward()
    seen["captured"] = [path for path, _ in cache]
    seen["trace"] = len(tle.trace_shapes(model, x).events)
    seen["op_trace"] = len(tle.trace_shapes(model, x, ops=True).events)
    model(x).sum().backward()  # FSDP keeps the root gathered from a forward to its backward
    try:
        seen["meta"] = len(tle.trace_shapes(model, x, meta=True).events)
    except ValueError as err:  # FSDP2 refuses before touching the model
        seen["meta"] = str(err)
    inner.zero_grad(set_to_none=True)  # the toolkit's backwards are not the training's


def _train(kind: str, toolkit: bool) -> tuple[nn.Module, dict]:
    model, inner = _wrapped(kind)
    opt = torch.optim.AdamW(inner.parameters(), lr=1e-2)
    seen: dict = {}
    for step in range(STEPS):
        x, y = _batch(step)
        if toolkit:
            _use_the_toolkit(model, inner, x, kind, seen)
            with tle.watch_nans(model, mode="warn") as watch:
                loss = ((model(x) - y) ** 2).mean()
                loss.backward()
            seen.setdefault("nan_reports", []).extend(
                (r.phase, r.module, r.op, r.rank) for r in watch.reports)
        else:
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return inner, seen


def _full(t: torch.Tensor) -> torch.Tensor:
    full = getattr(t, "full_tensor", None)  # a DTensor: gathered from every rank
    return (full() if full is not None else t).detach()


def _placements(model: nn.Module) -> dict[str, str]:
    return {name: str(getattr(p, "placements", "plain")) for name, p in model.named_parameters()}


def _worker(rank: int, world: int, out: Path) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    results = {}
    for kind in ("ddp", "fsdp"):
        plain, _ = _train(kind, toolkit=False)
        watched, seen = _train(kind, toolkit=True)
        same = {name: torch.equal(_full(a), _full(b)) for (name, a), (_, b) in
                zip(plain.named_parameters(), watched.named_parameters(), strict=True)}
        results[kind] = {"same": same, "placements": _placements(watched),
                         "plain_placements": _placements(plain), **seen}
    total = torch.ones(1)
    dist.all_reduce(total)  # the process group still works
    results["all_reduce"] = total.item()
    out.write_text(json.dumps(results))
    dist.barrier()  # gloo: a rank that tears down while the other still talks aborts
    dist.destroy_process_group()


@pytest.mark.slow
def test_training_with_every_feature_matches_a_twin_trained_without(two_ranks):
    for rank, r in enumerate(two_ranks(__file__)):
        for kind in ("ddp", "fsdp"):
            run = r[kind]
            assert run["same"] and all(run["same"].values()), (kind, run["same"])
            assert run["hooked"] and run["captured"] and run["trace"] and run["op_trace"]
            assert len(run["describe"]) == 10
            # the probe's +inf was found (by a replay, on every rank together) at every step
            prefix = "module." if kind == "ddp" else ""
            assert run["nan_reports"] == [["forward", f"{prefix}probe", "exp", rank]] * STEPS
        # FSDP2: still sharded as it was, and the observers said so
        fsdp = r["fsdp"]
        assert fsdp["placements"] == fsdp["plain_placements"]
        assert set(fsdp["placements"].values()) == {"(Shard(dim=0),)"}
        assert all("Shard(0)" in line for line in fsdp["describe"]), fsdp["describe"]
        assert fsdp["meta"].startswith("meta=True cannot run a model sharded by FSDP2")
        assert set(r["ddp"]["placements"].values()) == {"plain"}
        assert r["all_reduce"] == 2.0


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
