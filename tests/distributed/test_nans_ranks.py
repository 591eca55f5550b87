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
    def __init__(self, log: bool = False) -> None:
        super().__init__()
        self.fc, self.log = nn.Linear(4, 4), log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.log(x) if self.log else x)


class Stack(nn.Module):
    """Two blocks and a head, sharded as FSDP2 is used: each block, then the root."""

    def __init__(self, where: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(log=not where), Block()])
        self.head, self.where = nn.Linear(4, 1), where

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks[0](x)
        if self.where:  # x <= 0: NaN gradient (the where trap)
            x = torch.where(x > 0, torch.sqrt(x), 0.0)
        return self.head(self.blocks[1](x))


def _fsdp_step(x: torch.Tensor, *, where: bool = False, inf_shard: bool = False) -> dict | None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    model = Stack(where)
    if where:  # blocks.0 passes x on unchanged: its sign decides
        with torch.no_grad():
            model.blocks[0].fc.weight.copy_(torch.eye(4))
            model.blocks[0].fc.bias.zero_()
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
    model(x).sum().backward()  # the model still works, sharded as before
    assert all(isinstance(p, DTensor) for p in model.parameters())
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
    results["fsdp_backward"] = _fsdp_step(clean if rank else -clean, where=True)
    results["dtensor_clean"] = _dtensor_step(clean)
    total = torch.ones(1)
    dist.all_reduce(total)  # the process group still works
    results["all_reduce"] = total.item()
    out.write_text(json.dumps(results))
    dist.destroy_process_group()


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
    back = r0["fsdp_backward"]
    assert (back["rank"], back["phase"], back["cause"]) == (0, "backward", "not_reproduced")
    assert back["module"] == "blocks.0.fc"  # the first module whose output gradient held it
    assert "under FSDP the backward is not replayed" in back["hint"]
    assert (r1["fsdp_backward"]["cause"], r1["fsdp_backward"]["phase"]) == ("other_rank",
                                                                            "backward")

    # plain DTensor parameters: no false alarm; afterwards the process group still works
    assert r0["dtensor_clean"] == [] and r1["dtensor_clean"] == []
    assert r0["all_reduce"] == r1["all_reduce"] == 2.0


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
