"""Every observer on models we did not write (see ``corpus.py``): summary, module/op/meta
traces, capture with gradients and hooks against plain torch hooks, the NaN watch clean in train
and eval and on planted faults, a planted shape bug explained word by word, and the model the
same tensors with the same bits afterwards (``ModelGuard``)."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import corpus
import pytest
import torch
import torch.nn as nn
from corpus import CORPUS, CORPUS_BY_NAME, C, Specimen, padded_copy

import torchlens_edu as tle
from support.zoo import ModelGuard
from torchlens_edu._core.frames import is_user_file
from torchlens_edu._core.modules import module_aliases
from torchlens_edu._core.tree import iter_tensors
from torchlens_edu.nans import NonFiniteError, watch_nans

IDS = [s.name for s in CORPUS]


def _run(model: nn.Module, specimen: Specimen) -> Any:
    args, kwargs = specimen.inputs()
    return model(*args, **kwargs)


def _loss(output: Any) -> torch.Tensor:
    first = next(t for t in iter_tensors(output) if t.is_floating_point())
    return first.float().pow(2).mean()


def _plain_hooks(model: nn.Module, specimen: Specimen) -> list[tuple[str, list[torch.Tensor]]]:
    """``(path, output tensors)`` of every module call, from plain torch forward hooks."""
    seen: list[tuple[str, list[torch.Tensor]]] = []
    handles = [m.register_forward_hook(
        lambda mod, a, out, path=path: seen.append(
            (path, [padded_copy(t) for t in iter_tensors(out)])))
        for path, m in model.named_modules()]
    try:
        with torch.no_grad():
            _run(model, specimen)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _key(trace: Any) -> list[tuple]:
    return [(e.kind, e.path, e.name, e.input_shapes, e.output_shapes) for e in trace.events]


@pytest.mark.parametrize("specimen", CORPUS, ids=IDS)
def test_summary_and_module_op_and_meta_traces(specimen: Specimen) -> None:
    model = specimen.model()
    guard = ModelGuard(model)
    args, kwargs = specimen.inputs()
    assert type(model).__name__ in repr(tle.inspect(model))
    real = tle.trace_shapes(model, *args, **kwargs)
    ops = tle.trace_shapes(model, *args, ops=True, **kwargs)
    meta = tle.trace_shapes(model, *args, ops=True, meta=True, **kwargs)
    assert _key(meta) == _key(ops)  # a meta run has the shapes of a real one
    assert [e for e in _key(ops) if e[0] == "module"] == _key(real)
    assert real.dims["B"] == 2 and real.dims["C"] == C  # from a config, or from the modules
    assert "B=2" not in real.dims.format((2, 2, 2))[5:]  # one batch axis at most
    guard.check()
    assert not any(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("specimen", CORPUS, ids=IDS)
def test_capture_with_grads_and_hooks_agree_with_plain_torch_hooks(specimen: Specimen) -> None:
    model = specimen.model()
    reference = _plain_hooks(model, specimen)
    guard = ModelGuard(model)
    seen: list[tuple[str, list[torch.Tensor]]] = []
    with tle.hooks(model) as h:
        h.forward("*", lambda c: seen.append(
            (c.path, [padded_copy(t) for t in iter_tensors(c.output)])))
        with torch.no_grad():
            _run(model, specimen)
    assert [p for p, _ in seen] == [p for p, _ in reference]
    for (path, got), (_, want) in zip(seen, reference, strict=True):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=path)
    with tle.inspect(model).capture(specimen.mlp_in, grads=True) as cache:
        _loss(_run(model, specimen)).backward()
    calls = [(p, outs) for p, outs in reference if p == specimen.mlp_in]
    for call, (_, want) in enumerate(calls):
        activation = cache.activation(specimen.mlp_in, call if len(calls) > 1 else None)
        # with grad on, a kernel may differ from the no_grad reference in the last bit
        torch.testing.assert_close(activation.output, want[0], rtol=1e-5, atol=1e-6)
        assert activation.grad is not None and activation.grad.shape == want[0].shape
    model.zero_grad(set_to_none=True)
    guard.check()


@pytest.mark.parametrize("specimen", CORPUS, ids=IDS)
def test_nan_watch_is_quiet_on_a_healthy_model_in_train_and_eval(specimen: Specimen) -> None:
    model = specimen.model()
    guard = ModelGuard(model)
    for train in (True, False):
        model.train(train)
        with watch_nans(model):
            _loss(_run(model, specimen)).backward()
    model.eval()
    model.zero_grad(set_to_none=True)
    guard.check()


class _Wrapper(nn.Module):
    """Wraps a layer, and shows its attributes: nn.TransformerEncoderLayer reads
    ``linear1.weight`` to choose its fast path."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)


class _LogOfNegative(_Wrapper):

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(-self.inner(x).abs() - 1.0)  # @log


class _SqrtOfZero(_Wrapper):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inner(x)
        return h + torch.sqrt(h - h)  # @sqrt


def _line_of(tag: str) -> str:
    with open(__file__) as source:
        number = next(n for n, text in enumerate(source, 1) if text.rstrip().endswith(f"@{tag}"))
    return f"{__file__}:{number}"


def _report(model: nn.Module, specimen: Specimen) -> Any:
    with pytest.raises(NonFiniteError) as info, watch_nans(model):
        _loss(_run(model, specimen)).backward()
    return info.value.report


@pytest.mark.parametrize("fault", ["inf_weight", "log_of_negative", "sqrt_of_zero"])
@pytest.mark.parametrize("specimen", CORPUS, ids=IDS)
def test_planted_faults_name_their_producer(specimen: Specimen, fault: str) -> None:
    model = specimen.model()
    layer = model.get_submodule(specimen.mlp_in)
    assert isinstance(layer, nn.Linear)
    if fault == "inf_weight":
        with torch.no_grad():
            layer.weight[0, 0] = math.inf
        report = _report(model, specimen)
        assert (report.phase, report.module, report.op) == ("forward", specimen.mlp_in, "linear")
        # TransformerLens' bridge lists the parameter under an alias (layers.0 for blocks.0)
        tail = specimen.mlp_in.split(".", 2)[-1]
        assert f"parameter {specimen.mlp_in}.weight" in report.hint or \
            f".{tail}.weight" in report.hint
        return
    wrapper = _LogOfNegative(layer) if fault == "log_of_negative" else _SqrtOfZero(layer)
    model.set_submodule(specimen.mlp_in, wrapper)
    report = _report(model, specimen)
    if fault == "log_of_negative":
        assert (report.phase, report.module, report.op, report.kind) == (
            "forward", specimen.mlp_in, "log", "nan")
        assert report.source == _line_of("log")
        assert report.hint.startswith("log/sqrt of <= 0")
    else:
        assert (report.phase, report.module, report.op) == (
            "backward", specimen.mlp_in, "SqrtBackward0")
        assert report.forward_op == "sqrt" and report.source == _line_of("sqrt")


@pytest.mark.parametrize("specimen", CORPUS, ids=IDS)
def test_a_layer_built_for_the_wrong_width_is_explained(specimen: Specimen) -> None:
    model = specimen.model()
    layer = model.get_submodule(specimen.mlp_in)
    model.set_submodule(specimen.mlp_in, nn.Linear(C + 1, layer.out_features))
    args, kwargs = specimen.inputs()
    for options in ({}, {"ops": True}, {"meta": True}):
        with pytest.raises(RuntimeError) as info:
            tle.trace_shapes(model, *args, **options, **kwargs)
        lines = [line.strip() for line in "\n".join(info.value.__notes__).splitlines()]
        assert lines[0].startswith(("torchlens_edu: `linear` failed in " + specimen.mlp_in,
                                    "torchlens_edu: the forward failed in " + specimen.mlp_in))
        assert lines[0].endswith(" (Linear)")
        assert lines[1].startswith("at ")  # the line that called the layer
        assert (f"expected: the input's last axis (C={C}) equal to the layer's in_features "
                f"({C + 1})") in lines, lines
        assert ("hint: put the features on the last axis, or build the layer for this size"
                in lines)


def test_hooks_on_a_minGPT_mlp_say_the_module_dict_is_never_called(capsys) -> None:
    specimen = CORPUS_BY_NAME["mingpt_moduledict_lambda"]
    model = specimen.model()
    guard = ModelGuard(model)
    with tle.hooks(model) as h:
        assert h.forward("transformer.h.*.mlp", lambda c: None) == [
            "transformer.h.0.mlp", "transformer.h.1.mlp"]
        _run(model, specimen)
        never = h.never_called()
    assert [path for path, _ in never] == ["transformer.h.0.mlp", "transformer.h.1.mlp"]
    assert never[0][1] == ("a ModuleDict: a container has no forward of its own and is never "
                           "called; its children are (hook 'transformer.h.0.mlp.*')")
    err = capsys.readouterr().err
    assert "hooks on 2 matched modules never ran in 1 forward of MinGPT" in " ".join(err.split())
    with tle.inspect(model).capture("transformer.h.*.mlp") as cache:
        _run(model, specimen)
    text = " ".join(repr(cache).split())
    assert "run the model inside the `with` block" not in text
    assert "the model ran 1 forward, but no matched module was called: transformer.h.0.mlp " \
           "(a ModuleDict" in text
    with pytest.raises(KeyError, match="never called"):
        cache["transformer.h.0.mlp"]
    guard.check()


def test_the_users_line_skips_tensor_plumbing_libraries() -> None:
    for name in ("einops_attention", "x_decoder_rotary_gqa"):
        specimen = CORPUS_BY_NAME[name]
        model = specimen.model()
        args, kwargs = specimen.inputs()
        trace = tle.trace_shapes(model, *args, ops=True, **kwargs)
        files = {e.filename for e in trace.events if e.kind == "op"}
        assert files and all(is_user_file(f) for f in files)
        assert not any(part in f for f in files for part in ("/einops/", "/einx/", "<string>"))
        if name == "einops_attention":  # rearrange's own ops: the line that called it
            assert files == {corpus.__file__}


ALIASED = [s for s in CORPUS if s.name in ("tutorial_tied_two_parents", "x_encoder_decoder_tied",
                                           "hooked_transformer")]


@pytest.mark.parametrize("specimen", ALIASED, ids=[s.name for s in ALIASED])
def test_a_module_under_two_paths_is_observed_once_per_call_by_the_path_asked_for(
        specimen: Specimen) -> None:
    model = specimen.model()
    guard = ModelGuard(model)
    args, kwargs = specimen.inputs()
    # the last path of every module reachable under several (mlm.decoder, decoder.net.token_emb,
    # TransformerLens' blocks.0.ln1 for blocks.0._original_component.ln1)
    second = {paths[-1]: module for module, paths in module_aliases(model).items()}
    assert second
    reference: Counter[str] = Counter()  # plain torch hooks on the module objects
    handles = [module.register_forward_hook(lambda m, a, out, path=path: reference.update([path]))
               for path, module in second.items()]
    try:
        with torch.no_grad():
            _run(model, specimen)
    finally:
        for handle in handles:
            handle.remove()
    assert reference
    seen: Counter[str] = Counter()
    with tle.hooks(model) as h:
        for path in second:
            assert h.forward(path, lambda c: seen.update([c.path])) == [path]
        with torch.no_grad():
            _run(model, specimen)
    assert seen == reference
    with tle.inspect(model).capture(lambda path, _: path in second) as cache, torch.no_grad():
        _run(model, specimen)
    assert Counter(path for path, _ in cache) == reference
    trace = tle.trace_shapes(model, *args, include=lambda path, _: path in second, **kwargs)
    assert Counter(e.path for e in trace.events if e.path in second) == reference
    first_calls = [e for e in trace.events if e.path in second and e.call == 0]
    assert all(e.aliases and e.path not in e.aliases for e in first_calls)
    guard.check()


def test_the_tutorial_head_under_two_parents_is_named_as_asked() -> None:
    specimen = CORPUS_BY_NAME["tutorial_tied_two_parents"]
    model = specimen.model()
    args, kwargs = specimen.inputs()
    with tle.inspect(model).capture("mlm.*", grads=True) as cache:
        _loss(_run(model, specimen)).backward()
    assert cache.keys() == [("mlm.decoder", 0)]
    assert cache.grad("generator.proj").shape == (2, 8, corpus.V)  # the other path finds it
    trace = tle.trace_shapes(model, *args, **kwargs)
    assert " ".join(trace.to_text(120).split()).count(
        "generator.proj Linear (also reachable as mlm.decoder)") == 1
    summary = " ".join(repr(tle.inspect(model).summary(*args, **kwargs)).split())
    assert "decoder (also reachable as generator.proj)" in summary
    model.zero_grad(set_to_none=True)
