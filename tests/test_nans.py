"""watch_nans: planted faults, each with the producer we expect (phase, module, op, line).

Lines are found by the ``# @tag`` comments next to the faulty code, so the tests do not break
when lines move.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchlens_edu as tle
from support.threads import in_threads
from torchlens_edu.models import GPT2, GPT2Config
from torchlens_edu.models.gpt2 import explicit_attention
from torchlens_edu.nans import NonFiniteError, watch_nans

KEYS = {"phase", "module", "op", "kind", "source", "rank", "hint"}


def line_of(tag: str) -> str:
    """``"tests/test_nans.py:LINE"`` (as _frames writes it) of the line tagged ``# @tag``."""
    with open(__file__) as f:
        for number, line in enumerate(f, 1):
            if line.rstrip().endswith(f"# @{tag}"):
                return f"{__file__}:{number}"
    raise AssertionError(f"no line tagged @{tag}")


def producer(model: nn.Module, *inputs: torch.Tensor, backward: bool = True, **kw) -> dict:
    """Run one watched step; return the report of the NonFiniteError it must raise."""
    with pytest.raises(NonFiniteError) as info, watch_nans(model, **kw):
        out = model(*inputs)
        if backward:
            out.float().sum().backward()
    report = info.value.report.to_dict()
    assert report.keys() >= KEYS
    return report


# ----------------------------------------------------------------------------- planted faults
class LogBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        h = torch.log(h)  # @log
        return x + h


class Net(nn.Module):
    """x -> block -> head, with optional functional glue between them."""

    def __init__(self, block: nn.Module, glue: str = "") -> None:
        super().__init__()
        self.block, self.glue = block, glue
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(x)
        if self.glue == "div":
            h = h / (h * 0).sum(-1, keepdim=True)  # @div
        if self.glue == "where":
            h = torch.where(h > 0, torch.sqrt(h), 0.0)  # @where
        return self.head(h)


class SqrtGain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.gain = nn.Parameter(torch.zeros(4))  # sqrt(0) is fine; its slope is not

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * torch.sqrt(self.gain)  # @sqrt


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c_fc = nn.Linear(4, 8)
        self.c_proj = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))  # @mlp


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qk = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.qk(x)
        scores = (q @ q.transpose(-2, -1)).masked_fill(~mask, float("-inf"))
        return F.softmax(scores, dim=-1) @ x  # @softmax


class Masker(nn.Module):
    """A module whose *output* holds -inf on purpose: an additive causal mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[-2]
        return torch.full((T, T), float("-inf")).triu(1)


class MaskedAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mask = Masker()
        self.qk = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        q = self.qk(x)
        scores = q @ q.transpose(-2, -1) + self.mask(x)
        if extra is not None:
            scores = scores + extra
        return F.softmax(scores, dim=-1) @ x


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(3, 4)


def test_log_of_negative_in_a_block_forward(x):
    torch.manual_seed(0)
    r = producer(Net(LogBlock()), x)
    assert (r["phase"], r["module"], r["op"], r["kind"]) == ("forward", "block", "log", "nan")
    assert r["source"] == line_of("log")
    assert r["hint"].startswith("log/sqrt of <= 0")
    assert r["rank"] is None
    assert r["inputs"][0]["min"] < 0 and r["outputs"][0]["nan"] > 0


def test_sqrt_of_zero_whose_gradient_is_inf(x):
    torch.manual_seed(0)
    r = producer(Net(SqrtGain()), x)
    assert (r["phase"], r["module"], r["op"]) == ("backward", "block", "SqrtBackward0")
    assert r["kind"] in ("+inf", "-inf") and r["forward_op"] == "sqrt"
    assert r["source"] == line_of("sqrt")  # the forward line that created the node
    assert r["hint"].startswith("log/sqrt of <= 0")


def test_weight_set_to_inf(x):
    torch.manual_seed(0)
    model = Net(LogBlock())
    model.block.fc = nn.Linear(4, 4)
    model.block.forward = lambda x: model.block.fc(x)  # @inf_weight
    with torch.no_grad():
        model.block.fc.weight[1, 2] = math.inf
    r = producer(model, x)
    assert (r["phase"], r["module"], r["op"]) == ("forward", "block.fc", "linear")
    assert r["source"] == line_of("inf_weight")
    assert "parameter block.fc.weight" in r["hint"]
    assert r["hint"].startswith("exploding values/learning rate")


def test_fp16_overflow_in_an_mlp():
    torch.manual_seed(0)
    mlp = MLP().half()
    with torch.no_grad():
        mlp.c_fc.weight.fill_(100.0)
    r = producer(mlp, torch.full((2, 4), 200.0, dtype=torch.float16), backward=False)
    assert (r["phase"], r["module"], r["op"], r["kind"]) == ("forward", "c_fc", "linear", "+inf")
    assert r["source"] == line_of("mlp")
    assert r["hint"].startswith("fp16 overflow above 65504")


def test_division_by_zero_in_functional_glue(x):
    torch.manual_seed(0)
    r = producer(Net(nn.Linear(4, 4), glue="div"), x)
    assert (r["phase"], r["module"], r["op"]) == ("forward", "", "div")
    assert r["kind"] in ("+inf", "-inf", "nan")
    assert r["source"] == line_of("div")
    assert r["hint"].startswith("division by ~0")


def test_the_torch_where_gradient_trap(x):
    torch.manual_seed(0)
    r = producer(Net(nn.Linear(4, 4), glue="where"), x)
    assert (r["phase"], r["module"], r["op"], r["kind"]) == (
        "backward", "", "SqrtBackward0", "nan")
    assert r["source"] == line_of("where")
    assert r["hint"].startswith("where-gradient trap")


def test_a_fully_masked_softmax_row(x):
    torch.manual_seed(0)
    model = Attention()
    mask = torch.ones(3, 3, dtype=torch.bool).tril()
    mask[1] = False  # query 1 may look nowhere
    r = producer(model, x, mask)
    assert (r["phase"], r["module"], r["op"], r["kind"]) == ("forward", "", "softmax", "nan")
    assert r["source"] == line_of("softmax")
    assert r["hint"].startswith("softmax over a fully masked row")


def test_nan_in_the_input_is_reported_as_input(x):
    torch.manual_seed(0)
    x = x.clone()
    x[2, 1] = math.nan
    model = Net(LogBlock())
    with pytest.raises(NonFiniteError) as info, watch_nans(model):
        model(x)  # @input
    r = info.value.report.to_dict()
    assert (r["phase"], r["module"], r["op"], r["kind"]) == ("input", "", "", "nan")
    assert r["source"] == line_of("input")
    assert r["inputs"][0]["nan"] == 1


def test_nan_from_the_loss_is_not_blamed_on_the_model(x):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(NonFiniteError) as info, watch_nans(model):
        torch.sqrt(model(x) * 0).sum().backward()
    r = info.value.report
    assert (r.phase, r.cause) == ("backward", "loss")


# ----------------------------------------------------------------------------- no false alarms
@pytest.mark.parametrize("impl", ["explicit", "sdpa"])
def test_no_false_positives_on_clean_gpt2_training_steps(impl):
    torch.manual_seed(0)
    model = GPT2(GPT2Config.preset("tiny", dropout=0.1, attn_impl=impl)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with watch_nans(model) as watch:
        for _ in range(3):
            logits = model(ids[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), ignore_index=3)
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert watch.reports == []


def test_intentional_minus_inf_masks_are_not_alarms(x):
    torch.manual_seed(0)
    model = MaskedAttention()
    extra = torch.zeros(3, 3)
    extra[:, 0] = -math.inf  # an additive mask input, -inf on purpose
    extra[0, 0] = 0.0
    with watch_nans(model) as watch:
        for _ in range(2):
            model(x, extra).sum().backward()
    assert watch.reports == []
    assert "mask" in watch._allow_inf  # learned once: its -inf are intended


def test_gpt2_fault_is_named_by_module_path_with_named_dims(tiny_gpt2, tiny_ids):
    with torch.no_grad():
        tiny_gpt2.transformer.h[1].mlp.c_fc.weight[0, 0] = math.nan
    with pytest.raises(NonFiniteError) as info, watch_nans(tiny_gpt2), explicit_attention():
        tiny_gpt2(tiny_ids)
    r = info.value.report
    assert (r.phase, r.module, r.op) == ("forward", "transformer.h.1.mlp.c_fc", "linear")
    assert r.source.endswith(f"gpt2.py:{_line_in_gpt2('h = self.c_fc(x)')}")
    assert r.outputs[0].shape == "(B=2, T=8, 4C=128)"


class ShiftLog(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(self.proj(x) - 100)  # @shiftlog


@pytest.mark.parametrize("grad", [True, False])
def test_an_output_at_the_address_of_a_freed_one_is_still_checked(x, grad):
    # proj's output is freed by the subtraction, and the log's output (the block's, the last
    # one: nothing downstream to catch it) can get its id: the watch must not take it for the
    # tensor it already probed
    torch.manual_seed(0)
    with torch.set_grad_enabled(grad):
        r = producer(nn.Sequential(ShiftLog()), x, backward=False)
    assert (r["phase"], r["module"], r["op"], r["kind"]) == ("forward", "0", "log", "nan")
    assert r["source"] == line_of("shiftlog")


def test_meta_and_fake_tensors_are_skipped(tiny_gpt2, tiny_ids):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from torchlens_edu.shapes import trace_shapes

    with watch_nans(tiny_gpt2) as watch:
        trace = trace_shapes(tiny_gpt2, tiny_ids, meta=True)  # no values: nothing to read
        assert trace.modules("transformer.wte")[0].output_shapes == [(2, 8, 32)]
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:  # as a memory estimate runs
            assert tiny_gpt2(mode.from_tensor(tiny_ids)).shape == (2, 8, 256)
        assert watch.reports == []
        with torch.no_grad():
            tiny_gpt2.transformer.h[0].mlp.c_proj.weight[0, 0] = math.nan
        with pytest.raises(NonFiniteError) as info:
            tiny_gpt2(tiny_ids)  # a real forward after it is still watched
    assert (info.value.report.module, info.value.report.op) == ("transformer.h.0.mlp.c_proj",
                                                                "linear")
    assert len(watch.reports) == 1


def _line_in_gpt2(code: str) -> int:
    import torchlens_edu.models.gpt2 as gpt2

    with open(gpt2.__file__) as f:
        return next(n for n, line in enumerate(f, 1) if code in line)


# ----------------------------------------------------------------------------- state and modes
def _hooks(model: nn.Module) -> list:
    state = []
    for m in model.modules():
        state.append((dict(m._forward_hooks), dict(m._forward_pre_hooks),
                      dict(m._backward_hooks), dict(m._backward_pre_hooks)))
    for p in model.parameters():
        state.append(dict(p._post_accumulate_grad_hooks or {}))
    return state


def test_model_hooks_rng_buffers_and_grads_are_left_as_they_were(x):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), LogBlock()).train()
    before = _hooks(model)
    params = [p.detach().clone() for p in model.parameters()]
    torch.manual_seed(1)
    plain_stats = None
    with torch.no_grad():
        reference = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
        reference.load_state_dict(model[:2].state_dict())
        reference.train()(x)
        plain_stats = reference[1].running_mean.clone()
    torch.manual_seed(1)
    model(x)
    rng_after_plain = torch.get_rng_state()
    model[1].reset_running_stats()
    torch.manual_seed(1)
    with pytest.raises(NonFiniteError), watch_nans(model):
        model(x)
    assert torch.equal(torch.get_rng_state(), rng_after_plain)  # the replay drew nothing
    assert torch.allclose(model[1].running_mean, plain_stats)  # updated once, not twice
    assert _hooks(model) == before
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    assert all(p.grad is None for p in model.parameters())


class DropLog(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.log(self.drop(x))  # log(0) where dropout zeroed  # @droplog


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")])])
def test_dropout_is_replayed_identically(device):
    torch.manual_seed(3)
    x = torch.rand(4, 8, device=device) + 0.5
    r = producer(DropLog().train().to(device), x, backward=False)
    assert (r["op"], r["kind"], r["source"]) == ("log", "-inf", line_of("droplog"))
    assert r["outputs"][0]["neginf"] == (r["inputs"][0]["zeros"] or 0) > 0


def test_warn_mode_reports_once_and_goes_on(x, capsys):
    torch.manual_seed(0)
    model = Net(LogBlock())
    with watch_nans(model, mode="warn") as watch:
        for _ in range(2):
            model(x)
    assert [r.op for r in watch.reports] == ["log", "log"]
    assert capsys.readouterr().err.count("NaN made in forward") == 1


def test_every_checks_every_nth_forward(x):
    torch.manual_seed(0)
    model = Net(LogBlock())
    with watch_nans(model, every=2, mode="warn") as watch:
        for _ in range(3):
            model(x)
    assert [r.step for r in watch.reports] == [1, 3]


def test_check_inf_false_watches_nan_only():
    class Div(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x / (x - x)  # x / 0: +-Inf where x != 0, NaN where x == 0

    model = Div()
    with watch_nans(model, check_inf=False, mode="warn") as watch:
        model(torch.ones(3))  # only +Inf: not watched
        model(torch.zeros(3))  # 0 / 0 = NaN
    assert [(r.op, r.kind, r.step) for r in watch.reports] == [("div", "nan", 2)]


def test_break_mode_without_a_terminal_raises_instead_of_hanging(x, capsys):
    torch.manual_seed(0)
    model = Net(LogBlock())
    with pytest.raises(NonFiniteError), watch_nans(model, mode="break"):
        model(x)
    assert "not interactive" in capsys.readouterr().err


def test_break_mode_opens_pdb_at_the_producing_line(x, monkeypatch):
    import pdb
    import sys

    torch.manual_seed(0)
    seen = {}
    monkeypatch.setattr(sys, "stdin", type("Tty", (), {"isatty": lambda self: True})())
    monkeypatch.setattr(pdb, "post_mortem", lambda tb: seen.setdefault("tb", tb))
    model = Net(LogBlock())
    with pytest.raises(NonFiniteError), watch_nans(model, mode="break"):
        model(x)
    tb = seen["tb"]
    while tb.tb_next is not None:
        tb = tb.tb_next
    assert f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" == line_of("log")
    assert (tb.tb_frame.f_locals["h"] < 0).any()  # the locals that made the NaN


def test_break_mode_stops_an_attached_debugpy_client_in_the_users_frame(x, monkeypatch):
    from torchlens_edu.nans import breakpoint as _nan_break

    torch.manual_seed(0)
    frames = []
    monkeypatch.setattr(_nan_break, "debugger_attached", lambda: True)
    monkeypatch.setattr(_nan_break, "debugpy_stop",
                        lambda frame: frames.append((frame.f_code.co_filename, frame.f_lineno)))
    model = Net(nn.Linear(4, 4), glue="where")
    with pytest.raises(NonFiniteError), watch_nans(model, mode="break"):
        model(x).sum().backward()
    assert [f"{f}:{n}" for f, n in frames] == [line_of("where")]


def test_bad_arguments_say_what_to_do():
    with pytest.raises(ValueError, match="mode="):
        watch_nans(nn.Linear(1, 1), mode="loud")
    with pytest.raises(ValueError, match="every="):
        watch_nans(nn.Linear(1, 1), every=0)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        watch_nans(lambda x: x)


def test_report_prints_with_rich_and_is_exported(x):
    torch.manual_seed(0)
    model = Net(LogBlock())
    with pytest.raises(tle.NonFiniteError) as info, tle.watch_nans(model):
        model(x)
    report = info.value.report
    assert isinstance(report, tle.NonFiniteReport)
    text = str(info.value)  # what an uncaught error shows: the whole report
    assert "hint: log/sqrt of <= 0" in text and line_of("log").rsplit("/", 1)[1] in text
    assert "<pre" in report._repr_html_()
    assert repr(report) == str(report)
    import pickle

    assert pickle.loads(pickle.dumps(info.value)).report.to_dict() == report.to_dict()


def test_a_failed_forward_or_backward_does_not_blind_the_next_steps(x):
    torch.manual_seed(0)
    model = Net(nn.Linear(4, 4), glue="where")  # its backward falls into the where trap
    with watch_nans(model) as watch:
        with pytest.raises(RuntimeError, match="shapes"):
            model(torch.ones(3, 5))  # the user's own error, inside the forward
        out = model(x)
        out.register_hook(lambda g: (_ for _ in ()).throw(ValueError("user hook")))
        with pytest.raises(ValueError, match="user hook"):
            out.sum().backward()  # a backward that dies before its end
        with pytest.raises(NonFiniteError) as info:
            model(x).sum().backward()
    assert (info.value.report.op, watch.reports[-1].step) == ("SqrtBackward0", 3)


def test_replay_does_not_advance_the_users_state(x):
    class Calls:  # e.g. a KV cache that each forward appends to
        n = 0

    class Stateful(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, calls: Calls) -> torch.Tensor:
            calls.n += 1
            return torch.log(self.fc(x))

    torch.manual_seed(0)
    calls = Calls()
    model = Stateful()
    with watch_nans(model, mode="warn") as watch:
        model(x, calls)
    assert watch.reports[0].op == "log"
    assert calls.n == 1  # the replay ran on a copy


def test_the_inspector_facade_watches_too(tiny_gpt2, tiny_ids):
    with torch.no_grad():
        tiny_gpt2.transformer.ln_f.weight[0] = math.inf
    insp = tle.inspect(tiny_gpt2, dims={"B": 2})
    with pytest.raises(tle.NonFiniteError) as info, insp.watch_nans():
        tiny_gpt2(tiny_ids)
    assert (info.value.report.module, info.value.report.op) == ("transformer.ln_f", "layer_norm")


# ---------------------------------------------------------------------------- hints match values
class MaskedScores(nn.Module):
    """Masked attention logits as a module output, filled with a huge finite value as
    Hugging Face (finfo.min), minGPT-style tutorials (-1e9) and others (-finfo.max) do."""

    def __init__(self, fill: str) -> None:
        super().__init__()
        self.fill = fill

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        T = q.shape[-2]
        big = {"-max": -torch.finfo(q.dtype).max, "min": torch.finfo(q.dtype).min,
               "-1e9": -1e9}[self.fill]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        return (q @ q.transpose(-2, -1)).masked_fill(~causal, big)  # (B, T, T)


class FillAttention(nn.Module):
    def __init__(self, fill: str) -> None:
        super().__init__()
        self.qk = nn.Linear(4, 4)
        self.scores = MaskedScores(fill)
        self.out = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        att = F.softmax(self.scores(self.qk(x)), dim=-1)
        return self.out(att @ x)


@pytest.mark.parametrize("fill", ["-max", "min", "-1e9"])
@pytest.mark.parametrize("train", [True, False])
def test_huge_finite_mask_fills_are_not_alarms(fill, train):
    # a float32 sum of two -finfo.max entries overflows to -inf: no element is non-finite
    torch.manual_seed(0)
    model = FillAttention(fill).train(train)
    x = torch.randn(2, 6, 4)
    with watch_nans(model) as watch:
        for _ in range(2):
            model(x).sum().backward()
    assert watch.reports == []


class FirstCallNaN(nn.Module):
    """NaN on the first call only: the replay (a second call) cannot make it again."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * (math.nan if self.calls == 1 else 1.0)


def test_a_nan_the_replay_cannot_make_again_is_reported_without_a_producer(x):
    model = nn.Sequential(nn.Linear(4, 4), FirstCallNaN())
    with pytest.raises(NonFiniteError) as info, watch_nans(model):
        model(x)
    r = info.value.report
    assert (r.phase, r.module, r.op, r.cause) == ("forward", "1", "", "not_reproduced")
    assert r.summary().startswith("NaN seen in forward (module '1') at ")
    assert r.summary().endswith(", producer not found")
    assert r.hint.startswith("not reproduced: the check after the step found NaN in '1'")
    assert "did not make it again" in r.hint


def _scaled_qk_gpt2(impl: str) -> GPT2:
    torch.manual_seed(0)
    model = GPT2(GPT2Config.preset("tiny", attn_impl=impl)).eval()
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight.mul_(1e30)  # q, k huge but finite
    return model


@pytest.mark.parametrize("impl", ["explicit", "sdpa"])
def test_attention_overflow_is_named_overflow_on_both_paths(impl, tiny_ids):
    model = _scaled_qk_gpt2(impl)
    with pytest.raises(NonFiniteError) as info, watch_nans(model):
        model(tiny_ids)
    r = info.value.report
    assert r.module == "transformer.h.0.attn"
    assert r.op == {"explicit": "matmul", "sdpa": "scaled_dot_product_attention"}[impl]
    assert r.cause == "overflow"
    assert r.hint.startswith("overflow past the dtype's largest value: finite inputs")
    assert "float32 holds at most 3.40282e+38" in r.hint
    assert "masked" not in r.hint and "log/sqrt" not in r.hint


@pytest.mark.parametrize("additive", [False, True])
def test_sdpa_facts_tell_a_fully_masked_row_from_an_overflow(additive):
    # torch 2.13's CPU kernels return 0 for a fully masked row; other kernels make NaN, and
    # then the scores and the mask, not the op's name, decide the hint
    from torchlens_edu.nans.causes import forward_cause, row_facts

    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    mask = torch.ones(3, 3, dtype=torch.bool).tril()
    mask[1] = False  # query 1 may look nowhere
    if additive:
        mask = torch.zeros(3, 3).masked_fill(~mask, -math.inf)
    out = [_summary("output 0", nan=4, lo=None, hi=None)]
    ins = [_summary("input 0", lo=-2.0, hi=2.0)]
    facts = row_facts("scaled_dot_product_attention", (q, k, k), {"attn_mask": mask})
    assert (facts.masked_row, facts.scores_overflow) == (True, False)
    cause, _ = forward_cause("scaled_dot_product_attention", ins, out, False, facts)
    assert cause == "masked_softmax"
    facts = row_facts("scaled_dot_product_attention", (q * 1e30, k * 1e30, k),
                      {"is_causal": True})
    assert (facts.masked_row, facts.scores_overflow) == (False, True)
    cause, detail = forward_cause("scaled_dot_product_attention", ins, out, False, facts)
    assert cause == "overflow" and "(its scores q @ k^T * scale)" in detail


class HalfSquare(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return (h * 300.0) ** 2  # @square


def test_fp16_overflow_of_a_power_is_named_overflow_not_log_sqrt():
    torch.manual_seed(0)
    model = HalfSquare().half()
    x = torch.randn(3, 4).half()
    r = producer(model, x, backward=False)
    assert (r["op"], r["kind"], r["cause"]) == ("pow", "+inf", "fp16_overflow")
    assert r["source"] == line_of("square")
    assert r["inputs"][0]["min"] < 0  # a negative base: no excuse for "log/sqrt of <= 0"
    assert r["hint"].startswith("fp16 overflow above 65504: finite inputs (up to ")
    assert "float16 holds at most 65504" in r["hint"]
    assert "log/sqrt" not in r["hint"]


class ExpBlow(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.exp(x * 1000.0)  # @exp


def test_float32_overflow_names_the_dtype_and_its_max(x):
    r = producer(ExpBlow(), x.abs() + 1, backward=False)
    assert (r["op"], r["kind"], r["cause"]) == ("exp", "+inf", "overflow")
    assert r["source"] == line_of("exp")
    assert r["hint"].startswith("overflow past the dtype's largest value: finite inputs")
    assert "float32 holds at most 3.40282e+38" in r["hint"]


def _summary(name: str, dtype: str = "float32", *, nan: int = 0, posinf: int = 0,
             neginf: int = 0, zeros: int = 0, lo: float | None = 1.0, hi: float | None = 2.0):
    from torchlens_edu.nans.report import TensorSummary

    return TensorSummary(name=name, shape="(4,)", dtype=dtype, nan=nan, posinf=posinf,
                         neginf=neginf, zeros=zeros, min=lo, max=hi)


@pytest.mark.parametrize(("op", "inp", "out", "cause"), [
    # log/sqrt only when the input was out of their domain
    ("log", dict(lo=-1.0), dict(nan=1), "log_sqrt"),
    ("log", dict(lo=0.0, zeros=1), dict(neginf=1), "log_sqrt"),
    ("sqrt", dict(lo=1.0, hi=3e38), dict(nan=1), "overflow"),
    ("rsqrt", dict(lo=0.0, zeros=2), dict(posinf=2), "log_sqrt"),
    ("pow", dict(lo=-5.0, hi=5e20), dict(posinf=1), "overflow"),
    ("pow", dict(lo=0.0, zeros=1), dict(posinf=1), "division"),
    # division only with a zero divisor
    ("div", dict(lo=1e-30, hi=1.0), dict(posinf=1), "overflow"),
    ("mul", dict(lo=-1e30, hi=1e30), dict(nan=1), "overflow"),
    ("softmax", dict(lo=-1.0, hi=1.0), dict(nan=1), "overflow"),
])
def test_a_hint_never_contradicts_the_values(op, inp, out, cause):
    from torchlens_edu.nans.causes import HINTS, forward_cause

    inputs = [_summary("a", **inp), _summary("b", lo=1e-30, hi=1.0)]
    got, detail = forward_cause(op, inputs, [_summary("out", **out)], False)
    assert got == cause, detail
    if cause in ("overflow", "fp16_overflow"):
        assert "float32 holds at most 3.40282e+38" in detail
    assert HINTS[got]


def test_a_backward_pow_overflow_in_fp16_is_overflow_not_log_sqrt():
    from torchlens_edu.nans.causes import backward_cause

    grad = _summary("grad of input 0", "float16", posinf=3, lo=None, hi=None)
    base = _summary("forward input 0", "float16", lo=100.0, hi=300.0)
    cause, detail = backward_cause("PowBackward0", "pow", False, [grad], [base])
    assert cause == "fp16_overflow" and "float16 holds at most 65504" in detail
    zero = _summary("forward input 0", "float16", lo=0.0, zeros=1)
    assert backward_cause("PowBackward0", "pow", False, [grad], [zero])[0] == "log_sqrt"


# ------------------------------------------------------------------------ cost of the cheap tier
def test_the_cheap_tier_adds_a_few_ops_per_step_whatever_the_depth(tiny_ids):
    from benchmarks.groups import watch_op_count

    extra = []
    for n_layer in (1, 2, 8):
        torch.manual_seed(0)
        model = GPT2(GPT2Config.preset("tiny", n_layer=n_layer)).train()
        plain, watched, _ = watch_op_count(model, tiny_ids)
        extra.append(watched - plain)
    assert extra[0] == extra[1] == extra[2] <= 16


@pytest.mark.slow
def test_gpt2_small_cheap_tier_adds_at_most_16_ops_and_holds_under_5_percent():
    from benchmarks.groups import watch_op_count

    torch.manual_seed(0)
    model = GPT2(GPT2Config.preset("gpt2")).train()
    ids = torch.randint(0, 50257, (1, 64), generator=torch.Generator().manual_seed(0))
    plain, watched, held = watch_op_count(model, ids)
    assert watched - plain <= 16
    assert held <= 0.05


@pytest.fixture
def small_batches(monkeypatch):
    """A check budget of a few KiB: batches are reduced many times within one step."""
    from torchlens_edu.nans import checks

    monkeypatch.setattr(checks, "_MIN_BUDGET", 0)
    held: list[int] = []
    add = checks.Batch.add

    def recording_add(batch, label, t, *args, **kwargs):
        add(batch, label, t, *args, **kwargs)
        held.append(batch._pending.bytes)
        assert batch._pending.bytes <= batch.budget  # over it: reduced at once

    monkeypatch.setattr(checks.Batch, "add", recording_add)
    return held


def test_faults_are_found_when_batches_are_reduced_midway(tiny_gpt2, tiny_ids, small_batches):
    from torchlens_edu.nans.checks import memory_budget

    assert memory_budget(tiny_gpt2) < 64 * 1024
    with torch.no_grad():
        tiny_gpt2.transformer.h[1].mlp.c_fc.weight[0, 0] = math.nan
    with pytest.raises(NonFiniteError) as info, watch_nans(tiny_gpt2), explicit_attention():
        tiny_gpt2(tiny_ids)
    assert (info.value.report.module, info.value.report.op) == ("transformer.h.1.mlp.c_fc",
                                                                "linear")
    assert small_batches and max(small_batches) < 64 * 1024


def test_a_backward_fault_is_found_when_batches_are_reduced_midway(x, small_batches):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(6)], Net(nn.Linear(4, 4), "where"),
                          nn.Linear(3, 3))
    r = producer(model, x)
    assert (r["phase"], r["module"], r["op"], r["kind"]) == ("backward", "6", "SqrtBackward0",
                                                             "nan")
    assert r["source"] == line_of("where")


def test_batch_kinds_are_exact_where_a_cpu_two_norm_overflows() -> None:
    """On CPU a batch is screened with the 2-norm: one that overflows on finite values (a
    ``-finfo.max`` mask, a huge activation) is re-checked exactly, never an alarm; a NaN or an
    Inf in any of the tensors is one, of its kind, whatever else shares the batch."""
    from torchlens_edu.nans.checks import Batch

    big = torch.finfo(torch.float32).max
    tensors = {
        "mask": torch.tensor([[0.0, -big], [-big, -big]]),  # 2-norm inf, every element finite
        "huge": torch.full((1000,), 1e20),  # squares overflow float32
        "fine": torch.randn(64),
        "minus inf": torch.tensor([1.0, -math.inf, big]),
        "nan": torch.tensor([big, math.nan, -math.inf]),
        "half": torch.tensor([60000.0, -60000.0], dtype=torch.float16),  # squares overflow
        "double": torch.tensor([1e300, -1e300], dtype=torch.float64),  # past float32's range
        "double nan": torch.tensor([1e300, math.nan], dtype=torch.float64),
    }
    batch: Batch[None] = Batch(budget=1 << 20)
    for label, t in tensors.items():
        batch.add(label, t)
    kinds = {r.label: r.kind for r in batch.read()}
    assert kinds == {"mask": None, "huge": None, "fine": None, "minus inf": "inf", "nan": "nan",
                     "half": None, "double": None, "double nan": "nan"}


# ----------------------------------------------------------------------------- tle.replaying()
def test_user_hooks_run_in_the_replay_and_can_tell(x):
    torch.manual_seed(0)
    model = Net(LogBlock())
    calls: list[bool] = []
    doubled = model.block.fc.register_forward_hook(lambda m, a, out: out * 2)  # changes values
    model.block.register_forward_hook(lambda m, a, out: calls.append(tle.replaying()))
    with pytest.raises(NonFiniteError) as info, watch_nans(model):
        model(x)
    assert calls == [False, True]  # run again by the replay, which says so
    doubled.remove()
    with torch.no_grad():
        plain_min = float(model.block.fc(x).min())
    assert info.value.report.inputs[0].min == pytest.approx(2 * plain_min)  # hook replayed
    assert tle.replaying() is False
    assert "replaying" in tle.__all__ and tle.replaying.__doc__


def test_a_backward_replay_says_so_to_tensor_hooks(x):
    class Where(nn.Module):
        def __init__(self, seen: list[bool]) -> None:
            super().__init__()
            self.fc, self.seen = nn.Linear(4, 4), seen

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            out = torch.where(h > 0, torch.sqrt(h), 0.0)
            out.register_hook(lambda g: self.seen.append(tle.replaying()))
            return out

    torch.manual_seed(0)
    seen: list[bool] = []
    r = producer(Where(seen), x)
    assert r["op"] == "SqrtBackward0"
    assert seen == [False, True]


def test_our_observers_do_not_record_the_replay(tiny_gpt2, tiny_ids):
    from torchlens_edu.capture import capture
    from torchlens_edu.shapes import ShapeTracer

    with torch.no_grad():
        tiny_gpt2.transformer.ln_f.weight[0] = math.nan
    with ShapeTracer(ops=True) as plain:
        tiny_gpt2(tiny_ids)
    indices: list[tuple[int, int]] = []
    with ShapeTracer(ops=True) as tracer, tle.hooks(tiny_gpt2) as h, \
            watch_nans(tiny_gpt2, mode="warn") as watch:
        h.forward("transformer.h.0", lambda c: indices.append((h.forwards, c.call)))
        tiny_gpt2(tiny_ids)
    assert watch.reports[0].module == "transformer.ln_f"
    assert indices == [(1, 0), (1, 0)]  # the replay ran the hook, numbered as the step
    assert h.forwards == 1
    assert [(e.kind, e.path, e.name) for e in tracer.trace.events] == [
        (e.kind, e.path, e.name) for e in plain.trace.events]
    with capture(tiny_gpt2, "transformer.h.*") as cache, watch_nans(tiny_gpt2, mode="warn"):
        tiny_gpt2(tiny_ids)
    assert cache.forwards == 1 and {call for _, call in cache} == {0}  # recorded once
    assert torch.equal(cache["transformer.h.1"], tiny_gpt2.transformer.h[1](
        cache["transformer.h.0"]))


# ----------------------------------------------------------------------------- narrow terminals
def _wide_report():
    from torchlens_edu.nans.report import NonFiniteReport, TensorSummary

    def s(name: str, shape: str, nan: int, lo: float, hi: float) -> TensorSummary:
        return TensorSummary(name=name, shape=shape, dtype="float32", nan=nan, posinf=0,
                             neginf=0, zeros=0, min=lo, max=hi)

    return NonFiniteReport(
        phase="forward", module="transformer.h.11.mlp.c_fc", op="linear", kind="nan",
        source=line_of("log"), cause="exploding", step=3,
        hint="exploding values/learning rate: parameter transformer.h.11.mlp.c_fc.weight "
             "already held nan before 'linear' used it",
        inputs=[s("input 0", "(B=2, T=8, C=768)", 0, -4.673, 4.673),
                s("parameter transformer.h.11.mlp.c_fc.weight", "(4C=3072, C=768)", 1,
                  -0.08512, 0.09234)],
        outputs=[s("output 0", "(B=2, T=8, 4C=3072)", 16, -12.34567, 1.2e-05)],
        params=[s("transformer.h.11.mlp.c_fc.bias", "(4C=3072)", 0, -0.0123, 0.0234)])


@pytest.mark.parametrize("width", [60, 80, 120])
def test_the_report_fits_the_terminal_with_every_number_whole(width):
    import io
    import re

    from rich.console import Console

    report = _wide_report()
    console = Console(width=width, file=io.StringIO(), no_color=True, color_system=None)
    console.print(report)
    text = console.file.getvalue()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width
    assert "NaN made in forward: linear" in lines[0]  # the title, whole
    tokens = set(re.findall(r"[-+]?\d[\w.+-]*", text))
    for s in [*report.inputs, *report.outputs, *report.params]:
        assert {f"{s.min:.4g}", f"{s.max:.4g}", str(s.nan)} <= tokens, s.name
        # a name on one line: whole, or cut from the left with an ellipsis
        name = f"param {s.name}" if s in report.params else s.name
        cuts = [re.search(r"…([\w.]+)", line) for line in lines]
        assert any(name in line or (cut is not None and name.endswith(cut.group(1)))
                   for line, cut in zip(lines, cuts, strict=True)), name
    weight = next(line for line in lines if "c_fc.weight" in line and "hint" not in line)
    assert "transformer.h.11.mlp.c_fc.weight" in weight or "…" in weight
    assert ("tensor" in text and "shape" in text) == (width >= 100)  # a table only if it fits
    assert "min/max over the finite values" in text
    assert "hint: exploding values/learning rate" in text


def test_threads_each_watch_their_own_forwards(tiny_gpt2) -> None:
    """Issue 16.5, for the NaN watch: four threads watching one model mixed up each other's
    steps (IndexError, zip() length errors)."""

    def work(i: int) -> None:
        ids = torch.full((1, 3 + i), i)
        for _ in range(10):
            with watch_nans(tiny_gpt2) as watch:
                torch.autograd.grad(tiny_gpt2(ids).sum(), tiny_gpt2.transformer.wte.weight)
            assert watch.reports == []

    errors = in_threads(work)
    assert errors == []
    assert not tiny_gpt2._forward_hooks and not tiny_gpt2._forward_pre_hooks
