"""inspect(model): tree repr, torchinfo summary with named dims, weight tying, the facade."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import torchlens_edu as tle
from support.zoo import ZOO, ZOO_BY_NAME, ModelGuard, ZooEntry
from torchlens_edu._core.modules import PatternError
from torchlens_edu._core.tree import iter_tensors
from torchlens_edu.hookset import HookSet
from torchlens_edu.inspector import count_parameters
from torchlens_edu.models import GPT2, GPT2Config


@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.name)
def test_inspect_and_summary_on_the_zoo(entry: ZooEntry) -> None:
    import torchinfo.torchinfo

    model = entry.build_or_skip()
    args, kwargs = entry.inputs()
    guard = ModelGuard(model)
    insp = tle.inspect(model)
    tree = repr(insp)
    assert tree.startswith(type(model).__name__) and "parameters" in tree
    summary = insp.summary(*args, **kwargs)
    root = summary.rows[0]
    assert root[0] == "" and root[1] == type(model).__name__
    with torch.no_grad():
        out = entry.run(model)
    first = next(iter(iter_tensors(out)))
    assert root[3][0] == first.shape  # the real output shape (the first tensor of it)
    assert root[4] == count_parameters(model).unique
    assert "<model>" in repr(summary)
    assert type(model).__name__ not in torchinfo.torchinfo._cached_forward_pass
    guard.check(out)


def test_gpt2_small_is_124m_because_lm_head_is_wte() -> None:
    with torch.device("meta"):
        model = GPT2(GPT2Config.preset("gpt2"))
    count = tle.inspect(model).parameters()
    assert count.unique == 124_439_808
    assert count.naive == 163_037_184  # what summing every layer's parameters gives
    assert count.tied == [(["transformer.wte.weight", "lm_head.weight"], 50257 * 768)]
    text = count.explain()
    assert "124.4M" in text and "163.0M" in text and "lm_head.weight" in text
    tree = repr(tle.inspect(model))
    assert "weight (V=50257, C=768)" in tree
    assert "tied: same tensor as transformer.wte.weight" in tree
    assert "1 … 11: 11 more Block like 0" in tree  # repeated blocks fold into one line
    assert "(3C=2304, C=768)" in tree  # c_attn: named dims from the config


def test_summary_has_named_dims_and_explains_tying(tiny_gpt2: GPT2, tiny_ids: torch.Tensor
                                                   ) -> None:
    text = repr(tle.inspect(tiny_gpt2).summary(tiny_ids, depth=2))
    assert "(B=2, T=8, V=256)" in text and "(B=2, T=8, C=32)" in text
    assert "A per-layer sum counts them again" in text
    assert "c_attn" not in text  # depth=2 stops above the attention's layers


def test_summary_without_inputs_lists_parameters_only() -> None:
    summary = tle.inspect(ZOO_BY_NAME["cnn"].build()).summary()
    assert [row[3] for row in summary] == [[]] * len(summary.rows)
    assert summary.rows[0][4] == 1610


def test_summary_keeps_every_modules_train_flag() -> None:
    model = ZOO_BY_NAME["cnn"].build().train()
    model.features[1].eval()  # a frozen BatchNorm inside a training model
    guard = ModelGuard(model)
    tle.inspect(model).summary(torch.zeros(2, 3, 16, 16))
    guard.check()


def test_dims_come_from_hugging_face_configs() -> None:
    pytest.importorskip("transformers")
    dims = tle.inspect(ZOO_BY_NAME["hf_llama"].build()).dims
    assert (dims["C"], dims["nh"], dims["hs"], dims["V"], dims["ff"], dims["nkv"]) == (
        32, 4, 8, 256, 64, 2)
    assert tle.inspect(nn.Linear(2, 2), dims={"B": 5}).dims["B"] == 5


def test_modules_and_hooks_and_capture() -> None:
    model = ZOO_BY_NAME["gpt2_ours"].build()
    insp = tle.inspect(model)
    assert [p for p, _ in insp.modules("transformer.h.*.mlp")] == [
        "transformer.h.0.mlp", "transformer.h.1.mlp"]
    with pytest.raises(PatternError, match="Did you mean"):
        insp.modules("transformer.h.*.mpl")
    with insp.hooks() as h:
        assert isinstance(h, HookSet)
    with insp.capture("transformer.h.*.mlp") as cache:
        model(torch.zeros(2, 4, dtype=torch.long))
    assert cache["transformer.h.1.mlp"].shape == (2, 4, 32)
    assert "(B=2, T=4, C=32)" in repr(cache)


def test_trace_watch_nans_and_stop_at_delegate(tiny_gpt2: GPT2, tiny_ids: torch.Tensor) -> None:
    insp = tle.inspect(tiny_gpt2)
    guard = ModelGuard(tiny_gpt2)
    trace = insp.trace(tiny_ids)
    assert trace.events[0].output_shapes == [(2, 8, 256)]
    with insp.watch_nans():
        tiny_gpt2(tiny_ids)
    stop = insp.stop_at("transformer.h.0.attn", condition=lambda *a: False)
    tiny_gpt2(tiny_ids)
    stop.remove()
    guard.check()


@pytest.mark.parametrize(("obj", "hint"), [
    (print, "this is a function"),
    (GPT2(GPT2Config.preset("tiny")).state_dict(), r"state dict.*load_state_dict"),
    (type("TextGenerationPipeline", (), {"model": nn.Linear(1, 1)})(), r"pipe\.model"),
])
def test_inspect_says_what_to_pass_instead(obj: object, hint: str) -> None:
    with pytest.raises(TypeError, match=r"inspect\(\) needs a torch\.nn\.Module"):
        tle.inspect(obj)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=hint):
        tle.inspect(obj)  # type: ignore[arg-type]


def test_shared_module_is_shown_once() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Linear(4, 4)
            self.dec = self.enc

    tree = repr(tle.inspect(Shared()))
    assert "20 parameters" in tree
    assert "dec Linear" not in tree  # named_children lists a shared module once


def test_summary_shows_the_models_own_error_not_torchinfos(tiny_gpt2: GPT2) -> None:
    """Issue 16.14: bad input said only "Failed to run torchinfo. See above stack traces"."""
    with pytest.raises(TypeError, match=r"token ids must be torch.long .* idx.long\(\)") as info:
        tle.inspect(tiny_gpt2).summary(torch.zeros(2, 8))  # floats instead of token ids
    assert "Failed to run torchinfo" not in str(info.value)
    if hasattr(info.value, "__notes__"):
        assert info.value.__notes__ == [
            "(raised by the forward that inspect(model).summary(...) ran on GPT2 with the "
            "inputs you gave)"]
    assert info.value.__traceback__ is not None
    frames = [f.filename for f in __import__("traceback").extract_tb(info.value.__traceback__)]
    assert frames[-1].endswith("gpt2.py")  # the traceback ends at the model's own check
