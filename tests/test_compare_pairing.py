"""compare: ops paired by what they compute (an explicit attention against SDPA, nn.Linear
against Hugging Face's Conv1D, a written-out GELU or LayerNorm against the fused ones), and the
blamed op's operands with named dims."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchlens_edu as tle
from tests.support import learner_gpt, source_lines
from tests.support.learner_gpt import LearnerConfig, LearnerGPT, bug_line, pair
from torchlens_edu._core.console import render_text


def line_of(text: str, module: object = learner_gpt) -> str:
    """``file.py:LINE`` of the first line of ``module``'s file that contains ``text``."""
    return source_lines.line_of(text, module.__file__)  # type: ignore[attr-defined]


@pytest.fixture
def idx() -> torch.Tensor:
    return torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))


SDPA_LINE = line_of("return attend(q, k, v, is_causal=True)  # (B, nh, T, hs)")


# -- 1. the blamed op's operands, with named dims ------------------------------------------

def test_operands_and_outputs_are_named_with_named_dims_on_both_sides(idx: torch.Tensor) -> None:
    model, reference = pair("softmax_axis")
    result = tle.compare(model, reference, idx)
    first = result.first
    assert first is not None
    rows = {row.role: row for row in first.operands}
    assert (rows["in 0"].name, rows["in 0"].reference_name, rows["in 0"].status) == (
        "scores", "scores", "same")
    assert (rows["out"].name, rows["out"].reference_name, rows["out"].status) == (
        "att", "att", "differs")
    assert rows["out"].shape == (2, 4, 6, 6) and rows["out"].max_abs == first.max_abs
    text = render_text(result, width=80)
    assert "  in 0  scores (B=2, nh=4, T=6, T=6)  scores     same" in text
    assert "  out   att (B=2, nh=4, T=6, T=6)     att        differs, max abs " in text
    b, nh, t, s = first.worst_index  # type: ignore[misc]
    assert f"  worst at   B={b}, nh={nh}, T={t}, T={s}   (index {first.worst_index})" in text
    assert "  inputs     agreed" in text
    assert all(len(line) <= 80 for line in text.splitlines())


def test_a_weight_operand_is_named_by_its_parameter_and_already_differed(
        idx: torch.Tensor) -> None:
    model, reference = pair("")
    with torch.no_grad():
        model.transformer.h[0].attn.c_proj.weight.copy_(
            reference.transformer.h[0].attn.c_proj.weight.T)
    first = tle.compare(model, reference, idx).first
    assert first is not None and first.inputs_differed
    weight = next(row for row in first.operands if row.role == "in 1")
    assert weight.name == "transformer.h.0.attn.c_proj.weight"
    assert (weight.shape, weight.status) == ((32, 32), "differs")
    assert next(row for row in first.operands if row.role == "in 0").name == "y"


def test_to_dict_documents_operands_worst_at_and_dims(idx: torch.Tensor) -> None:
    model, reference = pair("softmax_axis")
    data = tle.compare(model, reference, idx).to_dict()
    json.dumps(data)
    assert set(data) == {"agree", "alignment", "aligned_modules", "rtol", "atol", "first",
                         "modules", "gradients", "loss", "dims", "notes"}
    assert data["dims"]["nh"] == 4 and data["dims"]["T"] == 6 and data["loss"] is None
    first = data["first"]
    b, nh, t, s = first["worst_index"]
    assert first["worst_at"] == f"B={b}, nh={nh}, T={t}, T={s}"
    assert first["inputs_differed"] is False
    assert first["operands"][0] == {
        "role": "in 0", "name": "scores", "shape": [2, 4, 6, 6], "dtype": "float32",
        "reference_name": "scores", "reference_shape": [2, 4, 6, 6], "max_abs": 0.0,
        "status": "same"}
    assert [row["role"] for row in first["operands"]] == ["in 0", "out"]


def test_rendering_without_color(idx: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    model, reference = pair("no_scale")
    text = render_text(tle.compare(model, reference, idx), width=80)
    assert "\x1b[" not in text
    assert "  in 0  scores (B=2, nh=4, T=6, T=6)  scores     differs, max abs 2.79e+00" in text


# -- 3. an explicit attention against SDPA, both ways ---------------------------------------

@pytest.mark.parametrize(("bug", "op"), [("softmax_axis", "softmax"),
                                         ("mask_off_by_one", "tril")])
def test_a_bug_in_an_explicit_attention_against_an_sdpa_reference(
        idx: torch.Tensor, bug: str, op: str) -> None:
    model, reference = pair(bug, reference_attn="sdpa")
    result = tle.compare(model, reference, idx)
    first = result.first
    assert first is not None
    assert (first.kind, first.module, first.op) == ("op", "transformer.h.0.attn", op)
    assert first.source == bug_line(bug)
    assert (first.reference_op, first.reference_source) == ("scaled_dot_product_attention",
                                                            SDPA_LINE)
    assert first.detail.startswith(f"`{op}` at {bug_line(bug)}: its inputs agree and its "
                                   f"output does not (the reference's "
                                   f"`scaled_dot_product_attention` (its step")


def test_a_missing_scale_against_an_sdpa_reference(idx: torch.Tensor) -> None:
    model, reference = pair("no_scale", reference_attn="sdpa")
    first = tle.compare(model, reference, idx).first
    assert first is not None and first.kind == "missing-op"
    assert first.source == bug_line("no_scale")
    assert first.detail == ("your model skips `scaled_dot_product_attention` (its step "
                            f"`q @ kᵀ * scale`), which the reference does at {SDPA_LINE}")


@pytest.mark.parametrize(("bug", "skipped", "reference_line"), [
    ("sdpa_not_causal", "masked_fill", "scores = scores.masked_fill(~mask"),
    ("sdpa_scale", "div", "/ math.sqrt(hs)"),
])
def test_a_bug_in_an_sdpa_call_against_an_explicit_reference(
        idx: torch.Tensor, bug: str, skipped: str, reference_line: str) -> None:
    model, reference = pair(bug, attn="sdpa")
    first = tle.compare(model, reference, idx).first
    assert first is not None
    assert (first.kind, first.module) == ("missing-op", "transformer.h.0.attn")
    assert first.op == "scaled_dot_product_attention"
    assert first.source == bug_line(bug)
    assert (first.reference_op, first.reference_source) == (skipped, line_of(reference_line))
    assert first.detail == (f"your model skips `{skipped}`, which the reference does at "
                            f"{line_of(reference_line)}")


@pytest.mark.parametrize(("attn", "reference_attn"), [("explicit", "sdpa"),
                                                      ("sdpa", "explicit")])
def test_explicit_and_sdpa_attention_agree(idx: torch.Tensor, attn: str,
                                           reference_attn: str) -> None:
    model, reference = pair("", attn=attn, reference_attn=reference_attn)
    assert tle.compare(model, reference, idx).agree


# -- 3. nn.Linear against Hugging Face's Conv1D ---------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize(("bug", "op"), [("softmax_axis", "softmax"), ("no_scale", "matmul")])
def test_a_linear_model_against_hugging_face_conv1d(idx: torch.Tensor, implementation: str,
                                                    bug: str, op: str) -> None:
    transformers = pytest.importorskip("transformers")
    config = LearnerConfig(dropout=0.0)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.n_positions, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, use_cache=False, bos_token_id=0,
        eos_token_id=0, attn_implementation=implementation,
        initializer_range=0.2)).eval()  # weights large enough that a lost scale shows
    mine = LearnerGPT(config).eval()
    assert tle.copy_weights(hf, mine).transposed  # Conv1D's (in, out) weights
    assert tle.compare(mine, hf, idx).agree
    mine.bug = bug
    for module in mine.modules():
        if hasattr(module, "bug"):
            module.bug = bug
    first = tle.compare(mine, hf, idx).first
    assert first is not None and first.module == "transformer.h.0.attn"
    assert first.source == bug_line(bug)
    if bug == "softmax_axis":
        assert (first.kind, first.op) == ("op", "softmax")
        assert "its inputs agree and its output does not" in first.detail
    else:
        assert first.kind == "missing-op"
        assert "your model skips" in first.detail


# -- 3. a written-out GELU and LayerNorm against the fused ones -----------------------------

class _Fused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln, self.fc, self.proj = nn.LayerNorm(8), nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(F.layer_norm(x, (8,), self.ln.weight, self.ln.bias))  # (B, T, 4C)
        return self.proj(F.gelu(h, approximate="tanh"))


class _WrittenOut(_Fused):
    def __init__(self, bug: str = "") -> None:
        super().__init__()
        self.bug = bug

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)  # (B, T, 1)
        var = x.var(-1, keepdim=True, unbiased=self.bug == "unbiased")  # (B, T, 1)
        h = (x - mean) / torch.sqrt(var + 1e-5) * self.ln.weight + self.ln.bias  # (B, T, C)
        h = self.fc(h)  # (B, T, 4C)
        c = 0.44715 if self.bug == "gelu_constant" else 0.044715
        h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + c * h ** 3)))  # GELU
        return self.proj(h)


@pytest.mark.parametrize(("bug", "op", "line", "fused", "step", "fused_line"), [
    ("unbiased", "var", "var = x.var(-1, keepdim=True", "layer_norm", "var of x (biased)",
     "F.layer_norm(x"),
    ("gelu_constant", "mul", "# GELU", "gelu", "0.044715 * x ** 3", "return self.proj(F.gelu"),
])
def test_a_written_out_gelu_and_layernorm_against_the_fused_ops(
        bug: str, op: str, line: str, fused: str, step: str, fused_line: str) -> None:
    this = sys.modules[__name__]
    torch.manual_seed(0)
    reference, x = _Fused(), torch.randn(2, 5, 8)
    model = _WrittenOut()
    model.load_state_dict(reference.state_dict())
    assert tle.compare(model, reference, x).agree
    model.bug = bug
    first = tle.compare(model, reference, x).first
    assert first is not None
    assert (first.kind, first.op) == ("op", op)
    assert first.source == line_of(line, this)
    assert first.detail == (f"`{op}` at {line_of(line, this)}: its inputs agree and its output "
                            f"does not (the reference's `{fused}` (its step `{step}`) at "
                            f"{line_of(fused_line, this)})")
