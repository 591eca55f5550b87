"""One module reachable under two paths (a tied head registered as ``lm_head`` and
``transformer.wte``, a block list aliased as ``blocks`` and ``layers``): every observer selects
it by any of its paths, names it by the path the pattern matched, and records it once per call,
as a plain ``register_forward_hook`` on the module object fires."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn as nn

import torchlens_edu as tle
from support.zoo import ModelGuard
from torchlens_edu._core.modules import PatternError, every_path, match_modules, module_aliases
from torchlens_edu.capture import capture
from torchlens_edu.nans import NonFiniteError, watch_nans

V, C = 16, 8


class TiedEmbedding(nn.Module):
    """An embedding that is also the output projection (called twice per forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(V, C))

    def forward(self, x: torch.Tensor, *, head: bool = False) -> torch.Tensor:
        if head:
            return x @ self.weight.T  # (B, T, V)
        return self.weight[x]  # (B, T, C)


class TiedLM(nn.Module):
    """``lm_head`` *is* ``transformer.wte``; ``layers`` *is* ``blocks``."""

    def __init__(self) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.wte = TiedEmbedding()
        self.blocks = nn.ModuleList([nn.Linear(C, C) for _ in range(2)])
        self.layers = self.blocks
        self.lm_head = self.transformer.wte

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.transformer.wte(ids)  # (B, T, C)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x, head=True)  # (B, T, V)


def _model() -> TiedLM:
    torch.manual_seed(0)
    return TiedLM()


IDS = torch.tensor([[1, 2, 3], [4, 5, 6]])


def _plain_calls(module: nn.Module, model: nn.Module) -> list[torch.Tensor]:
    """The reference: what a plain torch forward hook on the module object sees."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    try:
        model(IDS)
    finally:
        handle.remove()
    return seen


def test_every_path_lists_a_shared_module_under_each_of_its_paths() -> None:
    model = _model()
    paths = [path for path, _ in every_path(model)]
    assert paths == ["", "transformer", "transformer.wte", "blocks", "blocks.0", "blocks.1",
                     "layers", "layers.0", "layers.1", "lm_head"]
    assert [p for p, _ in model.named_modules()] == [  # torch: the first path only
        "", "transformer", "transformer.wte", "blocks", "blocks.0", "blocks.1"]
    aliases = module_aliases(model)
    assert aliases[model.lm_head] == ["transformer.wte", "lm_head"]
    assert aliases[model.blocks[1]] == ["blocks.1", "layers.1"]


def test_a_module_that_contains_itself_is_listed_once() -> None:
    outer = nn.Sequential(nn.Linear(2, 2))
    outer.add_module("again", outer)  # a cycle: named_modules() handles it, so must we
    assert [p for p, _ in every_path(outer)] == ["", "0"]


def test_a_pattern_on_the_second_path_selects_the_module_under_that_name() -> None:
    model = _model()
    assert [p for p, _ in match_modules(model, "lm_head")] == ["lm_head"]
    assert [p for p, _ in match_modules(model, "layers.*")] == ["layers.0", "layers.1"]
    # a glob over both paths: the module once, under the first path that matched
    assert [p for p, _ in match_modules(model, "*")] == [
        "", "transformer", "transformer.wte", "blocks", "blocks.0", "blocks.1"]


def test_did_you_mean_offers_the_second_path_and_never_the_pattern_itself() -> None:
    model = _model()
    with pytest.raises(PatternError) as info:
        match_modules(model, "lm_haed")
    assert "Did you mean lm_head?" in str(info.value)
    with pytest.raises(PatternError) as info:
        match_modules(model, "layers.7")
    assert "Did you mean layers.1, layers.0, layers?" in str(info.value)  # aliases too
    assert "layers.7," not in str(info.value) and "layers.7?" not in str(info.value)


def test_hooks_by_either_path_fire_once_per_call_like_a_plain_torch_hook() -> None:
    model = _model()
    reference = _plain_calls(model.lm_head, model)
    assert len(reference) == 2  # the embedding, then the head
    guard = ModelGuard(model)
    seen: list[tuple[str, int, tuple[int, ...]]] = []
    with tle.hooks(model) as h:
        assert h.forward("lm_head", lambda c: seen.append(
            (c.path, c.call, tuple(c.output.shape)))) == ["lm_head"]
        assert h.forward("transformer.wte", lambda c: seen.append(
            (c.path, c.call, tuple(c.output.shape)))) == ["transformer.wte"]
        assert h.forward("*", lambda c: seen.append(("*:" + c.path, c.call, ()))
                         if c.module is model.lm_head else None)
        model(IDS)
        # one dispatcher per module, named by the path of its first pattern
        assert sorted(path for path, _, _ in h) == ["", "blocks", "blocks.0", "blocks.1",
                                                    "lm_head", "transformer"]
    # one torch hook on the module: each function once per call, each under its own path
    assert seen == [("lm_head", 0, (2, 3, C)), ("transformer.wte", 0, (2, 3, C)),
                    ("*:transformer.wte", 0, ()),
                    ("lm_head", 1, (2, 3, V)), ("transformer.wte", 1, (2, 3, V)),
                    ("*:transformer.wte", 1, ())]
    guard.check()


def test_capture_by_the_second_path_is_keyed_by_it_and_agrees_with_plain_hooks() -> None:
    model = _model()
    reference = _plain_calls(model.lm_head, model)
    for pattern in ("lm_head", "lm_*"):
        with capture(model, pattern) as cache:
            model(IDS)
        assert cache.keys() == [("lm_head", 0), ("lm_head", 1)]
        for call, want in enumerate(reference):
            torch.testing.assert_close(cache["lm_head", call], want, rtol=0, atol=0)
            # the other path finds the same entries
            assert ("transformer.wte", call) in cache
            assert cache["transformer.wte", call] is cache["lm_head", call]
    with capture(model, "*") as cache:
        model(IDS)
    assert [key for key in cache if key[0] in ("lm_head", "transformer.wte")] == [
        ("transformer.wte", 0), ("transformer.wte", 1)]  # recorded once per call, not twice
    assert cache["lm_head", 1].shape == (2, 3, V)
    with pytest.raises(KeyError, match=r"Did you mean lm_head\?"):  # the other path, offered
        cache["lm_haed"]
    with capture(model, "layers.*", grads=True) as cache:
        model(IDS).sum().backward()
    assert cache.paths() == ["layers.0", "layers.1"]
    assert cache.grad("blocks.1").shape == (2, 3, C)


def test_capture_estimate_counts_a_module_under_its_second_path() -> None:
    model = _model()
    with capture(model, "lm_head") as cache:
        model(IDS)
    # two calls: (2, 3, C) and (2, 3, V) floats
    assert cache.estimate == (2 * 3 * C + 2 * 3 * V) * 4 == cache.nbytes


def test_module_trace_records_each_call_once_and_names_the_other_path_once() -> None:
    model = _model()
    trace = tle.trace_shapes(model, IDS)
    tied = [e for e in trace.events if e.name == "TiedEmbedding"]
    assert [(e.path, e.call, e.aliases) for e in tied] == [
        ("transformer.wte", 0, ("lm_head",)), ("transformer.wte", 1, ("lm_head",))]
    assert [e.path for e in trace.modules("lm_head")] == ["transformer.wte"] * 2
    text = trace.to_text(120)
    assert text.count("also reachable as lm_head") == 1
    assert "wte TiedEmbedding (also reachable as lm_head)" in text
    assert "blocks.0..1 Linear (also reachable as layers.0)" in text  # folded: the first
    assert trace.to_dict()["events"][1]["aliases"] == ["lm_head"]
    # include names the second path: recorded under it
    only = tle.trace_shapes(model, IDS, include="lm_head")
    assert [(e.path, e.call) for e in only.events if e.kind == "module" and e.path] == [
        ("lm_head", 0), ("lm_head", 1)]
    assert "lm_head TiedEmbedding (also reachable as transformer.wte)" in only.to_text(120)
    layers = tle.trace_shapes(model, IDS, include="layers", ops=True)
    assert {e.path for e in layers.events if e.path} == {"layers.0", "layers.1"}


def test_summary_and_module_tree_say_where_else_the_module_is() -> None:
    model = _model()
    summary = " ".join(repr(tle.inspect(model).summary()).split())
    assert summary.count("also reachable as lm_head") == 1
    assert "wte (also reachable as lm_head)" in summary
    assert "lm_head (same module as transformer.wte)" in summary
    assert "0 (also reachable as layers.0)" in summary
    tree = " ".join(repr(tle.inspect(model)).split())
    assert tree.count("also reachable as lm_head") == 1
    assert "lm_head TiedEmbedding 128 same module as transformer.wte" in tree


@pytest.mark.parametrize("width", [110, 80, 60])
def test_a_summary_of_calls_says_which_row_is_a_second_call_and_drops_no_column(width) -> None:
    """With inputs the rows are calls: the tied module's second call is not "the same module
    as" itself, and long notes wrap instead of pushing the params column out."""
    from torchlens_edu._core.console import render_text

    summary = tle.inspect(_model()).summary(IDS)
    assert summary.notes[-1] == "same module, call 2"
    assert not any(note == f"same module as {path}"
                   for (path, *_), note in zip(summary.rows, summary.notes, strict=True))
    text = render_text(summary, width=width)
    assert all(len(line) <= width for line in text.splitlines())
    assert "┃ params" in text
    flat = " ".join(text.split())
    for (_, _, _, _, params), count in zip(summary.rows, ["272", "128", "144", "72", "72", "128"],
                                           strict=True):
        assert f"{params:,}" == count and f"│ {count}" in flat


def test_the_nan_watch_names_a_shared_module_once() -> None:
    model = _model()
    with torch.no_grad():
        model.lm_head.weight[3, 0] = float("nan")
    with pytest.raises(NonFiniteError) as info, watch_nans(model):
        model(IDS)
    report = info.value.report
    assert (report.module, report.aliases) == ("transformer.wte", ["lm_head"])
    assert report.to_dict()["aliases"] == ["lm_head"]
    assert "parameter transformer.wte.weight already held nan" in report.hint
    text = " ".join(repr(report).split())
    assert "module 'transformer.wte' (also reachable as lm_head)" in text


def _meta_ok(model: nn.Module) -> Any:
    return tle.trace_shapes(model, IDS, meta=True)


def test_a_meta_trace_of_the_aliased_model_gives_every_weight_back() -> None:
    model = _model()
    guard = ModelGuard(model)
    _meta_ok(model)
    guard.check()
    assert not any(p.is_meta for p in model.parameters())
