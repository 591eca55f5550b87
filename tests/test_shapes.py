"""Shape tracer: module events agree with plain hooks, op events carry the right source lines,
and the result renders, serialises and diffs."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
import torch.nn as nn

import torchlens_edu as tle
from support.zoo import ZOO, reference_outputs
from torchlens_edu._core.modules import PatternError
from torchlens_edu.models import gpt2 as gpt2_module
from torchlens_edu.shapes import ShapeTracer, trace_shapes


@pytest.mark.parametrize("entry", ZOO, ids=[e.name for e in ZOO])
def test_module_events_match_plain_hooks_on_the_zoo(entry):
    model = entry.build_or_skip()
    args, kwargs = entry.inputs()
    expected = reference_outputs(model, entry)
    with torch.no_grad():
        trace = trace_shapes(model, *args, **kwargs)
    # Hooks fire post-order, events are in call order: compare per (path, call).
    got = {(e.path, e.call): e.output_shapes for e in trace.events}
    for path, call, outs in expected:
        assert got[(path, call)] == [tuple(t.shape) for t in outs], (entry.name, path, call)
    assert len(trace.events) == len(expected)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()
                   if entry.name != "hooked_transformer")


def _line_of(func, needle: str) -> int:
    """The line number in gpt2.py of the first line of ``func`` containing ``needle``."""
    lines, start = inspect.getsourcelines(func)
    for offset, text in enumerate(lines):
        if needle in text:
            return start + offset
    raise AssertionError(f"{needle!r} not in {func.__qualname__}")


def test_op_events_show_q_k_v_view_transpose_with_their_source_lines(tiny_gpt2, tiny_ids):
    trace = trace_shapes(tiny_gpt2, tiny_ids, ops=True)
    forward = gpt2_module.CausalSelfAttention.forward
    ops = trace.ops_at("transformer.h.0.attn")
    for name in "qkv":
        line = _line_of(forward, f"{name} = {name}.view(B, T, nh, hs).transpose(1, 2)")
        on_line = [e for e in ops if e.line == line]
        assert [e.name for e in on_line] == ["view", "transpose"], name
        assert all(e.filename == gpt2_module.__file__ for e in on_line)
        assert on_line[0].input_shapes == [(2, 8, 32)]
        assert on_line[0].output_shapes == [(2, 8, 2, 16)]
        assert on_line[1].output_shapes == [(2, 2, 8, 16)]
    scores = _line_of(forward, "scores = (q @ k.transpose(-2, -1))")
    assert [e.name for e in ops if e.line == scores] == ["transpose", "matmul", "div"]
    softmax = [e for e in ops if e.name == "softmax"]
    assert softmax and softmax[0].output_shapes == [(2, 2, 8, 8)]
    text = trace.to_text(width=250)
    q_line = _line_of(forward, "q = q.view(")
    assert f"gpt2.py:{q_line} q = q.view(B, T, nh, hs).transpose(1, 2)" in text
    assert "(B=2, T=8, C=32) -> (B=2, nh=2, T=8, hs=16)" in text
    assert not any(e.name in ("size", "dim", ".shape") for e in trace.events)


def test_explicit_attention_is_forced_only_while_tracing_ops(tiny_gpt2, tiny_ids):
    assert not gpt2_module._explicit.get()
    trace = trace_shapes(tiny_gpt2, tiny_ids)
    assert not gpt2_module._explicit.get()
    assert not any(e.kind == "op" for e in trace.events)


def test_tracing_leaves_the_model_untouched(tiny_gpt2, tiny_ids):
    before = {name: (p, p.detach().clone()) for name, p in tiny_gpt2.named_parameters()}
    with torch.no_grad():
        expected = tiny_gpt2(tiny_ids)
        for kwargs in ({}, {"ops": True}, {"meta": True}, {"ops": True, "meta": True}):
            trace_shapes(tiny_gpt2, tiny_ids, **kwargs)
        got = tiny_gpt2(tiny_ids)
    assert torch.equal(expected, got)
    for name, param in tiny_gpt2.named_parameters():
        assert param is before[name][0] and torch.equal(param, before[name][1])
    assert tiny_gpt2.lm_head.weight is tiny_gpt2.transformer.wte.weight
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in tiny_gpt2.modules())


def test_module_events_have_calls_params_times_and_sources(tiny_gpt2, tiny_ids):
    trace = trace_shapes(tiny_gpt2, tiny_ids)
    root = trace.events[0]
    assert (root.path, root.name, root.call, root.parent) == ("", "GPT2", 0, -1)
    assert root.params == tiny_gpt2.num_params()
    assert root.seconds is not None and root.seconds > 0
    assert trace.modules("lm_head")[0].params == 256 * 32  # tied: counted in both places
    block = trace.modules("transformer.h.1")[0]
    assert block.source.endswith(f"gpt2.py:{_line_of(gpt2_module.GPT2.forward, 'x = block(')}")
    ln = trace.modules("transformer.h.0.ln_1")[0]
    assert trace.events[ln.parent].path == "transformer.h.0"


def test_repeated_module_calls_are_numbered():
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    trace = trace_shapes(model, torch.zeros(2, 4))
    assert [(e.path, e.call) for e in trace.events] == [("", 0), ("0", 0), ("1", 0), ("0", 1)]


def test_to_dict_is_json_with_the_documented_schema(tiny_gpt2, tiny_ids):
    data = trace_shapes(tiny_gpt2, tiny_ids, ops=True).to_dict()
    assert list(data) == ["events"]
    json.dumps(data)
    keys = {"kind", "path", "name", "call", "inputs", "outputs", "dims", "source"}
    assert all(set(event) == keys for event in data["events"])
    wte = next(e for e in data["events"]
               if e["path"] == "transformer.wte" and e["kind"] == "module")
    assert wte["inputs"] == [[2, 8]] and wte["outputs"] == [[2, 8, 32]]
    assert wte["dims"]["outputs"] == [["B=2", "T=8", "C=32"]]
    assert {e["kind"] for e in data["events"]} == {"module", "op"}


def test_identical_blocks_fold_into_one_row():
    from torchlens_edu.models import GPT2, GPT2Config

    torch.manual_seed(0)
    model = GPT2(GPT2Config.preset("tiny", n_layer=12)).eval()
    text = str(trace_shapes(model, torch.zeros(1, 5, dtype=torch.long)))
    assert "transformer.h.0..11 Block" in text and "(x12, identical shapes)" in text
    assert text.count("ln_1 LayerNorm") == 1
    assert trace_shapes(model, torch.zeros(1, 5, dtype=torch.long))._repr_html_().count(
        "<") > 5


def test_depth_counts_calls_and_include_selects_subtrees(tiny_gpt2, tiny_ids):
    shallow = trace_shapes(tiny_gpt2, tiny_ids, depth=1)
    assert {e.path for e in shallow.events} == {
        "", "transformer.wte", "transformer.wpe", "transformer.drop", "transformer.h.0",
        "transformer.h.1", "transformer.ln_f", "lm_head"}
    attn = trace_shapes(tiny_gpt2, tiny_ids, include="transformer.h.1.attn", ops=True)
    assert {e.path for e in attn.events} == {
        "transformer.h.1.attn", "transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj",
        "transformer.h.1.attn.attn_dropout", "transformer.h.1.attn.resid_dropout"}
    assert attn.events[0].parent == -1
    with pytest.raises(PatternError, match="Did you mean"):
        trace_shapes(tiny_gpt2, tiny_ids, include="transformer.h.*.atn")
    with pytest.raises(ValueError, match="depth"):
        trace_shapes(tiny_gpt2, tiny_ids, depth=-1)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        trace_shapes(tiny_ids, tiny_gpt2)


def test_broadcast_surprise_is_flagged():
    class Surprise(nn.Module):
        def forward(self, a, b):
            return a - b  # (4,) - (4, 1) -> (4, 4): rarely what was meant

    trace = trace_shapes(Surprise(), torch.zeros(4), torch.zeros(4, 1), ops=True)
    sub = [e for e in trace.events if e.kind == "op"]
    assert [e.name for e in sub] == ["sub"] and sub[0].broadcast
    assert "⚠ broadcast" in str(trace)
    normal = trace_shapes(Surprise(), torch.zeros(3, 4), torch.zeros(4), ops=True)
    assert not any(e.broadcast for e in normal.events)


def test_diff_reports_changed_added_and_removed_events(tiny_gpt2):
    a = trace_shapes(tiny_gpt2, torch.zeros(1, 4, dtype=torch.long))
    assert not a.diff(trace_shapes(tiny_gpt2, torch.zeros(1, 4, dtype=torch.long)))
    b = trace_shapes(tiny_gpt2, torch.zeros(1, 6, dtype=torch.long))
    diff = a.diff(b)
    assert diff and {c.change for c in diff.changes} == {"changed"}
    wte = next(c for c in diff.changes if c.path == "transformer.wte")
    assert wte.before == "(B=1, T=4) i64 -> (B=1, T=4, C=32)"
    assert wte.after == "(B=1, T=6) i64 -> (B=1, T=6, C=32)"
    shallow = trace_shapes(tiny_gpt2, torch.zeros(1, 4, dtype=torch.long), depth=1)
    removed = a.diff(shallow)
    assert {c.change for c in removed.changes} == {"removed"}
    assert "shape differences" in str(removed)
    json.dumps(removed.to_dict())


def test_user_dims_name_the_sizes(tiny_gpt2):
    trace = trace_shapes(nn.Linear(5, 7), torch.zeros(3, 5), dims={"B": 3, "F": 5, "K": 7})
    assert "(B=3, F=5) -> (B=3, K=7)" in str(trace)
    trace = trace_shapes(tiny_gpt2, torch.zeros(3, 8, dtype=torch.long), dims={"T": 9})
    assert trace.dims["T"] == 9 and trace.dims["hs"] == 16  # the user's word wins


def test_shape_tracer_traces_any_block_of_code(tiny_gpt2, tiny_ids):
    with ShapeTracer(tiny_gpt2, depth=0) as tracer:
        tiny_gpt2.generate(tiny_ids[:1], 3, temperature=0)
    roots = tracer.trace.events
    assert [e.call for e in roots] == [0, 1, 2]
    assert [e.input_shapes[0] for e in roots] == [(1, 8), (1, 1), (1, 1)]
    with pytest.raises(RuntimeError, match="records one block"), tracer:
        pass


def test_public_names():
    assert tle.trace_shapes is trace_shapes
    assert tle.ShapeTrace.__name__ == "ShapeTrace"


def test_include_keeps_the_batch_and_token_names(tiny_gpt2, tiny_ids):
    trace = trace_shapes(tiny_gpt2, tiny_ids, include="transformer.h.0.mlp")
    assert all(e.path.startswith("transformer.h.0.mlp") for e in trace.events)
    assert trace.dims["B"] == 2 and trace.dims["T"] == 8  # were missing: the root was unhooked
    assert trace.dims.format(trace.events[0].input_shapes[0]) == "(B=2, T=8, C=32)"


def test_diff_of_a_length_change_says_so_first(tiny_gpt2):
    a = trace_shapes(tiny_gpt2, torch.zeros(1, 13, dtype=torch.long), ops=True)
    b = trace_shapes(tiny_gpt2, torch.zeros(1, 19, dtype=torch.long), ops=True)
    diff = a.diff(b)
    text = str(diff)
    assert text.splitlines()[0] == "T: 13 -> 19"
    assert f"all {len(diff)} events have the same shapes in named dims" in text
    assert "shape differences" not in text and len(text.splitlines()) == 2  # not 99 rows
    assert diff.to_dict()["dims"] == [{"name": "T", "before": 13, "after": 19}]
    # a change the dims do not explain is still listed, after the dims
    shallow = trace_shapes(tiny_gpt2, torch.zeros(1, 19, dtype=torch.long), depth=1)
    mixed = str(trace_shapes(tiny_gpt2, torch.zeros(1, 13, dtype=torch.long), depth=2)
                .diff(shallow))
    assert mixed.startswith("T: 13 -> 19") and "shape differences beyond that" in mixed
    assert "transformer.h.0.attn CausalSelfAttention" in mixed
