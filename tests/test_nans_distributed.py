"""watch_nans under torch.distributed (gloo, 2 CPU processes, DistributedDataParallel).

A NaN made on one rank is reported with that rank, and the other rank raises too instead of
waiting forever in the next collective. The two ranks run this file as a script.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from torchlens_edu.nans import NonFiniteError, watch_nans

TIMEOUT_S = 90  # a hang must fail the test, never the CI job


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
    out.write_text(json.dumps(results))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_nan_on_one_rank_is_reported_with_its_rank_and_nobody_hangs(tmp_path):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, str(rank), "2", str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for rank in range(2)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=TIMEOUT_S)[0].decode())
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))

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


if __name__ == "__main__":
    rank_arg, world_arg, out_dir = sys.argv[1:4]
    _worker(int(rank_arg), int(world_arg), Path(out_dir) / f"rank{rank_arg}.json")
