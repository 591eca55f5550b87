"""PyTorch's own modules and stateful code we did not write: ``nn.TransformerEncoder``'s padding
fast path (a nested tensor between its layers), and forwards that write state (BatchNorm's
running statistics, a step counter, a cache rebound in a buffer, dropout's random draw). A
forward the toolkit runs itself (a trace, a summary, a comparison, a NaN replay) leaves all of
it as it was; a forward the user runs under an observer leaves it as a plain step does."""

from __future__ import annotations

import math
from typing import Any

import corpus
import pytest
import torch
import torch.nn as nn
from corpus import CORPUS_BY_NAME, NH, C, padded_copy

import torchlens_edu as tle
from support.source_lines import line_of
from support.zoo import ModelGuard
from torchlens_edu._core.tree import iter_tensors
from torchlens_edu.nans import NonFiniteError, watch_nans

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")


def _encoder() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(C, NH, 2 * C, dropout=0.1, batch_first=True)
    model = nn.TransformerEncoder(layer, 2).eval()
    x = torch.randn(2, 8, C, generator=torch.Generator().manual_seed(1))
    padding = torch.zeros(2, 8, dtype=torch.bool)
    padding[1, 5:] = True  # the second sequence is padded
    return model, x, padding


def test_a_padded_batch_on_the_encoders_fast_path_is_observed_like_plain_hooks() -> None:
    model, x, padding = _encoder()
    guard = ModelGuard(model)
    reference: list[tuple[str, list[torch.Tensor]]] = []
    handles = [m.register_forward_hook(lambda mod, a, out, path=path: reference.append(
        (path, [padded_copy(t) for t in iter_tensors(out)]))) for path, m in model.named_modules()]
    with torch.no_grad():
        model(x, src_key_padding_mask=padding)
    for handle in handles:
        handle.remove()
    assert any(t.is_nested for t in iter_tensors(model.layers[0].linear1(  # what the layers get
        torch._nested_tensor_from_mask(x, ~padding, mask_check=False))))
    seen: list[tuple[str, list[torch.Tensor]]] = []
    with tle.hooks(model) as h, torch.no_grad():
        h.forward("*", lambda c: seen.append(
            (c.path, [padded_copy(t) for t in iter_tensors(c.output)])))
        model(x, src_key_padding_mask=padding)
    assert [p for p, _ in seen] == [p for p, _ in reference]
    for (path, got), (_, want) in zip(seen, reference, strict=True):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=path)
    with tle.inspect(model).capture("layers.*.linear1") as cache, torch.no_grad():
        model(x, src_key_padding_mask=padding)
    assert cache["layers.0.linear1"].is_nested
    assert "layers.0.linear1 │ (B=2, 8" in repr(cache)  # its padded shape
    with torch.no_grad():
        trace = tle.trace_shapes(model, x, src_key_padding_mask=padding)
        summary = tle.inspect(model).summary(x, src_key_padding_mask=padding)
    assert trace.modules("layers.0.linear1")[0].output_shapes == [(2, 8, 2 * C)]
    assert "TransformerEncoderLayer" in repr(summary)
    with watch_nans(model), torch.no_grad():  # healthy: quiet
        model(x, src_key_padding_mask=padding)
    guard.check()


def test_a_fault_on_the_encoders_fast_path_names_its_layer() -> None:
    model, x, padding = _encoder()
    with torch.no_grad():
        model.layers[1].linear1.weight[0, 0] = math.inf
    with pytest.raises(NonFiniteError) as info, watch_nans(model), torch.no_grad():
        model(x, src_key_padding_mask=padding)
    report = info.value.report
    assert (report.phase, report.module, report.op) == ("forward", "layers.1.linear1", "linear")
    assert "parameter layers.1.linear1.weight already held +inf" in report.hint


def test_a_layer_inside_torchs_own_module_is_explained_at_the_line_that_ran_the_model() -> None:
    model, x, _ = _encoder()
    model.layers[0].linear1 = nn.Linear(C + 1, 2 * C)
    with pytest.raises(RuntimeError) as info:
        tle.trace_shapes(model, x)  # @ran
    lines = [line.strip() for line in "\n".join(info.value.__notes__).splitlines()]
    assert lines[0] == "torchlens_edu: the forward failed in layers.0.linear1 (Linear)"
    where = line_of("tle.trace_shapes(model, x)  # @ran", __file__)
    assert lines[1].startswith("at ") and lines[1].endswith(
        f"{where}  tle.trace_shapes(model, x)  # @ran")
    assert (f"expected: the input's last axis (C={C}) equal to the layer's in_features "
            f"({C + 1})") in lines


class Stateful(nn.Module):
    """Writes state in its forward, the ways learners' code does."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(C, C)
        self.bn = nn.BatchNorm1d(C)  # running statistics, num_batches_tracked
        self.drop = nn.Dropout(0.5)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # in place
        self.register_buffer("cache", torch.zeros(0, C))  # rebound: a growing KV cache
        self.calls = 0  # a plain attribute, rebound
        self.fault = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        self.calls += 1
        h = self.bn(self.fc(x).transpose(1, 2)).transpose(1, 2)  # (B, T, C)
        self.cache = torch.cat([self.cache, h.detach()[0]])
        if self.fault:
            h = torch.log(h - 1e6)  # @fault
        return self.drop(h) * self.steps


def _state(model: Stateful) -> tuple[dict[str, torch.Tensor], int, torch.Tensor]:
    return ({k: v.clone() for k, v in model.state_dict().items()}, model.calls,
            torch.get_rng_state())


def _assert_same(got: tuple, want: tuple) -> None:
    assert got[0].keys() == want[0].keys()
    for key in want[0]:
        assert torch.equal(got[0][key], want[0][key]), key
    assert got[1] == want[1], "the plain attribute"
    assert torch.equal(got[2], want[2]), "the random state"


def _stateful() -> tuple[Stateful, torch.Tensor]:
    torch.manual_seed(0)
    return Stateful().train(), torch.randn(2, 8, C, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("call", ["trace", "ops", "meta", "summary", "compare"])
def test_a_forward_the_toolkit_runs_leaves_the_models_state_and_the_rng(call: str) -> None:
    twin, _ = _stateful()
    model, x = _stateful()
    torch.manual_seed(7)
    before = _state(model)
    guard = ModelGuard(model)
    if call == "summary":
        tle.inspect(model).summary(x)
    elif call == "compare":
        twin_guard = ModelGuard(twin)
        assert tle.compare(model, twin, x).first is None
        twin_guard.check()
    else:
        tle.trace_shapes(model, x, ops=call != "trace", meta=call == "meta")
    _assert_same(_state(model), before)
    assert model.cache.shape == (0, C) and not model.cache.is_meta
    guard.check()


@pytest.mark.parametrize("how", ["hooks", "capture", "watch_nans", "watch_nans_replay"])
def test_a_users_step_under_an_observer_changes_the_state_as_a_plain_step(how: str) -> None:
    plain, x = _stateful()
    torch.manual_seed(7)
    plain(x).pow(2).mean().backward()
    want = _state(plain)
    model, _ = _stateful()
    torch.manual_seed(7)
    loss: Any = None
    if how == "hooks":
        with tle.hooks(model) as h:
            h.forward("*", lambda c: None)
            loss = model(x).pow(2).mean()
    elif how == "capture":
        with tle.inspect(model).capture("*", grads=True):
            loss = model(x).pow(2).mean()
            loss.backward()
        loss = None
    elif how == "watch_nans":
        with watch_nans(model):
            loss = model(x).pow(2).mean()
    else:  # a fault after the forward: the watch replays the step to find its producer
        model.fault = True
        with pytest.raises(NonFiniteError) as info, watch_nans(model):
            model(x).mean().backward()
        assert info.value.report.op == "log"
        assert info.value.report.source.endswith(line_of("# @fault", __file__))
    if loss is not None:
        loss.backward()
    got = _state(model)
    if how == "watch_nans_replay":  # the faulty step stopped after its forward
        plain, _ = _stateful()
        plain.fault = True
        torch.manual_seed(7)
        plain(x)
        want = _state(plain)
    _assert_same(got, want)
    assert model.cache.shape == (8, C)  # one step's rows, once


def test_without_a_token_embedding_the_width_comes_from_multihead_attention() -> None:
    model, x, _ = _encoder()
    dims = tle.trace_shapes(model, x).dims
    assert (dims["B"], dims["C"], dims["nh"], dims["hs"]) == (2, C, NH, C // NH)


def test_a_compiled_model_is_traced_and_summarized_through_its_eager_original() -> None:
    model, x, _ = _encoder()
    compiled = torch.compile(model, backend="eager")
    guard = ModelGuard(compiled)
    for options in ({}, {"ops": True}, {"meta": True}):
        eager = tle.trace_shapes(model, x, **options)
        trace = tle.trace_shapes(compiled, x, **options)
        assert [(e.kind, e.path, e.name, e.input_shapes, e.output_shapes) for e in trace.events] \
            == [(e.kind, e.path, e.name, e.input_shapes, e.output_shapes) for e in eager.events]
        assert trace.roots == [
            "TransformerEncoder (model._orig_mod, the eager model torch.compile wraps)"]
    summary = tle.inspect(compiled).summary(x)
    assert summary.rows[0][:2] == ("", "TransformerEncoder")
    assert summary.notes[0] == "torch.compile's eager model._orig_mod"
    first = repr(summary).splitlines()[2]
    assert first.startswith("<model> (torch.compile's eager model._orig_mod) ")
    assert [cell.strip() for cell in first.split("│")[1:]] == [
        "TransformerEncoder", "(B=2, 8:T|hs, C=32)", "17,088"]
    guard.check()


def test_compare_runs_a_compiled_model_eagerly_and_the_nan_watch_says_how_to_watch_one(
        ) -> None:
    model, x, _ = _encoder()
    compiled = torch.compile(model, backend="eager")
    guard = ModelGuard(compiled)
    result = tle.compare(compiled, model, x)
    assert result.agree and result.notes == [
        "the model is torch.compile'd: its eager original (model._orig_mod) was compared, the "
        "same modules and weights"]
    holder = nn.Sequential(nn.Linear(32, 32), torch.compile(nn.Linear(32, 32), backend="eager"))
    for watched, name in ((compiled, "model"), (holder, "model.1")):
        with pytest.raises(TypeError) as info:
            tle.watch_nans(watched)
        assert str(info.value) == (
            f"watch_nans cannot look inside torch.compile'd code ({name} is an OptimizedModule): "
            "TorchDynamo would compile the watch's hooks into it. While you hunt the NaN, watch "
            f"and run the eager original {name}._orig_mod (the same modules and weights), e.g. "
            f"with tle.watch_nans({name}._orig_mod): ..., and compile again when it is fixed")
    guard.check()


def test_a_complex_rotary_embeddings_paired_axis_gets_no_borrowed_name() -> None:
    specimen = CORPUS_BY_NAME["llama_complex_rotary"]
    model = specimen.model()
    (ids,), _ = specimen.inputs()
    rows = {e.name: e for e in tle.trace_shapes(model, ids, ops=True, meta=True).events
            if e.kind == "op" and e.filename == corpus.__file__}
    trace = " ".join(tle.trace_shapes(model, ids, ops=True).to_text(400).split())
    # hs/2 = 4 = nh: the complex axis is not "nh"
    assert "view_as_complex (B=2, 8:T|hs, nh=4, 8:T|hs) -> (B=2, 8:T|hs, nh=4, 4) c64" in trace
    assert "[], view (16, 4) c64 -> (1, 8:T|hs, 1, 4) c64" in trace
    assert rows["view_as_complex"].output_shapes == [(2, 8, NH, C // NH // 2)]
    model.freqs_cis[3, 1] = complex(math.inf, 0.0)
    with pytest.raises(NonFiniteError) as info, watch_nans(model):
        model(ids).float().pow(2).mean().backward()
    report = info.value.report
    assert (report.phase, report.op) == ("forward", "mul")
    assert report.source.endswith("/" + line_of("# @rotary", corpus.__file__))
    assert "buffer freqs_cis already held +inf before 'mul' used it" in report.hint


def _normed(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(C, 2 * C), nn.BatchNorm1d(2 * C), nn.GELU(),
                          nn.Linear(2 * C, C)).train()
    if kind == "weight_norm":
        nn.utils.parametrizations.weight_norm(model[0])
    elif kind == "spectral_norm":  # a power-iteration buffer (_u) updated in train mode
        nn.utils.parametrizations.spectral_norm(model[0])
    elif kind == "old_weight_norm":  # a forward pre-hook sets ``weight`` as a plain attribute
        nn.utils.weight_norm(model[0])
    elif kind == "old_spectral_norm":
        nn.utils.spectral_norm(model[0])
    return model


@pytest.mark.filterwarnings("ignore:.*weight_norm. is deprecated:FutureWarning")
@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm", "old_weight_norm",
                                  "old_spectral_norm"])
def test_toolkit_calls_between_a_forward_and_its_backward_change_nothing(kind: str) -> None:
    x = torch.randn(4, C, generator=torch.Generator().manual_seed(1))
    plain = _normed(kind)
    plain(x).pow(2).mean().backward()
    model = _normed(kind)
    loss = model(x).pow(2).mean()  # the user's step, its graph waiting for backward
    guard = ModelGuard(model)
    for options in ({}, {"ops": True}, {"meta": True}):
        tle.trace_shapes(model, x, **options)
    tle.inspect(model).summary(x)
    tle.compare(model, _normed(kind), x)
    guard.check()
    loss.backward()  # BatchNorm's backward reads the running statistics the traces ran over
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)
    for (name, b), c in zip(model.named_buffers(), plain.buffers(), strict=True):
        assert torch.equal(b, c), name  # _u and the running statistics: one step's update
    model.zero_grad(set_to_none=True)
    with watch_nans(model):  # a step under the watch updates them as a plain step
        model(x).pow(2).mean().backward()
    plain(x).pow(2).mean().backward()
    for (name, b), c in zip(model.named_buffers(), plain.buffers(), strict=True):
        assert torch.equal(b, c), name


class TopKMoE(nn.Module):
    """A mixture of experts with top-k routing, as Mixtral-from-scratch tutorials write it."""

    def __init__(self, experts: int = 4, k: int = 2) -> None:
        super().__init__()
        self.k = k
        self.gate = nn.Linear(C, experts, bias=False)
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(C, 3 * C), nn.GELU(),
                                                    nn.Linear(3 * C, C)) for _ in range(experts)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        flat = x.view(-1, c)  # (B*T, C)
        weights, chosen = torch.topk(self.gate(flat).softmax(-1), self.k, dim=-1)  # (B*T, k)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)  # @route
            out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        return out.view(b, t, c)


def test_a_top_k_mixture_of_experts_traces_and_its_meta_trace_names_the_routing_line() -> None:
    torch.manual_seed(0)
    model = TopKMoE().eval()
    x = torch.randn(2, 8, C, generator=torch.Generator().manual_seed(1))
    guard = ModelGuard(model)
    ops = tle.trace_shapes(model, x, ops=True)
    names = [e.name for e in ops.events if e.kind == "op"]
    assert {"topk", "where", "index_add_"} <= set(names)
    calls = {e.path: e.input_shapes[0][0] for e in ops.events
             if e.kind == "module" and e.path.startswith("experts.") and e.path.endswith(".0")
             and e.path.count(".") == 2}  # experts.N.0: each expert's first layer
    assert sum(calls.values()) == 2 * 8 * model.k  # every token reaches k experts
    for options in ({"meta": True}, {"meta": True, "ops": True}):
        with pytest.raises(NotImplementedError) as info:
            tle.trace_shapes(model, x, **options)
        lines = [line.strip() for line in "\n".join(info.value.__notes__).splitlines()]
        assert lines[0] == "torchlens_edu: `where` failed in TopKMoE.forward"
        assert lines[1].endswith(line_of("# @route", __file__) +
                                 "  token, slot = torch.where(chosen == e)  # @route")
        assert ("hint: this line needs values: trace with meta=False on a small input, or move "
                "the check out of the forward") in lines
    with watch_nans(model):
        model(x).pow(2).mean().backward()
    model.zero_grad(set_to_none=True)
    guard.check()
    with torch.no_grad():
        model.experts[2][2].weight[0, 0] = math.inf
    with pytest.raises(NonFiniteError) as fault, watch_nans(model):
        model(x).pow(2).mean().backward()
    assert (fault.value.report.module, fault.value.report.op) == ("experts.2.2", "linear")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_under_every_observer(dtype: torch.dtype) -> None:
    specimen = CORPUS_BY_NAME["nanogpt_bias_mask"]
    model = specimen.model().to(dtype)
    (ids,), _ = specimen.inputs()
    guard = ModelGuard(model)
    short = {torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]
    trace = tle.trace_shapes(model, ids, ops=True, meta=True)
    assert trace.modules("h.0.c_fc")[0].output_shapes == [(2, 8, 4 * C)]
    assert f"(B=2, 8:T|hs, 4C=128) {short}" in " ".join(trace.to_text(200).split())
    with tle.inspect(model).capture("h.0.c_fc", grads=True) as cache:
        model(ids).float().pow(2).mean().backward()
    assert cache["h.0.c_fc"].dtype == dtype and cache.grad("h.0.c_fc").dtype == dtype
    model.zero_grad(set_to_none=True)
    guard.check()
    with torch.no_grad():
        model.h[0].c_fc.weight[0, 0] = math.inf
    with pytest.raises(NonFiniteError) as info, watch_nans(model):
        model(ids).float().pow(2).mean().backward()
    assert (info.value.report.module, info.value.report.op) == ("h.0.c_fc", "linear")


def test_capturing_an_encoder_layers_attention_says_how_to_get_its_weights() -> None:
    model, x, _ = _encoder()
    with tle.inspect(model).capture("layers.*.self_attn", inputs=True) as cache, \
            torch.no_grad():
        model(x)
    assert cache.no_weights == ["layers.0.self_attn", "layers.1.self_attn"]
    text = " ".join(repr(cache).split())
    assert ("layers.0.self_attn, layers.1.self_attn: nn.MultiheadAttention returned no attention "
            "weights (out[1] is None): its caller passed need_weights=False, as "
            "nn.TransformerEncoderLayer does.") in text
    recipe = ("args, kwargs = cache.inputs('layers.0.self_attn'); "
              "model.get_submodule('layers.0.self_attn')(*args, **{**kwargs, 'need_weights': "
              "True, 'average_attn_weights': False})[1]")
    assert recipe in text
    args, kwargs = cache.inputs("layers.0.self_attn")
    with torch.no_grad():  # the recipe works: one row of weights per head and query
        weights = model.get_submodule("layers.0.self_attn")(
            *args, **{**kwargs, "need_weights": True, "average_attn_weights": False})[1]
    assert weights.shape == (2, NH, 8, 8)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, NH, 8))
    mha = nn.MultiheadAttention(C, NH, batch_first=True).eval()  # asked for: no such note
    with tle.inspect(mha).capture("") as cache, torch.no_grad():
        assert mha(x, x, x)[1].shape == (2, 8, 8)  # the default: averaged over the heads
    assert cache.no_weights == [] and "need_weights" not in repr(cache)
    assert cache.averaged == [""]
    assert ("<model>: out[1] holds nn.MultiheadAttention's attention weights averaged over its "
            "heads (average_attn_weights=True, the default); one map per head: call it with "
            "average_attn_weights=False") in " ".join(repr(cache).split())
    with tle.inspect(mha).capture("") as cache, torch.no_grad():
        assert mha(x, x, x, average_attn_weights=False)[1].shape == (2, NH, 8, 8)
    assert cache.averaged == [] and "averaged" not in repr(cache)


class _CachedStep(nn.Module):
    """One decoding step of a Hugging Face model with its KV cache passed in."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, cache: Any) -> torch.Tensor:
        return self.model(input_ids=ids, past_key_values=cache, use_cache=True).logits


@pytest.mark.slow  # importing transformers, when no other test did
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_a_kv_cache_passed_in_is_not_advanced_by_the_toolkits_own_forwards() -> None:
    transformers = pytest.importorskip("transformers")
    model = CORPUS_BY_NAME["hf_llama"].model()
    ids = torch.randint(0, corpus.V, (2, 5), generator=torch.Generator().manual_seed(1))

    def prefilled() -> Any:
        cache = transformers.DynamicCache()
        with torch.no_grad():
            model(input_ids=ids[:, :4], past_key_values=cache, use_cache=True)
        return cache

    cache = prefilled()
    trace = tle.trace_shapes(model, input_ids=ids[:, 4:], past_key_values=cache, use_cache=True)
    assert trace.events[0].output_shapes[0] == (2, 1, corpus.V)
    summary = tle.inspect(model).summary(input_ids=ids[:, 4:], past_key_values=cache,
                                         use_cache=True)
    assert summary.rows[0][:2] == ("", "LlamaForCausalLM")
    assert summary.rows[0][3][0] == (2, 1, corpus.V)  # the logits of the one new token
    step = _CachedStep(model)
    twin = _CachedStep(CORPUS_BY_NAME["hf_llama"].model())
    comparison = tle.compare(step, twin, ids[:, 4:], cache)
    assert comparison.first is None  # both ran on the same 4 cached tokens
    assert cache.get_seq_length() == 4  # none of them appended its token to the user's cache


LAYER_NOTE = ("TransformerEncoderLayer: in eval without gradients PyTorch runs it as one fused "
              "kernel when no hook is on it; traced, it runs step by step (the same math), as "
              "shown")
MHA_NOTE = ("MultiheadAttention: in eval without gradients PyTorch runs it as one fused kernel "
            "(torch._native_multi_head_attention); an op trace sees its step-by-step path (the "
            "same math)")
NESTED_NOTE = ("nn.TransformerEncoder packed the padded batch into a nested tensor (its fast "
               "path for src_key_padding_mask in eval without gradients): inside it, shapes are "
               "padded shapes, and the padding is not computed")


def test_a_trace_says_when_pytorchs_fused_fast_path_would_run_instead() -> None:
    model, x, padding = _encoder()
    with torch.no_grad():
        assert tle.trace_shapes(model, x).notes == [LAYER_NOTE]
        ops = tle.trace_shapes(model, x, ops=True)
        assert ops.notes == [LAYER_NOTE, MHA_NOTE]
        assert tle.trace_shapes(model, x, src_key_padding_mask=padding).notes == [
            LAYER_NOTE, NESTED_NOTE]
        assert tle.trace_shapes(model.train(), x).notes == []  # training: no fast path
    assert tle.trace_shapes(model.eval(), x).notes == []  # gradients: no fast path
    text = " ".join(ops.to_text(100).split())
    assert f"note {LAYER_NOTE} note {MHA_NOTE}" in text
    torch.manual_seed(0)  # batch_first=False: PyTorch never fuses it
    sequence_first = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(C, NH, 2 * C, batch_first=False), 1,
        enable_nested_tensor=False).eval()
    with torch.no_grad():
        assert tle.trace_shapes(sequence_first, x.transpose(0, 1), ops=True).notes == []


def test_a_lazy_model_that_never_ran_is_inspected_and_its_meta_trace_says_run_it_first() -> None:
    model = nn.Sequential(nn.LazyLinear(2 * C), nn.ReLU(), nn.Linear(2 * C, C))
    text = " ".join(repr(tle.inspect(model)).split())
    assert ("2,080 parameters (2.1K), and 2 not sized yet (0.weight, 0.bias: lazy modules learn "
            "their sizes from the first forward).") in text
    assert "· weight not sized yet (lazy: the first forward sizes it)" in text
    with pytest.raises(ValueError) as info:
        tle.trace_shapes(model, torch.zeros(2, C), meta=True)
    assert str(info.value) == (
        "meta=True cannot run a model whose lazy modules never ran: LazyLinear '0' learns its "
        "sizes from the first real forward. Run the model once on a real input first "
        "(model(x)), or trace with meta=False")
    assert isinstance(model[0], nn.LazyLinear)  # untouched: still waiting for its first input
    trace = tle.trace_shapes(model, torch.zeros(2, C), ops=True)  # sizes it, as a forward does
    assert trace.modules("0")[0].output_shapes == [(2, 2 * C)]
    # after the ops that size and initialize LazyLinear's parameters (kaiming_uniform_, ...)
    assert [e.name for e in trace.events if e.kind == "op"][-3:] == ["linear", "relu", "linear"]
    lazy = nn.Sequential(nn.LazyLinear(2 * C), nn.ReLU(), nn.Linear(2 * C, C))
    with torch.no_grad():
        lazy[2].weight[0, 0] = math.inf
    with pytest.raises(NonFiniteError) as fault, watch_nans(lazy):
        lazy(torch.ones(2, C)).sum().backward()
    assert (fault.value.report.module, fault.value.report.op) == ("2", "linear")


def test_compare_on_the_encoders_nested_fast_path_names_the_changed_layer() -> None:
    model, x, padding = _encoder()
    twin, _, _ = _encoder()
    with torch.no_grad():
        assert tle.compare(model, twin, x, None, padding).first is None
        twin.layers[1].linear2.weight[0, 0] += 1.0
        first = tle.compare(model, twin, x, None, padding).first
    assert first is not None and (first.module, first.op) == ("layers.1.linear2", "linear")


def test_a_meta_shape_tracer_block_leaves_no_meta_state_behind() -> None:
    model, x = _stateful()
    before = _state(model)
    with tle.ShapeTracer(model, meta=True) as tracer:
        model(x)  # the user's code, on meta tensors: no step of theirs
        model(x)
    assert [e.path for e in tracer.trace.events if e.path == "bn"] == ["bn", "bn"]
    _assert_same(_state(model), before)
    assert model.cache.shape == (0, C) and not model.cache.is_meta and model.calls == 0
    with tle.ShapeTracer(model) as tracer:  # a real block is the user's step: it counts
        model(x)
    assert model.calls == 1 and int(model.steps) == 1 and model.cache.shape == (8, C)


def test_hooks_on_multihead_attentions_out_proj_say_it_is_never_called() -> None:
    model, x, _ = _encoder()
    with tle.hooks(model) as h:
        h.forward("layers.0.self_attn.out_proj", lambda c: None)
        with torch.no_grad():
            model(x)
        never = h.never_called()
    assert never == [("layers.0.self_attn.out_proj", (
        "nn.MultiheadAttention's out_proj is never called: MultiheadAttention reads "
        "out_proj.weight and .bias inside F.multi_head_attention_forward (or its fused kernel); "
        "hook 'layers.0.self_attn' for the attention's output"))]


def test_assert_shape_on_a_nested_tensor_says_it_has_no_single_shape() -> None:
    _, x, padding = _encoder()
    nested = torch._nested_tensor_from_mask(x, ~padding, mask_check=False)
    with pytest.raises(TypeError) as info:
        tle.assert_shape(nested, "B T C")
    assert str(info.value) == (
        f"assert_shape got a nested tensor, which has no single shape (its components: [8, {C}]"
        f", [5, {C}]): check each component (for c in t.unbind(): assert_shape(c, ...)), or "
        "its padded form (assert_shape(t.to_padded_tensor(0.0), ...))")
