"""Records cannot be mis-filled: every field by keyword, fixed value sets as Literal types,
and no field that holds something else (a start time) until a later hook fixes it."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import torch
import torch.nn as nn

from torchlens_edu import debug
from torchlens_edu.capture import Activation
from torchlens_edu.hookset import HookCall
from torchlens_edu.inspector import ParamCount
from torchlens_edu.models import GPT2Config
from torchlens_edu.models.tokenizer import CharTokenizer
from torchlens_edu.nans.backward import Creation
from torchlens_edu.nans.replay import ReplayInputs
from torchlens_edu.nans.report import NonFiniteReport, Producer, TensorSummary
from torchlens_edu.printing.stats import TensorStats
from torchlens_edu.shapes.events import ShapeEvent
from torchlens_edu.shapes.explain import Failure
from torchlens_edu.shapes.render import ShapeChange
from torchlens_edu.shapes.trace import ShapeTrace
from torchlens_edu.shapes.tracer import ShapeTracer

RECORDS = [ShapeEvent, ShapeTrace, ShapeChange, Failure, NonFiniteReport, Producer, TensorSummary,
           Creation, ReplayInputs, HookCall, Activation, ParamCount, TensorStats, GPT2Config,
           CharTokenizer]


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.__name__)
def test_every_field_is_given_by_keyword(record: type) -> None:
    assert [f.name for f in dataclasses.fields(record) if not f.kw_only] == []


def test_a_stop_request_names_its_point_first_and_the_rest_by_keyword() -> None:
    assert debug.StopRequest("attention", layer=1).layer == 1
    with pytest.raises(TypeError):
        debug.StopRequest("attention", 1, 2)  # type: ignore[misc]


@pytest.mark.parametrize(("record", "field", "values"), [
    (ShapeEvent, "kind", ("module", "op")),
    (ShapeChange, "change", ("added", "removed", "changed")),
    (NonFiniteReport, "phase", ("input", "forward", "backward")),
    (NonFiniteReport, "kind", ("nan", "+inf", "-inf", "inf")),
    (Producer, "phase", ("forward", "backward")),
    (HookCall, "kind", ("forward", "forward_pre", "backward")),
])
def test_fixed_value_sets_are_literal_types(record: type, field: str, values: tuple) -> None:
    hint = typing.get_type_hints(record)[field]
    assert typing.get_origin(hint) is typing.Literal
    assert set(typing.get_args(hint)) == set(values)


def test_a_running_module_holds_no_start_time() -> None:
    seen = []

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            outer = tracer.trace.events[0]  # the Sequential, still running
            seen.append((outer.seconds, outer.flops))
            return x

    model = nn.Sequential(Probe())
    with ShapeTracer(model) as tracer:
        model(torch.zeros(1))
    assert seen == [(None, None)]
    seconds = tracer.trace.events[0].seconds
    assert seconds is not None and 0 <= seconds < 60


def test_a_failed_module_has_no_time_and_no_flops() -> None:
    model = nn.Sequential(nn.Linear(4, 2), nn.Linear(3, 2))
    with pytest.raises(RuntimeError), ShapeTracer(model, meta=True) as tracer:
        model(torch.zeros(1, 4))
    events = tracer.trace.events
    assert [(e.path, e.failed, e.seconds, e.flops) for e in events] == [
        ("", True, None, None), ("0", False, None, 16), ("1", True, None, None)]


def test_report_schema_is_unchanged() -> None:
    report = NonFiniteReport(phase="forward", module="h.0", op="log", kind="nan",
                             source="model.py:12", hint="log/sqrt of <= 0")
    assert list(report.to_dict()) == ["phase", "module", "op", "kind", "source", "rank", "hint",
                                      "cause", "step", "forward_op", "inputs", "outputs",
                                      "params"]
