"""compare, copy_weights: planted bugs in a learner's GPT, each found at its op and line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torchlens_edu as tle
from tests.support import learner_gpt, source_lines
from tests.support.learner_gpt import LearnerConfig, LearnerGPT, bug_line, pair
from torchlens_edu.divergence import WeightsMismatchError


def line_of(text: str) -> str:
    """``learner_gpt.py:LINE`` of the first line of learner_gpt.py that contains ``text``."""
    return source_lines.line_of(text, learner_gpt.__file__)


@pytest.fixture
def idx() -> torch.Tensor:
    return torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))


def test_identical_models_agree(idx: torch.Tensor) -> None:
    model, reference = pair("")
    result = tle.compare(model, reference, idx)
    assert result.first is None and result.agree
    assert result.alignment == "path"
    assert "the models agree within the tolerance" in str(result)


@pytest.mark.parametrize(("bug", "module", "op"), [
    ("mask_off_by_one", "transformer.h.0.attn", "tril"),
    ("softmax_axis", "transformer.h.0.attn", "softmax"),
    ("dropout_active", "transformer.h.0.attn", "dropout"),
])
def test_the_op_that_made_the_difference_is_named_with_its_line(
        idx: torch.Tensor, bug: str, module: str, op: str) -> None:
    model, reference = pair(bug)
    first = tle.compare(model, reference, idx).first
    assert first is not None
    assert (first.kind, first.module, first.op) == ("op", module, op)
    assert first.source == bug_line(bug)
    assert not first.inputs_differed
    assert f"`{op}` at {bug_line(bug)}: its inputs agree and its output does not" == first.detail


def test_a_missing_attention_scale_is_blamed_on_its_line(idx: torch.Tensor) -> None:
    model, reference = pair("no_scale")
    result = tle.compare(model, reference, idx)
    first = result.first
    assert first is not None and first.kind == "missing-op"
    assert first.module == "transformer.h.0.attn"
    assert first.source == bug_line("no_scale")  # the line that lost its `/ sqrt(hs)`
    assert first.reference_op == "div"
    assert first.reference_source == line_of("/ math.sqrt(hs)")
    text = str(result)
    assert "first difference: transformer.h.0.attn (missing-op)" in text
    assert f"your model skips `div`, which the reference does at {line_of('/ math.sqrt(hs)')}" \
        in text


def test_position_embeddings_not_added(idx: torch.Tensor) -> None:
    model, reference = pair("no_positions")
    first = tle.compare(model, reference, idx).first
    assert first is not None
    assert (first.kind, first.module, first.reference_op) == ("missing-op", "", "add")
    assert first.source == bug_line("no_positions")
    assert first.reference_source == line_of("drop(tok_emb + pos_emb)")


def test_layernorm_eps_changed(idx: torch.Tensor) -> None:
    model, reference = pair("layernorm_eps")
    first = tle.compare(model, reference, idx).first
    assert first is not None
    assert (first.kind, first.module, first.op) == ("op", "transformer.h.0.ln_1", "layer_norm")
    assert first.source == line_of("# ln_1 runs here")


def test_tanh_against_erf_gelu_is_drift_not_a_bug(idx: torch.Tensor) -> None:
    model, reference = pair("erf_gelu")
    result = tle.compare(model, reference, idx)
    assert result.first is None
    assert any(row.status == "drift" for row in result.modules)
    assert {row.status for row in result.modules} <= {"same", "drift"}
    assert "drift (legal, within the tolerance)" in str(result)
    strict = tle.compare(model, reference, idx, rtol=1.3e-6, atol=1e-5).first
    assert strict is not None and (strict.op, strict.source) == ("gelu", bug_line("erf_gelu"))


def test_a_weight_loaded_without_its_transpose(idx: torch.Tensor) -> None:
    model, reference = pair("")
    with torch.no_grad():
        model.transformer.h[0].attn.c_proj.weight.copy_(reference.transformer.h[0].attn.c_proj.weight.T)
    first = tle.compare(model, reference, idx).first
    assert first is not None
    assert (first.kind, first.module, first.op) == ("weights", "transformer.h.0.attn.c_proj",
                                                   "linear")
    assert first.source == line_of("return self.c_proj(y)")
    assert "parameter `transformer.h.0.attn.c_proj.weight`" in first.detail


def test_last_position_only_logits_are_a_shape_difference(idx: torch.Tensor) -> None:
    model, reference = pair("last_only")
    result = tle.compare(model, reference, idx)
    first = result.first
    assert first is not None
    assert (first.kind, first.module, first.op) == ("extra-op", "", "[]")
    assert first.source == bug_line("last_only")
    assert (first.shape, first.reference_shape) == ((2, 1, 64), (2, 6, 64))
    assert "where the reference has (B=2, T=6, V=64)" in str(result)


def test_a_logits_loss_tuple_aligns_with_bare_logits(idx: torch.Tensor) -> None:
    model, reference = pair("tuple_output")
    assert tle.compare(model, reference, idx, idx).agree


class _Renamed(nn.Module):
    """The learner's GPT, with every module named differently."""

    def __init__(self, config: LearnerConfig) -> None:
        super().__init__()
        source = LearnerGPT(config)
        self.tokens, self.positions = source.transformer.wte, source.transformer.wpe
        self.layers = source.transformer.h
        self.norm, self.head = source.transformer.ln_f, source.lm_head

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tokens(idx) + self.positions(torch.arange(idx.shape[1]))
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


NAMES = {"transformer.wte": "tokens", "transformer.wpe": "positions", "transformer.h": "layers",
         "transformer.ln_f": "norm", "lm_head": "head"}


def test_a_clean_copy_with_other_names_aligns_by_structure(idx: torch.Tensor) -> None:
    _, reference = pair("")
    renamed = _Renamed(LearnerConfig()).eval()
    report = tle.copy_weights(reference, renamed, map=NAMES)
    assert report.ok and len(report.copied) == len(renamed.state_dict())
    result = tle.compare(renamed, reference, idx)
    assert result.agree and result.alignment == "structure"
    assert "by structure (the order of module calls and their shapes)" in str(result)
    from torchlens_edu._core.console import render_text
    from torchlens_edu.divergence.result import _table

    table = render_text(_table("module", "reference", result.modules), width=120)
    assert "┃ module " in table and "┃ reference" in table  # other paths: both columns
    assert tle.compare(renamed, reference, idx, map=NAMES).alignment == "map"


class HalfGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()  # HalfGradient's forward

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad / 2  # the bug: only the backward is wrong


def test_backward_names_the_op_whose_backward_differs() -> None:
    class Buggy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return HalfGradient.apply(x)

    class Fine(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.clone()  # Fine's forward

    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(4, 4), Fine(), nn.Linear(4, 2))
    model = nn.Sequential(nn.Linear(4, 4), Buggy(), nn.Linear(4, 2))
    model.load_state_dict(reference.state_dict())
    x = torch.randn(3, 4)
    assert tle.compare(model, reference, x).agree  # the forward agrees
    result = tle.compare(model, reference, x, backward=True)
    first = result.first
    here = os.path.basename(__file__)
    assert first is not None and (first.kind, first.module, first.op) == ("gradient", "1", "clone")
    assert (first.source, first.reference_source) == (line_of_here("HalfGradient's forward"),
                                                      line_of_here("Fine's forward"))
    assert first.detail == (
        f"the backward of `clone` at {first.source} (its backward is HalfGradient.backward at "
        f"{here}:{line_of_here('def backward').split(':')[1]}): the gradient reaching its output "
        f"agrees with the reference's, the gradient of `x` does not")
    assert [(row.role, row.status) for row in first.operands] == [("grad of out", "same"),
                                                                 ("grad of in 0", "differs")]
    assert [row.status for row in result.gradients][:2] == ["same", "same"]  # 2.bias, 2.weight
    assert [row.module for row in result.gradients if row.status == "differs"] == ["0.bias",
                                                                          "0.weight"]
    assert result.loss is not None and result.loss.startswith("sum(output * R), R a fixed")
    assert f"gradients of: {result.loss[:20]}" in str(result)
    assert not any(p.grad is not None for p in model.parameters())  # .grad left alone


def line_of_here(text: str) -> str:
    """``test_compare.py:LINE`` of the first line of this file that contains ``text``."""
    return source_lines.line_of(text, __file__)


def test_backward_names_a_detach_that_cuts_the_residual(idx: torch.Tensor) -> None:
    model, reference = pair("detach_residual")
    assert tle.compare(model, reference, idx).agree
    result = tle.compare(model, reference, idx, backward=True)
    first = result.first
    assert first is not None
    assert (first.kind, first.module, first.op) == ("gradient", "transformer.h.1", "detach")
    assert first.source == bug_line("detach_residual")
    assert first.detail == (
        f"`detach` at {bug_line('detach_residual')} cuts the gradient (its result does not "
        f"require grad: a detach(), .data or torch.no_grad()); the reference's gradient flows "
        f"back to `x` there")
    assert result.loss == ("next-token cross-entropy of the logits (B, T, V) against the input "
                           "ids shifted by one")
    text = str(result)
    assert "  forward    agreed" in text and "first difference: transformer.h.1 (gradient)" in text


def test_backward_uses_the_models_own_loss_when_both_return_one(idx: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = LearnerGPT(LearnerConfig(), bug="tuple_output").eval()
    reference = LearnerGPT(LearnerConfig(), bug="tuple_output").eval()
    reference.load_state_dict(model.state_dict())
    result = tle.compare(model, reference, idx, idx, backward=True)
    assert result.agree and result.loss == "the models' own loss (the loss in their outputs)"
    assert result.to_dict()["loss"] == result.loss
    # against bare logits: the next-token loss of both sides' logits
    assert tle.compare(model, pair("")[1], idx, idx, backward=True).loss.startswith(
        "next-token cross-entropy")


def test_the_next_token_loss_is_the_language_model_loss(idx: torch.Tensor) -> None:
    from torchlens_edu.divergence.loss import choose_loss

    logits = torch.randn(2, 6, 64, requires_grad=True)
    loss = choose_loss(logits, logits, (idx,))
    assert loss is not None
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 64), idx[:, 1:].reshape(-1))
    assert torch.allclose(loss.of(logits), expected)
    assert choose_loss(torch.ones(2), torch.ones(2), (torch.ones(2),)) is None  # no graph


@pytest.mark.slow
def test_bundled_gpt2_agrees_with_hugging_face_after_copy_weights() -> None:
    transformers = pytest.importorskip("transformers")
    from torchlens_edu.models import GPT2, GPT2Config

    config = GPT2Config.preset("tiny")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.n_positions, n_embd=config.n_embd,
        n_layer=config.n_layer, n_head=config.n_head, use_cache=False, bos_token_id=0,
        eos_token_id=0)).eval()
    mine = GPT2(config).eval()
    report = tle.copy_weights(hf, mine)
    assert report.ok and len(report.transposed) == 4 * config.n_layer  # the Conv1D weights
    idx = torch.randint(0, config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    result = tle.compare(mine, hf, idx, backward=True)
    assert result.agree, str(result)
    assert result.alignment == "path" and result.gradients


def test_copy_weights_reports_every_key_that_does_not_fit_and_copies_nothing() -> None:
    src = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 3))
    dst = nn.Sequential(nn.Linear(3, 2), nn.Linear(3, 3), nn.LayerNorm(3))
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(WeightsMismatchError) as raised:
        tle.copy_weights(src, dst, transpose=False)
    message = str(raised.value)
    assert "these keys do not fit (nothing was copied)" in message
    assert "missing" in message and "2.weight" in message
    assert "shape" in message and "(3, 2) -> (2, 3)" in message
    assert isinstance(raised.value, ValueError)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())
    unexpected = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 3), nn.Linear(3, 1))
    with pytest.raises(WeightsMismatchError, match="unexpected"):
        tle.copy_weights(unexpected, nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 3)))


def test_copy_weights_splits_a_fused_projection() -> None:
    fused = nn.ModuleDict({"c_attn": nn.Linear(4, 12)})
    split = nn.ModuleDict({name: nn.Linear(4, 4) for name in ("q", "k", "v")})
    tle.copy_weights(fused, split, map={"c_attn": ["q", "k", "v"]})
    assert torch.equal(split["k"].weight, fused["c_attn"].weight[4:8])


def test_fused_against_split_projections_compare_by_map() -> None:
    class Fused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c_attn = nn.Linear(4, 12)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q, k, v = self.c_attn(x).split(4, dim=-1)
            return F.softmax(q @ k.transpose(-2, -1), dim=-1) @ v

    class Split(nn.Module):
        def __init__(self, axis: int = -1) -> None:
            super().__init__()
            self.q, self.k, self.v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
            self.axis = axis

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            att = F.softmax(self.q(x) @ self.k(x).transpose(-2, -1), dim=self.axis)
            return att @ self.v(x)

    torch.manual_seed(0)
    reference, x = Fused(), torch.randn(1, 5, 4)
    parts = {"c_attn": ["q", "k", "v"]}
    for model, agree in ((Split(), True), (Split(axis=-2), False)):
        tle.copy_weights(reference, model, map=parts)
        result = tle.compare(model, reference, x, map=parts)
        assert result.alignment == "map" and result.agree is agree
        assert ("c_attn" in [row.reference_module for row in result.modules])


def test_to_dict_follows_the_documented_schema(idx: torch.Tensor) -> None:
    model, reference = pair("softmax_axis")
    data = tle.compare(model, reference, idx).to_dict()
    json.dumps(data)
    assert set(data) == {"agree", "alignment", "aligned_modules", "rtol", "atol", "first",
                         "modules", "gradients", "loss", "dims", "notes"}
    assert data["first"]["source"] == bug_line("softmax_axis")
    assert data["first"]["shape"] == [2, 4, 6, 6]  # the softmax's (B, nh, T, T)
    assert set(data["modules"][0]) == {"module", "reference_module", "max_abs", "max_rel",
                                       "status"}


def test_rendering_in_jupyter_and_at_80_columns(idx: torch.Tensor) -> None:
    model, reference = pair("softmax_axis")
    result = tle.compare(model, reference, idx)
    assert "first difference" in result._repr_html_()
    from torchlens_edu._core.console import render_text

    text = render_text(result, width=80)
    assert all(len(line) <= 80 for line in text.splitlines())
    # the same paths on both sides: one column, so that paths are not cut in the middle
    assert "┃ module (same path in both)" in text and "┃ reference" not in text
    assert all(row.module in text for row in result.modules[:4])


def test_compare_restores_the_rng_and_the_models(idx: torch.Tensor) -> None:
    model, reference = pair("dropout_active")
    state = torch.get_rng_state()
    hooks = [m._forward_hooks.copy() for m in model.modules()]
    tle.compare(model, reference, idx)
    assert torch.equal(torch.get_rng_state(), state)
    assert [m._forward_hooks for m in model.modules()] == hooks
    assert not model.training and not reference.training


def test_compare_says_what_to_pass_when_it_is_not_given_models() -> None:
    with pytest.raises(TypeError, match=r"both models must be nn\.Modules, got function"):
        tle.compare(lambda x: x, nn.Linear(2, 2), torch.ones(1, 2))


def test_compare_is_exported() -> None:
    assert {"compare", "copy_weights", "Comparison"} <= set(tle.__all__)
    assert isinstance(tle.compare(nn.Identity(), nn.Identity(), torch.ones(1)), tle.Comparison)
    assert os.path.basename(tle.compare.__code__.co_filename) == "run.py"


def test_outputs_without_tensors_cannot_be_aligned() -> None:
    class Nothing(nn.Module):
        def forward(self, x: torch.Tensor) -> None:
            return None

    with pytest.raises(ValueError, match="the outputs cannot be aligned: the model returned "
                                         "NoneType, with no tensor in it"):
        tle.compare(Nothing(), nn.Identity(), torch.ones(2))


# -- the command line ------------------------------------------------------------------------

def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from torchlens_edu.cli import main

    code = main(["compare", *argv])
    out, err = capsys.readouterr()
    return code, out, " ".join(err.split())


FACTORY = '''
def make(config):
    return LearnerGPT(LearnerConfig(vocab_size=config.vocab_size, n_embd=config.n_embd,
                                    n_positions=config.n_positions, n_head=config.n_head,
                                    n_layer=config.n_layer, dropout=0.0), bug="softmax_axis")
'''


@pytest.mark.slow
def test_cli_builds_copies_and_reports(tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _cli(capsys, f"{learner_gpt.__file__}:LearnerGPT", "--ref", "embedded")
    assert (code, err) == (0, "")
    assert "the models agree within the tolerance" in out
    mine = tmp_path / "my_gpt.py"
    mine.write_text(Path(learner_gpt.__file__).read_text() + FACTORY)
    code, out, err = _cli(capsys, f"{mine}:make", "--prompt", "Hello world")
    assert code == 1, err
    assert "first difference: transformer.h.0.attn (op)" in out
    assert f"softmax   at my_gpt.py:{bug_line('softmax_axis').split(':')[1]}" in out


@pytest.mark.parametrize(("content", "target", "message"), [
    (None, "nowhere.py:GPT", "nowhere.py: no such file"),
    ("", "{file}", "expected FILE.py:NAME (e.g. my_gpt.py:GPT), got"),
    ("import torch\ndef f(:\n", "{file}:GPT", "does not import: SyntaxError: invalid syntax "
                                             "(my_gpt.py:2)"),
    ("x = 1\nraise RuntimeError('boom')\n", "{file}:GPT",
     "does not import: RuntimeError: boom (my_gpt.py:2)"),
    ("class GPT:\n    pass\n", "{file}:GTP", "has no 'GTP'; did you mean 'GPT'?"),
    ("class GPT:\n    def __init__(self):\n        pass\n", "{file}:GPT",
     "did not build from the reference's config (TypeError:"),
    ("import torch\nclass GPT(torch.nn.Module):\n    def __init__(self, config):\n"
     "        super().__init__()\n", "{file}:GPT", "these keys do not fit (nothing was copied)"),
])
def test_cli_errors_are_one_clear_message(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str],
                                          content: str | None, target: str, message: str) -> None:
    file = tmp_path / "my_gpt.py"
    if content is not None:
        file.write_text(content)
    code, out, err = _cli(capsys, target.format(file=file), "--ref", "embedded")
    assert code in (1, 2) and out == ""
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err


def test_backward_says_when_the_reference_ties_weights_the_model_keeps_apart() -> None:
    class Tiny(nn.Module):
        def __init__(self, tie: bool) -> None:
            super().__init__()
            self.emb, self.head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
            if tie:
                self.head.weight = self.emb.weight

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.head(self.emb(idx))  # (B, T, V)

    torch.manual_seed(0)
    reference, model = Tiny(tie=True), Tiny(tie=False)
    tle.copy_weights(reference, model)
    model.head.weight.data.copy_(reference.emb.weight.data)
    result = tle.compare(model, reference, torch.tensor([[1, 2, 3]]), backward=True)
    assert result.first is not None and result.first.kind == "gradient"
    assert ("the reference ties `emb.weight` and `head.weight` (one tensor, whose gradient sums "
            "every use); your model keeps them apart, so their gradients differ even where each "
            "use is right") in result.notes
