"""Hooks, capture, module traces and the NaN watch on unusual module structures, against plain
torch hooks: a module called several times per forward (ALBERT's shared layer), activation
checkpointing (the forward runs again inside backward), forwards that return None, a dict or
a dataclass, pre-hooks that change inputs, and modules called outside their parent's forward."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.utils.checkpoint as checkpoint

import torchlens_edu as tle
from support.zoo import ModelGuard
from torchlens_edu.capture import capture
from torchlens_edu.hookset import never_called_because
from torchlens_edu.nans import NonFiniteError, watch_nans


def _plain_forward_calls(model: nn.Module, run) -> list[str]:
    """The reference: module paths in the order plain torch forward hooks fire."""
    seen: list[str] = []
    handles = [m.register_forward_hook(lambda mod, a, out, path=path: seen.append(path))
               for path, m in model.named_modules()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return seen


class Albert(nn.Module):
    """One layer applied ``n`` times (ALBERT's cross-layer sharing); ``checkpointed`` runs each
    application under ``torch.utils.checkpoint``."""

    def __init__(self, checkpointed: str = "") -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
        self.head = nn.Linear(4, 1)
        self.checkpointed = checkpointed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            if self.checkpointed:
                x = checkpoint.checkpoint(self.block, x,
                                          use_reentrant=self.checkpointed == "reentrant")
            else:
                x = self.block(x)
        return self.head(x)


def _albert(checkpointed: str = "") -> Albert:
    torch.manual_seed(0)
    return Albert(checkpointed)


X = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))


def test_a_layer_applied_three_times_is_three_calls_everywhere() -> None:
    model = _albert()
    reference = _plain_forward_calls(model, lambda: model(X))
    assert reference.count("block") == 3
    with capture(model, "*") as cache:
        model(X)
    assert [path for path, _ in cache] == reference
    assert [call for path, call in cache if path == "block"] == [0, 1, 2]
    trace = tle.trace_shapes(model, X)
    assert [(e.path, e.call) for e in trace.modules("block")] == [
        ("block", 0), ("block", 1), ("block", 2)]
    text = trace.to_text(100)
    assert "block Sequential #1" in text and "block Sequential #2" in text


@pytest.mark.parametrize("mode", ["non-reentrant", "reentrant"])
def test_a_checkpoint_recomputing_in_backward_is_not_a_second_call(mode: str) -> None:
    model = _albert(mode)
    x = X.clone().requires_grad_()
    plain = _plain_forward_calls(model, lambda: model(x).sum().backward())
    plain_model = _albert()
    once = _plain_forward_calls(plain_model, lambda: plain_model(x))
    assert len(plain) > len(once)  # torch's own hooks see the recomputation
    guard = ModelGuard(model)
    with capture(model, "*", grads=True) as cache:
        model(x).sum().backward()
    assert [path for path, _ in cache] == once  # each call once, none from the recomputation
    seen: list[tuple[int, bool]] = []
    with tle.hooks(model) as h:
        h.forward("block", lambda c: seen.append((c.call, c.recomputed)))
        model(x).sum().backward()
    expected = [(0, False), (1, False), (2, False)]
    if mode == "reentrant":  # rerun in reverse, each named by the call it repeats
        expected += [(2, True), (1, True), (0, True)]
    assert seen == expected
    with tle.ShapeTracer(model) as tracer:
        model(x).sum().backward()
    assert [(e.path, e.call) for e in tracer.trace.events] == [
        ("", 0), *[(p, c) for c in range(3) for p in ("block", "block.0", "block.1")],
        ("head", 0)]
    with watch_nans(model) as watch:
        model(x).sum().backward()
    assert watch.reports == []
    model.zero_grad(set_to_none=True)
    x.grad = None
    guard.check()


def test_a_reentrant_checkpoint_keeps_the_gradients_of_the_calls_it_can_name() -> None:
    x = X.clone().requires_grad_()
    grads = {}
    for mode in ("non-reentrant", "reentrant"):
        model = _albert(mode)
        with capture(model, "block*", grads=True) as cache:
            model(x).sum().backward()
        grads[mode] = cache
    for call in range(3):  # the checkpointed block itself: found by its input
        torch.testing.assert_close(grads["reentrant"].grad("block", call),
                                   grads["non-reentrant"].grad("block", call))
        torch.testing.assert_close(grads["reentrant"].grad("block.0", call),
                                   grads["non-reentrant"].grad("block.0", call))
        # block.1's input is made inside the recomputation: not tied to a call, not guessed
        assert grads["reentrant"].grad("block.1", call) is None
    text = " ".join(repr(grads["reentrant"]).split())
    assert ("3 gradients not captured: they reached outputs a reentrant checkpoint recomputed "
            "inside its block, which no captured call can be tied to; checkpoint with "
            "use_reentrant=False to see them") in text


def test_a_checkpointed_hook_that_changes_an_output_changes_the_recomputation_too() -> None:
    x = X.clone().requires_grad_()
    got = {}
    for mode in ("", "reentrant"):
        model = _albert(mode)
        with tle.hooks(model) as h:
            h.forward("block.0", lambda c: c.output * 0 if c.call == 1 else None)
            model(x).sum().backward()
        got[mode] = x.grad.clone()
        x.grad = None
    torch.testing.assert_close(got["reentrant"], got[""])


@dataclasses.dataclass
class Output:
    logits: torch.Tensor
    aux: torch.Tensor | None = None


class Odd(nn.Module):
    """Children that return None (a side effect), a dict with a non-tensor, a dataclass."""

    def __init__(self) -> None:
        super().__init__()
        self.side = _Side()
        self.as_dict = _AsDict()
        self.as_dataclass = _AsDataclass()

    def forward(self, x: torch.Tensor) -> Output:
        self.side(x)
        return self.as_dataclass(self.as_dict(x)["h"])


class _Side(nn.Module):
    def forward(self, x: torch.Tensor) -> None:
        self.last_mean = x.mean()


class _AsDict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> dict:
        return {"h": self.fc(x), "n": 3}


class _AsDataclass(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> Output:
        return Output(logits=self.fc(x))


def test_outputs_that_are_none_a_dict_or_a_dataclass() -> None:
    torch.manual_seed(0)
    model = Odd()
    x = X.clone().requires_grad_()
    with capture(model, "*", grads=True) as cache:
        model(x).logits.sum().backward()
    assert [path for path, _ in cache] == _plain_forward_calls(model, lambda: model(x))
    assert cache["side"] is None
    text = " ".join(repr(cache).split())
    assert "side │ — │ returned None │ - │ -" in text  # a row, not nothing
    assert cache.grad("as_dict")["n"] == 3 and cache.grad("as_dict")["h"].shape == (2, 4)
    assert isinstance(cache.grad("as_dataclass"), Output)
    summary = tle.inspect(model).summary(X)  # torchinfo cannot size a dataclass output
    rows = {path: output for path, _, _, output, _ in summary}
    assert rows["as_dataclass"] == [torch.Size([2, 3])] and rows[""] == [torch.Size([2, 3])]
    assert rows["side"] == []
    assert model.training  # the summary's eval mode was undone


def test_a_pre_hook_added_after_the_tracer_is_seen_by_the_trace() -> None:
    model = nn.Sequential(nn.Linear(8, 4))
    with tle.ShapeTracer(model) as tracer:
        handle = model[0].register_forward_pre_hook(lambda m, args: (args[0][..., :8],))
        try:
            model[0](torch.zeros(2, 16))
        finally:
            handle.remove()
    events = [(e.path, e.input_shapes) for e in tracer.trace.events]
    assert events == [("0", [(2, 8)])]  # what the Linear got, not what was passed in


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)  # the caller applies it: model.head(model(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_a_nan_made_by_a_module_called_outside_the_forward_is_not_missed() -> None:
    torch.manual_seed(0)
    model = Encoder()
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with watch_nans(model):  # a healthy forward stays quiet
        model(X)
    with pytest.raises(NonFiniteError) as info, watch_nans(model):
        model.head(model(X))  # @outside
    report = info.value.report
    assert (report.phase, report.module, report.kind) == ("forward", "head", "nan")
    with open(__file__) as source:
        line = next(n for n, text in enumerate(source, 1) if text.rstrip().endswith("@outside"))
    assert report.source == f"{__file__}:{line}"
    assert ("'head' was called outside Encoder's forward (directly, as in model.head(...)), "
            "and only whole forwards of Encoder are replayed to find the op; watch the module "
            "itself to name it: watch_nans(model.head)") in report.hint


def test_a_module_without_parameters_that_never_ran_is_not_said_to_be_used_by_weight() -> None:
    why = never_called_because(nn.Identity(), "blocks.0.hook_result")
    assert why == ("its forward was never called: the model skips it on this input (a branch, "
                   "or an option that is off)")
    assert "weight" not in why


def test_the_capture_estimate_of_a_checkpointed_model_says_nothing_to_the_user() -> None:
    import warnings

    model = _albert("reentrant")
    x = X.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its meta run warned "None of the inputs have
        with capture(model, "block") as cache:  # requires_grad=True" (meta inputs lost it)
            model(x).sum().backward()
    assert cache.estimate == cache.nbytes == 3 * 2 * 4 * 4


class _LogOnSecondUse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, i: int) -> torch.Tensor:
        h = self.fc(x)
        return torch.log(h) if i == 1 else torch.tanh(h)  # @second


class SharedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _LogOnSecondUse()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(3):
            x = self.block(x, i)
        return x


def test_a_nan_in_a_layer_applied_several_times_names_the_application() -> None:
    torch.manual_seed(0)
    model = SharedLayer()
    with pytest.raises(NonFiniteError) as info, watch_nans(model):
        model(X)
    report = info.value.report
    assert (report.module, report.op, report.call) == ("block", "log", 1)
    assert report.summary().endswith("(module 'block', call #1 of this forward)")
    assert "module  'block', call #1 of this forward" in repr(report)
    assert report.to_dict()["call"] == 1
