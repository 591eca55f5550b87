"""watch_nans under torch.distributed (gloo, 2 CPU processes, DistributedDataParallel).

A NaN made on one rank is reported with that rank, and the other rank raises too instead of
waiting forever in the next collective. The two ranks run this file as a script.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from torchlens_edu.nans import NonFiniteError, watch_nans


class LogNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.log(x))


class WhereNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        with torch.no_grad():
            self.fc.weight.fill_(0.1)
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return torch.where(h > 0, torch.sqrt(h), 0.0)


def _step(model: nn.Module, x: torch.Tensor) -> dict | None:
    try:
        with watch_nans(DistributedDataParallel(model)) as watched:
            watched.model(x).sum().backward()
    except NonFiniteError as err:
        return err.report.to_dict()
    return None


class Block(nn.Module):
    def __init__(self, pre: str = "") -> None:  # pre: "log" or "sqrt" before the layer
        super().__init__()
        self.fc, self.pre = nn.Linear(4, 4), pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre == "log":
            x = torch.log(x)
        elif self.pre == "sqrt":
            x = torch.sqrt(x)  # sqrt(0) = 0, but its gradient is infinite
        return self.fc(x)


class Stack(nn.Module):
    """Two blocks and a head, sharded as FSDP2 is used: each block, then the root.

    ``fault``: "" (blocks.0 takes a log), "where" (the where trap between the blocks) or
    "sqrt" (blocks.1 takes a sqrt); with a fault, blocks.0 passes its input on unchanged."""

    def __init__(self, fault: str = "") -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block("" if fault else "log"),
                                     Block("sqrt" if fault == "sqrt" else "")])
        self.head, self.where = nn.Linear(4, 1), fault == "where"
        if fault:
            with torch.no_grad():
                self.blocks[0].fc.weight.copy_(torch.eye(4))
                self.blocks[0].fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks[0](x)
        if self.where:  # x <= 0: NaN gradient (the where trap)
            x = torch.where(x > 0, torch.sqrt(x), 0.0)
        return self.head(self.blocks[1](x))


def _fsdp_step(x: torch.Tensor, *, fault: str = "", inf_shard: bool = False) -> dict | None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    model = Stack(fault)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    if inf_shard and dist.get_rank() == 1:
        with torch.no_grad():
            model.blocks[1].fc.weight.to_local()[0, 0] = float("inf")  # rank 1's shard only
    report = None
    try:
        with watch_nans(model):
            model(x).sum().backward()
    except NonFiniteError as err:
        report = err.report.to_dict()
    if report is not None and report["phase"] == "forward":  # no backward ran
        model(x).sum().backward()  # the model still works, sharded as before
        assert all(isinstance(p, DTensor) for p in model.parameters())
        return report
    # the backward and its replays resharded the parameters, and left the step's gradients
    # as the step made them: those of the same step without the watch
    assert all(isinstance(p, DTensor) for p in model.parameters())
    watched = [p.grad.to_local().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()
    plain = [p.grad.to_local() for p in model.parameters()]
    assert all(torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)  # equal, NaN included
               for a, b in zip(watched, plain, strict=True))
    return report


def _dtensor_step(x: torch.Tensor) -> list:
    from torch.distributed.tensor import (
        DTensor,
        Replicate,
        Shard,
        distribute_tensor,
        init_device_mesh,
    )

    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    linear = nn.Linear(4, 4)
    linear.weight = nn.Parameter(distribute_tensor(linear.weight.detach(), mesh, [Shard(0)]))
    linear.bias = nn.Parameter(distribute_tensor(linear.bias.detach(), mesh, [Replicate()]))
    model = nn.Sequential(linear, nn.ReLU())
    with watch_nans(model) as watch:
        for _ in range(2):
            model(DTensor.from_local(x, mesh, [Replicate()])).sum().backward()
    return [r.to_dict() for r in watch.reports]


class Centered(nn.Module):
    """Replicated DTensor weights, each rank's own rows: ``h.mean()`` over every rank's rows
    is an all-reduce inside the forward (a replay on one rank alone would wait for it)."""

    def __init__(self) -> None:
        from torch.distributed.tensor import Replicate, distribute_tensor, init_device_mesh

        super().__init__()
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        self.fc = nn.Linear(4, 4)
        for name in ("weight", "bias"):
            replicated = distribute_tensor(getattr(self.fc, name).detach(), mesh, [Replicate()])
            setattr(self.fc, name, nn.Parameter(replicated))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.log(x))  # log(-1) on rank 1's rows only
        return h - h.mean()


def _dtensor_nan(x: torch.Tensor) -> dict | None:
    from torch.distributed.tensor import DTensor, Shard

    torch.manual_seed(0)
    model = Centered()
    rows = DTensor.from_local(x, model.fc.weight.device_mesh, [Shard(0)])
    try:
        with watch_nans(model):
            model(rows).sum().backward()
    except NonFiniteError as err:
        return err.report.to_dict()
    return None


def _worker(rank: int, world: int, out: Path) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    torch.manual_seed(0)
    results = {}
    x = torch.rand(3, 4) + 0.5
    if rank == 1:
        x[0, 0] = -1.0  # log(-1): NaN on rank 1 only
    results["forward"] = _step(LogNet(), x)
    sign = -1.0 if rank == 0 else 1.0  # rank 0's h < 0: the where trap, in its backward
    results["backward"] = _step(WhereNet(), torch.full((3, 4), sign))
    clean = torch.rand(3, 4) + 0.5
    results["fsdp_clean"] = _fsdp_step(clean)
    results["fsdp_forward"] = _fsdp_step(x)  # rank 1: log(-1) in blocks.0
    results["fsdp_inf_shard"] = _fsdp_step(clean, inf_shard=True)
    # rank 0 only: its activations turn negative, the where trap in its backward
    results["fsdp_backward"] = _fsdp_step(clean if rank else -clean, fault="where")
    # rank 1 only: a 0 reaches blocks.1's sqrt, an infinite gradient in its backward
    zero = clean.clone()
    if rank == 1:
        zero[0, 0] = 0.0
    results["fsdp_backward_inf"] = _fsdp_step(zero, fault="sqrt")
    results["dtensor_clean"] = _dtensor_step(clean)
    results["dtensor_forward"] = _dtensor_nan(x)  # rank 1: log(-1), then an all-reduce
    total = torch.ones(1)
    dist.all_reduce(total)  # the process group still works
    results["all_reduce"] = total.item()
    out.write_text(json.dumps(results))
    dist.barrier()  # gloo: a rank that tears down while the other still talks aborts
    dist.destroy_process_group()


def test_break_mode_under_fsdp_says_why_it_does_not_stop(gloo_world, capsys):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Stack()
    fully_shard(model)
    x = torch.rand(3, 4) + 0.5
    x[0, 0] = -1.0
    with pytest.raises(NonFiniteError) as err, watch_nans(model, mode="break"):
        model(x)
    assert (err.value.report.op, err.value.report.module) == ("log", "blocks.0")
    said = " ".join(capsys.readouterr().err.split())
    assert (f"watch_nans(mode='break'): no debugger stop at {err.value.report.source}: the "
            "replay up to that line would run the step's collectives (FSDP's parameter "
            "gathers, DTensor redistributions) on this rank alone, and wait forever for the "
            "others; raising NonFiniteError") in said
    assert err.value.report.source.endswith(f":{_line('x = torch.log(x)')}")
    model(torch.ones(3, 4)).sum().backward()  # and the model still trains


def test_a_backward_that_skips_the_output_under_fsdp_says_why_it_is_not_replayed(gloo_world):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = Stack()
    fully_shard(model)
    kept: list[torch.Tensor] = []
    model.blocks[1].register_forward_hook(lambda _m, _a, out: kept.append(out))
    with pytest.raises(NonFiniteError) as err, watch_nans(model):
        model(torch.rand(3, 4) + 0.5)
        # a loss on an inner activation: no gradient reaches the model's output to replay from
        torch.sqrt(kept[0] - kept[0]).sum().backward()
    report = err.value.report
    assert (report.phase, report.module, report.op, report.cause) == (
        "backward", "blocks.1.fc", "", "not_reproduced")
    assert ("under FSDP every rank replays the backward together or none does, and a rank had "
            "no watched forward (or no output gradient) to replay it from") in report.hint
    model(torch.ones(3, 4)).sum().backward()  # and the model still trains


def _line(code: str) -> int:
    """The line of this file that holds ``code``."""
    lines = Path(__file__).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if code in line)


@pytest.mark.slow
def test_nan_on_one_rank_is_reported_with_its_rank_and_nobody_hangs(two_ranks):
    r0, r1 = two_ranks(__file__)

    # forward: rank 1 made the NaN and says so; rank 0 stops too, pointing at rank 1
    assert (r1["forward"]["rank"], r1["forward"]["phase"], r1["forward"]["op"]) == (
        1, "forward", "log")
    assert r1["forward"]["module"] == "module"  # the model inside the DDP wrapper
    assert (r0["forward"]["rank"], r0["forward"]["cause"]) == (0, "other_rank")
    assert "rank 1" in r0["forward"]["hint"]

    # backward: rank 0 fell into the where trap; rank 1 stops too
    assert (r0["backward"]["rank"], r0["backward"]["phase"], r0["backward"]["op"]) == (
        0, "backward", "SqrtBackward0")
    assert r0["backward"]["cause"] == "where_trap"
    assert (r1["backward"]["rank"], r1["backward"]["cause"]) == (1, "other_rank")

    # FSDP2: checks on local shards, replays on every rank or none, the guilty rank named
    assert r0["fsdp_clean"] is None and r1["fsdp_clean"] is None
    assert (r1["fsdp_forward"]["rank"], r1["fsdp_forward"]["module"],
            r1["fsdp_forward"]["op"]) == (1, "blocks.0", "log")
    assert (r0["fsdp_forward"]["cause"], r0["fsdp_forward"]["phase"]) == ("other_rank",
                                                                          "forward")
    assert "rank 1 found nan in the forward" in r0["fsdp_forward"]["hint"]
    for r in (r0, r1):  # the gathered weight holds rank 1's inf on every rank
        inf = r["fsdp_inf_shard"]
        assert (inf["module"], inf["op"], inf["cause"]) == ("blocks.1.fc", "linear", "exploding")
        assert "parameter blocks.1.fc.weight" in inf["hint"]
    assert "it is in this rank's shard (rank 1)" in r1["fsdp_inf_shard"]["hint"]
    assert "another rank's shard holds it" in r0["fsdp_inf_shard"]["hint"]
    # FSDP2 backward: every rank replays it together; the guilty rank names the node, its
    # module and line, the other rank points at it
    back = r0["fsdp_backward"]
    assert (back["rank"], back["phase"], back["op"], back["cause"]) == (
        0, "backward", "SqrtBackward0", "where_trap")
    assert back["module"] == "" and back["forward_op"] == "sqrt"  # between the blocks
    assert back["source"] == f"{__file__}:{_line('x = torch.where(x > 0, torch.sqrt(x), 0.0)')}"
    assert (r1["fsdp_backward"]["cause"], r1["fsdp_backward"]["phase"]) == ("other_rank",
                                                                            "backward")
    assert "rank 0 found nan in the backward" in r1["fsdp_backward"]["hint"]
    inf = r1["fsdp_backward_inf"]
    assert (inf["rank"], inf["phase"], inf["module"], inf["op"], inf["kind"]) == (
        1, "backward", "blocks.1", "SqrtBackward0", "+inf")
    assert inf["source"] == f"{__file__}:{_line('x = torch.sqrt(x)  # sqrt(0)')}"
    assert inf["cause"] == "log_sqrt" and "the derivative of sqrt is infinite at 0" in inf["hint"]
    assert "1 zero(s)" in inf["hint"]
    assert (r0["fsdp_backward_inf"]["rank"], r0["fsdp_backward_inf"]["cause"]) == (
        0, "other_rank")
    assert "rank 1 found +inf in the backward" in r0["fsdp_backward_inf"]["hint"]

    # plain DTensor parameters: no false alarm; afterwards the process group still works
    assert r0["dtensor_clean"] == [] and r1["dtensor_clean"] == []
    # a NaN on one rank's rows, with a collective in the forward: every rank replays together
    # (rank 1 alone used to wait in the all-reduce while rank 0 waited for its verdict)
    nan = r1["dtensor_forward"]
    assert (nan["rank"], nan["phase"], nan["op"], nan["cause"]) == (1, "forward", "log", "log_sqrt")
    assert nan["source"] == f"{__file__}:{_line('h = self.fc(torch.log(x))  # log(-1)')}"
    # the mean carried it to rank 0 too, which raises with its own report, pointing at rank 1
    assert (r0["dtensor_forward"]["rank"], r0["dtensor_forward"]["phase"]) == (0, "forward")
    assert ("rank 1 found non-finite values in this step too: a value that crosses ranks (a "
            "DTensor redistribution, FSDP's gather of a parameter) reaches every rank, and the "
            "rank whose producer had finite inputs made it") in r0["dtensor_forward"]["hint"]
    assert "rank 0 found non-finite values in this step too" in nan["hint"]
    assert r0["all_reduce"] == r1["all_reduce"] == 2.0


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
