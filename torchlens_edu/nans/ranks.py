"""The NaN watch under torch.distributed: every rank learns every rank's verdict.

A rank that raises alone leaves the others blocked in their next collective. So at each check
the ranks exchange a small verdict code (one all_reduce, with a timeout); if any rank found a
NaN/Inf, all of them raise: the rank that found it with its report, the others pointing at it.
"""

from __future__ import annotations

import time
from datetime import timedelta

import torch

from torchlens_edu.nans.report import Kind, Phase

DIST_TIMEOUT = timedelta(minutes=5)  # how long a rank waits for the others' verdict
_KINDS: tuple[Kind, ...] = ("nan", "+inf", "-inf", "inf")  # "inf": an Inf of either sign
_PHASES: tuple[Phase, ...] = ("input", "forward", "backward")


def rank() -> int | None:
    """This process's rank under torch.distributed, None outside it."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else None


def encode(phase: Phase, kind: Kind) -> int:
    """A verdict as a small positive int (0 means clean).

    >>> decode(encode("backward", "-inf"))
    ('backward', '-inf')
    """
    return (_PHASES.index(phase) + 1) * 8 + _KINDS.index(kind) + 1


def decode(code: int) -> tuple[Phase, Kind]:
    """``(phase, kind)`` of a non-zero verdict code."""
    return _PHASES[code // 8 - 1], _KINDS[code % 8 - 1]


def share(code: int) -> list[int]:
    """Every rank's verdict code, in rank order (just ``[code]`` outside torch.distributed)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return [code]
    device = torch.device("cpu")
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    codes = torch.zeros(dist.get_world_size(), dtype=torch.int32, device=device)
    codes[dist.get_rank()] = code
    start = time.monotonic()
    try:
        dist.all_reduce(codes, async_op=True).wait(timeout=DIST_TIMEOUT)
    except RuntimeError as err:
        # the process group's own timeout may end the wait first: say how long it was
        waited = timedelta(seconds=round(time.monotonic() - start))
        raise RuntimeError(
            f"watch_nans: rank {dist.get_rank()} waited {waited} for the other ranks' "
            "NaN check and gave up; every rank must run the same watched forward/backward "
            "steps (same `every`)") from err
    return codes.tolist()
