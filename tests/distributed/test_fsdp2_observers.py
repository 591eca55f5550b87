"""capture and shape traces of an FSDP2 model (one gloo rank in this process): they work or
refuse before touching anything, and the model, its sharding and its values stay intact."""

from __future__ import annotations

import json
import re
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import torchlens_edu as tle
from torchlens_edu.capture import capture


def _sharded() -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    fully_shard(model[0])
    fully_shard(model)
    return model


def _intact(model: nn.Module, before: dict[str, torch.Tensor], x: torch.Tensor) -> None:
    from torch.distributed.tensor import DTensor

    assert all(isinstance(p, DTensor) for p in model.parameters())
    after = {name: p.to_local().detach().clone() for name, p in model.named_parameters()}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    model(x).sum().backward()  # later steps still run, and reshard


def test_capture_of_an_fsdp2_model_works_and_leaves_it_sharded(gloo_world):
    model, x = _sharded(), torch.ones(3, 4)
    before = {name: p.to_local().detach().clone() for name, p in model.named_parameters()}
    with capture(model, "*") as cache:
        out = model(x)
        out.sum().backward()  # FSDP2 reshards the root's parameters in the backward
    assert [path for path, _ in cache] == ["0", "1", "2", ""]  # in the order they ended
    assert "a sharded model is not copied" in cache.note
    assert torch.equal(cache["2"], out.detach())
    _intact(model, before, x)


def test_meta_trace_of_an_fsdp2_model_refuses_before_touching_it(gloo_world):
    model, x = _sharded(), torch.ones(3, 4)
    before = {name: p.to_local().detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"meta=True cannot run a model sharded by FSDP2 "
                       r"\(fully_shard\).*\(meta=False, on every rank\).*before fully_shard"):
        tle.trace_shapes(model, x, meta=True)
    _intact(model, before, x)
    trace = tle.trace_shapes(model, x)  # the real run works
    assert "(3, 6) -> (3, 6)" in str(trace)
    model(x).sum().backward()
    _intact(model, before, x)


def _op_rows(model: nn.Module, x: torch.Tensor) -> tuple[list[tuple], list[str]]:
    """The op events of ``trace_shapes(model, x, ops=True)`` as (path, name, folded ops),
    and the trace's rows that speak of FSDP."""
    trace = tle.trace_shapes(model, x, ops=True)
    ops = [(e.path, e.name, list(e.folded)) for e in trace.events if e.kind == "op"]
    rows = [row for row in (line.strip("│├└─ ") for line in trace.to_text(200).splitlines())
            if row.startswith("FSDP ")]
    return ops, rows


def test_op_trace_folds_fsdp_internal_ops(gloo_world):
    model, x = _sharded(), torch.ones(3, 4)
    ops, rows = _op_rows(model, x)
    # the user's ops, in order, each once, at the user's line; FSDP's own work (profiler
    # markers, hooking the backward) is one folded row per hook call, at the module it serves
    assert [(path, name) for path, name, folded in ops if not folded] == [
        ("0", "linear"), ("1", "layer_norm"), ("2", "linear")]
    assert [(path, name) for path, name, folded in ops if folded] == [
        ("", "FSDP gathered the parameters of the root"),
        ("0", "FSDP gathered the parameters of 0"), ("0", "FSDP finished the forward of 0"),
        ("", "FSDP finished the forward of the root")]
    assert "FSDP finished the forward of 0: 3 ops (register_hook)" in rows
    model(x).sum().backward()


def _worker(rank: int, world: int, out: Path) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    model, x = _sharded(), torch.full((3, 4), float(rank + 1))
    before = {name: p.to_local().detach().clone() for name, p in model.named_parameters()}
    with capture(model, "*") as cache:
        model(x).sum().backward()
    results = {"captured": [path for path, _ in cache], "shape": list(cache["1"].shape)}
    _intact(model, before, x)
    try:
        tle.trace_shapes(model, x, meta=True)
    except ValueError as err:
        results["meta"] = str(err)
    _intact(model, before, x)
    results["ops"], results["rows"] = _op_rows(model, x)
    model(x).sum().backward()  # FSDP keeps the root gathered from a forward to its backward
    _intact(model, before, x)
    total = torch.ones(1)
    dist.all_reduce(total)  # the process group still works
    results["all_reduce"] = total.item()
    out.write_text(json.dumps(results))
    dist.barrier()  # gloo: a rank that tears down while the other still talks aborts
    dist.destroy_process_group()


@pytest.mark.slow
def test_capture_and_meta_trace_of_fsdp2_on_two_ranks(two_ranks):
    r0, r1 = two_ranks(__file__)
    for r in (r0, r1):
        assert r["captured"] == ["0", "1", "2", ""] and r["shape"] == [3, 6]
        assert r["meta"].startswith("meta=True cannot run a model sharded by FSDP2")
        assert r["all_reduce"] == 2.0
        # each gathering is one row, attributed to the module whose parameters it gathered
        gathers = [(path, name) for path, name, folded in r["ops"] if "all_gather_single" in folded]
        assert gathers == [("", "FSDP gathered the parameters of the root"),
                           ("0", "FSDP gathered the parameters of 0")]
        assert not {"all_gather_single", "split_with_sizes_copy", "_record_function_enter_new",
                    "register_hook"} & {name for _, name, _ in r["ops"]}
        row = next(row for row in r["rows"] if row.startswith("FSDP gathered the parameters of 0"))
        assert re.fullmatch(r"FSDP gathered the parameters of 0: \d+ ops \(.*all_gather_single, "
                            r".*split_with_sizes_copy.*\)", row), row
    assert r0["ops"] == r1["ops"] and r0["rows"] == r1["rows"]  # the same rows on each rank


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
