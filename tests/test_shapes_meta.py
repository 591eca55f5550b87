"""Shape-only traces on meta tensors: same shapes as real runs, no weights touched."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from support.zoo import ZOO, ZOO_BY_NAME, ModelGuard, SharedHead
from torchlens_edu.models import GPT2, GPT2Config, explicit_attention
from torchlens_edu.shapes import trace_shapes
from torchlens_edu.shapes.meta import on_meta, op_flops


def _by_key(trace):
    return {(e.kind, e.path, e.name, e.call): (e.input_shapes, e.output_shapes)
            for e in trace.events}


def test_meta_trace_has_the_shapes_of_a_real_run(tiny_gpt2, tiny_ids):
    for ops in (False, True):
        real = trace_shapes(tiny_gpt2, tiny_ids, ops=ops)
        meta = trace_shapes(tiny_gpt2, tiny_ids, ops=ops, meta=True)
        assert _by_key(meta) == _by_key(real)
        assert meta.meta and all(e.seconds is None for e in meta.events)


def test_meta_trace_touches_no_weight(tiny_gpt2, tiny_ids):
    params = {name: (p, p.detach().clone()) for name, p in tiny_gpt2.named_parameters()}
    seen = []
    handle = tiny_gpt2.transformer.h[0].attn.c_attn.register_forward_hook(
        lambda mod, args, out: seen.append((mod.weight.device.type, out.device.type)))
    try:
        trace_shapes(tiny_gpt2, tiny_ids, meta=True, ops=True)
    finally:
        handle.remove()
    assert seen == [("meta", "meta")]  # the run itself was shape-only
    for name, param in tiny_gpt2.named_parameters():
        assert param is params[name][0] and param.device.type == "cpu"
        assert torch.equal(param, params[name][1])
    assert tiny_gpt2.lm_head.weight is tiny_gpt2.transformer.wte.weight
    with on_meta(tiny_gpt2):  # one meta twin per tensor: tied weights stay tied
        assert tiny_gpt2.lm_head.weight is tiny_gpt2.transformer.wte.weight
        assert all(t.is_meta for t in tiny_gpt2.state_dict().values())
        assert isinstance(tiny_gpt2.lm_head.weight, torch.nn.Parameter)


def test_a_module_reachable_under_two_paths_gets_its_own_weights_back():
    import torchlens_edu as tle

    model = SharedHead()
    ids = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(0))
    expected = model(ids)
    guard = ModelGuard(model)
    trace_shapes(model, ids, meta=True)
    guard.check()
    tle.inspect(model).trace(ids, meta=True, ops=True)
    guard.check()
    with tle.inspect(model).capture("*") as cache:  # estimates its memory with a meta run
        model(ids)
    guard.check()
    assert torch.equal(cache["head"], expected)  # one module: its first path
    assert torch.equal(model(ids), expected)  # was: "Tensor on device cpu is not on ... meta"


def test_model_guard_notices_a_weight_swapped_under_a_second_path():
    model = SharedHead()
    guard = ModelGuard(model)
    model.decoder.proj.weight = torch.nn.Parameter(model.emb.weight.detach().clone())
    with pytest.raises(AssertionError, match=r"head\.weight is not the same tensor object"):
        guard.check()


def test_flops_match_torch_flop_counter_and_memory_is_per_new_tensor(tiny_gpt2, tiny_ids):
    trace = trace_shapes(tiny_gpt2, tiny_ids, meta=True, ops=True)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), explicit_attention(), counter:
        tiny_gpt2(tiny_ids)
    assert trace.events[0].flops == counter.get_total_flops() > 0
    ops = trace.ops_at("transformer.h.0.attn")
    view = next(e for e in ops if e.name == "view")
    assert view.memory == 0  # a view allocates nothing
    softmax = next(e for e in ops if e.name == "softmax")
    assert softmax.memory == 2 * 2 * 8 * 8 * 4
    assert trace.modules("lm_head")[0].flops == 2 * 2 * 8 * 32 * 256


def test_a_model_built_on_meta_needs_meta_true():
    with torch.device("meta"):
        model = GPT2(GPT2Config.preset("tiny"))
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="meta=True"):
        trace_shapes(model, ids)
    assert trace_shapes(model, ids, meta=True).events[0].output_shapes == [(1, 4, 256)]


def _names(labels: list[list[str]]) -> list[list[str]]:
    return [[label.split("=")[0] for label in shape] for shape in labels]


def test_gpt2_xl_meta_shapes_are_a_small_run_scaled_by_the_same_names():
    small = GPT2(GPT2Config(vocab_size=300, n_positions=64, n_embd=96, n_layer=2, n_head=4))
    with torch.device("meta"):
        xl = GPT2(GPT2Config.preset("gpt2-xl"))
    ids = torch.zeros(3, 5, dtype=torch.long)
    real = trace_shapes(small.eval(), ids, ops=True).to_dict()["events"]
    meta = trace_shapes(xl, ids, ops=True, meta=True).to_dict()["events"]
    first_two = [e for e in meta
                 if not re.match(r"transformer\.h\.([2-9]|\d\d)(\.|$)", e["path"])]

    def named(events):
        return [(e["kind"], e["path"], e["name"], e["call"], _names(e["dims"]["inputs"]),
                 _names(e["dims"]["outputs"])) for e in events]

    assert named(first_two) == named(real)
    q = next(e for e in meta if e["path"] == "transformer.h.47.attn" and e["name"] == "transpose")
    assert q["dims"]["outputs"] == [["B=3", "nh=25", "T=5", "hs=64"]]



def test_attention_flops_with_grouped_kv_heads_and_3d_inputs():
    # Hugging Face's Llama passes 2 k/v heads for 8 query heads (enable_gqa=True); torch < 2.13's
    # own formula refused that, and any 3-D call
    q, kv = torch.empty(2, 8, 5, 16, device="meta"), torch.empty(2, 2, 7, 16, device="meta")
    full = kv.repeat_interleave(4, dim=1)  # what the kernel broadcasts to
    expected = sdpa_flop_count(q.shape, full.shape, full.shape)
    assert op_flops("scaled_dot_product_attention", [q, kv, kv], [q]) == expected
    q3, kv3 = q.flatten(0, 1), full.flatten(0, 1)  # (B*nh, T, hs)
    assert op_flops("scaled_dot_product_attention", [q3, kv3, kv3], [q3]) == expected

_XL_SCRIPT = """
import json, os, resource, sys, time, torch
import torchlens_edu as tle
from torchlens_edu.models import GPT2, GPT2Config


def rss_mb(field):  # resident memory now (VmRSS) or at this process's peak (VmHWM)
    if os.path.exists("/proc/self/status"):
        with open("/proc/self/status") as status:
            return next(int(l.split()[1]) for l in status if l.startswith(field)) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


before = rss_mb("VmRSS")  # torch's own libraries: ~0.2 GB on a CPU build, ~0.6 GB with CUDA
with torch.device("meta"):
    model = GPT2(GPT2Config.preset("gpt2-xl"))
ids = torch.zeros(1, 1024, dtype=torch.long)
start = time.perf_counter()
trace = tle.trace_shapes(model, ids, meta=True)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "rss_mb": rss_mb("VmHWM") - before,
                  "params": trace.events[0].params, "flops": trace.events[0].flops,
                  "out": trace.events[0].output_shapes}))
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="peak RSS via /proc or the resource module")
def test_gpt2_xl_meta_trace_allocates_no_parameter_memory():
    done = subprocess.run([sys.executable, "-c", _XL_SCRIPT], capture_output=True, text=True,
                          timeout=300, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["params"] == 1_557_611_200  # 6.2 GB in float32 if it were allocated
    assert result["out"] == [[1, 1024, 50257]]
    assert result["rss_mb"] < 300, result  # growth while building and tracing
    assert result["flops"] > 3e12
    # The target is < 2 s on a laptop; this shared CI machine only gets a loose bound.
    assert result["seconds"] < 60, result


@pytest.mark.parametrize("entry", ZOO, ids=[e.name for e in ZOO])
def test_meta_matches_real_shapes_across_the_zoo(entry):
    if entry.needs and importlib.util.find_spec(entry.needs) is None:
        pytest.skip(f"needs {entry.needs}")
    model = entry.build()
    args, kwargs = entry.inputs()
    with torch.no_grad():
        real = trace_shapes(model, *args, **kwargs)
        meta = trace_shapes(model, *args, meta=True, **kwargs)
    assert _by_key(meta) == _by_key(real)


class ReadsItsInputs(nn.Module):
    """Masking code in the style of Hugging Face's: it moves the mask to its activations'
    device, reads its values (``.all()``, ``.item()``), builds positions on that device and
    enters autocast there; ``check_values`` reads the values of an activation too."""

    def __init__(self, check_values: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.fc = nn.Linear(8, 8)
        self.check_values = check_values

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)  # (B, T, C)
        pos = torch.arange(ids.shape[1], device=h.device)  # (T,)
        assert pos.max().item() < 16
        keep = mask.to(h.device, torch.bool)  # (B, T)
        if keep.all():
            keep = None
        with torch.autocast(device_type=h.device.type, enabled=False):
            h = self.fc(h.float())
        if keep is not None:
            h = h.masked_fill(~keep[..., None], 0.0) + pos[:, None]
        if self.check_values and h.abs().max().item() > 1e4:  # @needs_values
            h = h / 2
        return h


def _padded() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    return ids, mask


def test_meta_trace_keeps_input_data_real_where_code_reads_it():
    model = ReadsItsInputs()
    ids, mask = _padded()
    guard = ModelGuard(model)
    for ops in (False, True):
        meta = trace_shapes(model, ids, mask, meta=True, ops=ops)
        assert _by_key(meta) == _by_key(trace_shapes(model, ids, mask, ops=ops))
    assert meta.events[0].output_shapes == [(2, 5, 8)]
    guard.check()
    with torch.autocast("cpu", enabled=False):  # torch's autocast is its own again
        pass
    with pytest.raises(RuntimeError, match="unsupported scalarType"):
        torch.autocast("meta")


def test_a_meta_trace_names_the_line_that_needs_values():
    ids, mask = _padded()
    with pytest.raises(RuntimeError) as info:
        trace_shapes(ReadsItsInputs(check_values=True), ids, mask, meta=True)
    note = "\n".join(getattr(info.value, "__notes__", [str(info.value)]))
    with open(__file__) as source:
        line = next(n for n, text in enumerate(source, 1)
                    if text.rstrip().endswith("@needs_values"))
    assert f"test_shapes_meta.py:{line}" in note
    assert "`item` reads the values of a tensor computed from the weights" in note
    assert "this line needs values" in note


def test_hugging_face_masking_code_runs_on_meta():
    pytest.importorskip("transformers")
    ids, mask = _padded()
    for name in ("hf_bert", "hf_llama", "hf_t5"):  # .all() on the padding mask, SDPA masks
        model = ZOO_BY_NAME[name].build()
        guard = ModelGuard(model)
        kwargs = {"input_ids": ids, "attention_mask": mask}
        if name == "hf_t5":
            kwargs["decoder_input_ids"] = ids[:, :3]
        meta = trace_shapes(model, meta=True, **kwargs)
        assert _by_key(meta) == _by_key(trace_shapes(model, **kwargs)), name
        guard.check()
