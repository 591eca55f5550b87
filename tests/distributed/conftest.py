"""Process groups for the distributed tests: one gloo rank in this process, or two gloo ranks
spawned as scripts, each bounded by a timeout (a hang fails the test, never the CI job).

Every test in this folder is marked ``distributed`` here (``-m "not distributed"`` leaves them
out), and skipped where torch has no ``torch.distributed``."""

from __future__ import annotations

import faulthandler
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

TIMEOUT_S = 90
_PORT_TAKEN = "EADDRINUSE"  # what gloo's TCP store says when its port is already taken
HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.distributed)
            item.add_marker(pytest.mark.skipif(not dist.is_available(),
                                               reason="no torch.distributed"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gloo_world() -> Iterator[None]:
    """A 1-rank gloo process group in this process, destroyed afterwards."""
    # an in-memory store: no port to race for with tests running beside this one
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=timedelta(seconds=30))
    # a hang in this process would hold the CI job: dump where it hangs and exit instead
    faulthandler.dump_traceback_later(TIMEOUT_S, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        dist.destroy_process_group()


@pytest.fixture
def two_ranks(tmp_path: Path) -> Callable[[str], list[dict]]:
    """Run a script as 2 gloo ranks (argv: rank, world size, output file); their JSON results.

    The script calls ``dist.init_process_group("gloo")`` itself (MASTER_ADDR/PORT are set)."""

    def run(script: str) -> list[dict]:
        # A free port can be taken by a test running beside this one before rank 0 binds it:
        # then (and only then) the ranks start again on another port.
        for _ in range(3):
            returncodes, logs = launch(script)
            if returncodes == [0, 0] or not any(_PORT_TAKEN in log for log in logs):
                break
        assert returncodes == [0, 0], "\n".join(logs)
        return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]

    def launch(script: str) -> tuple[list[int | None], list[str]]:
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
               "OMP_NUM_THREADS": "1"}
        outs = [tmp_path / f"rank{rank}.json" for rank in range(2)]
        procs = [subprocess.Popen([sys.executable, script, str(rank), "2", str(out)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for rank, out in enumerate(outs)]
        logs = []
        try:
            for proc in procs:
                try:
                    logs.append(proc.communicate(timeout=TIMEOUT_S)[0].decode())
                except subprocess.TimeoutExpired:
                    logs.append(f"rank {len(logs)}: still running after {TIMEOUT_S} s (a hang)")
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return [p.returncode for p in procs], logs

    return run
