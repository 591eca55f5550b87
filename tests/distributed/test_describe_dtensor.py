"""describe/show of DTensors (every FSDP2 parameter is one): the placement from metadata, the
local shard's statistics labelled as local, no collective, never a hang."""

from __future__ import annotations

import io
import json
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from rich.console import Console

from torchlens_edu.printing.stats import tensor_stats
from torchlens_edu.printing.summary_line import describe
from torchlens_edu.printing.table import show


def _render_show(t: torch.Tensor) -> str:
    console = Console(width=100, no_color=True, record=True, file=io.StringIO())
    show(t, console=console)
    return console.export_text()


@pytest.mark.parametrize("numel", [1, 3, 4095, 4096, 4097, 3 * 4096 + 5])
def test_stats_of_a_plain_tensor_around_the_row_size(numel):
    # the fast CPU path sums squares in rows of 4096: a tensor shorter than a row, exactly
    # one, and one with a remainder all give the exact moments
    t = torch.linspace(-1.0, 3.0, numel, dtype=torch.float64).float()
    s = tensor_stats(t)
    assert s.numel == numel and not s.local
    assert s.mean == pytest.approx(t.double().mean().item(), rel=1e-6, abs=1e-9)
    if numel > 1:
        assert s.std == pytest.approx(t.double().std().item(), rel=1e-5)


def test_describe_and_show_a_small_dtensor_in_one_rank(gloo_world):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (1,))
    weight = distribute_tensor(torch.arange(12.0).reshape(3, 4), mesh, [Shard(0)])
    line = describe(weight)  # 12 elements: fewer than a row of 4096 (looped forever before)
    assert line.startswith("DTensor[3, 4] f32 cpu Shard(0) on mesh(1) local[3, 4] n=12")
    assert "local shard: μ=5.5 σ=3.606 [0, 11]" in line
    s = tensor_stats(weight)
    assert (s.local, s.numel, s.min, s.max) == (True, 12, 0.0, 11.0)
    bias = distribute_tensor(torch.ones(4), mesh, [Replicate()])
    assert "Replicate() on mesh(1) local[4]" in describe(bias)
    text = _render_show(weight)
    assert "values of this rank's local shard (other ranks hold the rest)" in text
    assert "11.0000" in text


def _worker(rank: int, world: int, out: Path) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6))
    fully_shard(model)
    results: dict = {}
    # only rank 1 describes and shows: a collective here would block it until the timeout
    if rank == 1:
        results["lines"] = {name: describe(p) for name, p in model.named_parameters()}
        results["show"] = _render_show(model[0].weight)
        results["local_weight"] = model[0].weight.to_local().tolist()
    total = torch.ones(1)
    dist.all_reduce(total)  # the process group still works, and nobody waited on a collective
    results["all_reduce"] = total.item()
    results["sharded"] = all(isinstance(p, DTensor) for p in model.parameters())
    out.write_text(json.dumps(results))
    dist.barrier()  # gloo: a rank that tears down while the other still talks aborts
    dist.destroy_process_group()


@pytest.mark.slow
def test_describe_fsdp2_parameters_on_one_rank_of_two(two_ranks):
    r0, r1 = two_ranks(__file__)
    assert r0["all_reduce"] == r1["all_reduce"] == 2.0
    assert r0["sharded"] and r1["sharded"]
    lines = r1["lines"]
    assert lines["0.weight"].startswith(
        "DTensor[6, 4] f32 cpu Shard(0) on mesh(2) local[3, 4] requires_grad n=24 (96 B) ")
    lo = min(min(row) for row in r1["local_weight"])
    assert "local shard: μ=" in lines["0.weight"] and f"[{lo:.4g}," in lines["0.weight"]
    # a LayerNorm weight: 6 elements, 3 on each rank, all ones
    assert lines["1.weight"] == ("DTensor[6] f32 cpu Shard(0) on mesh(2) local[3] requires_grad "
                                 "n=6 (24 B) local shard: all 1 NaN:0")
    assert "values of this rank's local shard" in r1["show"]


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
