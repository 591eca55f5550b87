"""Module patterns on a DistributedDataParallel model: the paths the user wrote for their own
model (``transformer.h.*.mlp``) match inside the wrapper (``module.transformer.h.1.mlp``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

import torchlens_edu as tle
from torchlens_edu._core.modules import PatternError, match_modules
from torchlens_edu.capture import capture


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.h = nn.ModuleList([Block(), Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.transformer.h:
            x = block(x)
        return x


def test_unwrapped_patterns_match_inside_ddp(gloo_world):
    ddp = DistributedDataParallel(Tiny())
    wanted = ["module.transformer.h.0.mlp", "module.transformer.h.1.mlp"]
    assert [p for p, _ in match_modules(ddp, "transformer.h.*.mlp")] == wanted
    assert [p for p, _ in match_modules(ddp, "module.transformer.h.*.mlp")] == wanted
    assert [p for p, _ in tle.inspect(ddp).modules("transformer.h.1.mlp")] == wanted[1:]
    x = torch.ones(2, 4)
    with capture(ddp, "transformer.h.*.mlp") as cache:
        ddp(x).sum().backward()
    assert sorted(path for path, _ in cache) == wanted
    trace = tle.trace_shapes(ddp, x, include="transformer.h.1.mlp")
    assert "transformer.h.1.mlp" in str(trace)
    with pytest.raises(PatternError, match=r"'transformer\.h\.\*\.mlpp' matches no module"):
        match_modules(ddp, "transformer.h.*.mlpp")
    # the wrapper's own root is not the inner model: "" still means the DDP module only
    assert [p for p, _ in match_modules(ddp, "")] == [""]


class SqrtOfZero(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(self.fc(x) * 0.0)  # sqrt(0): finite forward, inf gradient


def test_a_backward_error_under_ddp_says_what_ddp_does_next(gloo_world):
    ddp = DistributedDataParallel(SqrtOfZero())
    with pytest.raises(tle.NonFiniteError) as err, tle.watch_nans(ddp):
        ddp(torch.ones(2, 4)).sum().backward()
    report = err.value.report
    assert report.phase == "backward"
    assert "DistributedDataParallel backward" in report.hint
    assert "next step will fail with an internal assert (DDP's own behaviour)" in report.hint


def test_a_backward_report_without_ddp_has_no_ddp_note():
    model = SqrtOfZero()
    with pytest.raises(tle.NonFiniteError) as err, tle.watch_nans(model):
        model(torch.ones(2, 4)).sum().backward()
    assert err.value.report.phase == "backward"
    assert "DistributedDataParallel" not in err.value.report.hint
