"""When the forward raises, the trace explains it and re-raises the original exception."""

from __future__ import annotations

import math
import traceback

import pytest
import torch
import torch.nn as nn

from torchlens_edu.shapes import explain as _shape_errors
from torchlens_edu.shapes import trace_shapes


def _note(exc: BaseException) -> str:
    return "\n".join(getattr(exc, "__notes__", []))


class WrongTranspose(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(32, 96)

    def forward(self, x):
        B, T, C = x.shape
        q, k, _v = self.qkv(x).split(C, dim=2)
        q = q.view(B, T, 2, 16).transpose(1, 2)
        k = k.view(B, T, 2, 16).transpose(1, 2)
        scores = q @ k / math.sqrt(16)  # should be k.transpose(-2, -1)
        return scores


@pytest.mark.parametrize("ops", [False, True])
def test_wrong_transpose_before_matmul(ops):
    x = torch.randn(2, 8, 32)
    with pytest.raises(RuntimeError) as info:
        trace_shapes(WrongTranspose(), x, ops=ops, dims={"nh": 2, "hs": 16})
    exc = info.value
    assert "batch2 tensor" in str(exc)  # torch's own message is still there, first
    note = _note(exc)
    assert "scores = q @ k / math.sqrt(16)" in note
    assert "q  (B=2, nh=2, T=8, hs=16)" in note and "k  (B=2, nh=2, T=8, hs=16)" in note
    assert "a's last axis (hs=16) to equal b's second-to-last axis (T=8)" in note
    assert "did you mean k.transpose(-2, -1)?" in note
    assert ("`matmul` failed" in note) == ops
    trace = exc.shape_trace
    assert trace.events[0].failed and trace.modules("qkv")[0].output_shapes == [(2, 8, 96)]
    assert "k.transpose(-2, -1)" in trace.error and "✗ failed" in str(trace)


class TokenMixer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):  # x: (B, T, C), mixes along T
        return self.proj(x.transpose(1, 2)).transpose(1, 2)


def test_missing_batch_dim():
    with pytest.raises(IndexError) as info:
        trace_shapes(TokenMixer(), torch.randn(8, 16))
    note = _note(info.value)
    assert "self.proj(x.transpose(1, 2))" in note and "x  (8, 16)" in note
    assert "a tensor with 2 axes, but the code uses axis 2" in note
    assert "batch axis is probably missing" in note and "x.unsqueeze(0)" in note


def test_int64_input_to_a_float_layer():
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(RuntimeError, match="same dtype") as info:
        trace_shapes(model, torch.ones(2, 4, dtype=torch.long), ops=True)
    note = _note(info.value)
    assert "`linear` failed in 0 (Linear)" in note
    # a weight's axes are features, never T: the 4 stays a number
    assert "0.weight  (3, 4)  float32" in note and "(B=2, T=4)  int64" in note
    assert "convert the integer tensor: tensor.to(torch.float32)" in note


class MaskedScores(nn.Module):
    def forward(self, scores, mask):
        return scores.masked_fill(~mask, float("-inf"))


def test_mask_of_wrong_length():
    scores = torch.randn(2, 2, 8, 8)
    mask = torch.ones(7, 7, dtype=torch.bool).tril()
    with pytest.raises(RuntimeError, match="must match the size") as info:
        trace_shapes(MaskedScores(), scores, mask, ops=True, dims={"B": 2, "nh": 2, "T": 8})
    note = _note(info.value)
    assert "`masked_fill` failed" in note
    assert "scores  (B=2, nh=2, T=8, T=8)" in note
    assert "axis -1: T=8 vs 7" in note and "axis -2: T=8 vs 7" in note
    assert ("hint: ~mask looks built for another length: build it from the current sizes (e.g. "
            "torch.ones(T, T, dtype=torch.bool).tril())") in note


def test_a_mask_for_the_whole_context_says_to_crop_it():
    """nanoGPT's bias buffer used without [:, :, :T, :T]: the mask is the larger operand."""
    scores = torch.randn(2, 2, 8, 8)
    mask = torch.ones(16, 16, dtype=torch.bool).tril()
    with pytest.raises(RuntimeError, match="must match the size") as info:
        trace_shapes(MaskedScores(), scores, mask, ops=True, dims={"B": 2, "nh": 2, "T": 8})
    assert ("hint: ~mask looks built for a longer sequence (the context size?): crop it to this "
            "one, as nanoGPT does with bias[:, :, :T, :T]") in _note(info.value)


def test_a_cpu_tensor_made_in_the_forward_meets_meta_ones_in_a_meta_run():
    class MakesMask(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            mask = torch.ones(x.shape[1], x.shape[1])  # no device=: on the CPU, real
            return self.proj(x) + mask  # meta + real: the real one joins the meta side

    trace = trace_shapes(MakesMask(), torch.randn(2, 4, 4), meta=True, ops=True)
    plus = next(e for e in trace.events if e.name in ("+", "add"))
    assert plus.input_shapes == [(2, 4, 4), (4, 4)] and plus.output_shapes == [(2, 4, 4)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_cuda_mix():
    model = nn.Linear(4, 4).cuda()
    with pytest.raises(RuntimeError, match="device") as info:
        trace_shapes(model, torch.randn(2, 4), ops=True)
    note = _note(info.value)
    assert "all operands on one device" in note and "cuda:0" in note and "cpu" in note


def test_data_dependent_op_in_a_meta_run_is_named():
    class CountsTokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.score = nn.Linear(5, 5)

        def forward(self, ids):
            n = int((ids > 0).sum().item())  # the inputs' values: real in a meta run
            kept = int((self.score(ids[:, :n].float()) > 0).sum().item())  # needs values
            return ids[:, :kept]

    with pytest.raises(RuntimeError, match="meta") as info:
        trace_shapes(CountsTokens(), torch.ones(2, 5, dtype=torch.long), meta=True)
    note = _note(info.value)
    assert "`item` failed" in note
    assert "kept = int((self.score(ids[:, :n].float()) > 0).sum().item())" in note
    assert "`item` reads the values of a tensor computed from the weights" in note
    assert "this line needs values: trace with meta=False on a small input" in note


def test_errors_caught_inside_the_forward_keep_the_trace_consistent():
    class Fallback(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bad, self.good = nn.Linear(3, 3), nn.Linear(4, 4)

        def forward(self, x):
            try:
                return self.bad(x)
            except RuntimeError:
                return self.good(x)

    trace = trace_shapes(Fallback(), torch.randn(2, 4))
    root, bad, good = trace.events
    assert bad.failed and not good.failed and not root.failed
    assert good.parent == 0 and root.output_shapes == [(2, 4)]
    assert not trace.error


def test_python_310_fallback_extends_the_message(monkeypatch):
    monkeypatch.setattr(_shape_errors, "_HAS_NOTES", False)
    with pytest.raises(RuntimeError) as info:
        trace_shapes(WrongTranspose(), torch.randn(2, 8, 32))
    message = str(info.value)
    assert message.startswith("Expected size") and "k.transpose(-2, -1)" in message
    assert not getattr(info.value, "__notes__", None)


def test_the_last_frame_of_an_op_error_is_the_users_line():
    class Bad(torch.nn.Module):
        def forward(self, x):
            return torch.softmax(x @ torch.zeros(3, 2), dim=-1)  # the failing line

    with pytest.raises(RuntimeError) as caught:
        trace_shapes(Bad(), torch.zeros(2, 4), ops=True)
    last = traceback.extract_tb(caught.value.__traceback__)[-1]
    assert (last.name, last.line) == ("forward", "return torch.softmax(x @ torch.zeros(3, 2), "
                                                 "dim=-1)  # the failing line")
    assert last.filename == __file__


class HeadsAttention(nn.Module):
    """Attention without a config (sizes are attributes, as tutorials write them) with one of
    the bugs learners make: k/v heads not repeated for grouped-query attention, q left
    (B, T, nh, hs), einsum over mismatched heads, a reshape to the wrong size."""

    def __init__(self, bug: str) -> None:
        super().__init__()
        self.bug = bug
        self.n_head, self.n_kv_head, self.head_dim = 4, 2, 16
        self.q_proj, self.k_proj = nn.Linear(32, 64), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.bug == "gqa":
            return q @ k.transpose(-2, -1)  # @gqa
        if self.bug == "heads_last":
            k = k.repeat_interleave(2, dim=1)
            q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)  # forgot .transpose(1, 2)
            return q @ k.transpose(-2, -1)  # @heads_last
        if self.bug == "einsum":
            return torch.einsum("bhid,bhjd->bhij", q, k)  # @einsum
        if self.bug == "minus_one":
            return q.reshape(B, T, -1, 3 * self.head_dim)  # @minus_one
        return q.transpose(1, 2).reshape(B, T, C)  # @merge


def _explained(bug: str, **options) -> list[str]:
    with pytest.raises(RuntimeError) as info:
        trace_shapes(HeadsAttention(bug), torch.randn(2, 5, 32), **options)
    note = _note(info.value)
    with open(__file__) as source:
        line = next(n for n, text in enumerate(source, 1) if text.rstrip().endswith(f"@{bug}"))
    assert f"test_shapes_errors.py:{line}" in note
    return [text.strip() for text in note.splitlines()]


@pytest.mark.parametrize("options", [{"ops": True}, {"meta": True}], ids=["ops", "meta"])
def test_grouped_query_heads_not_repeated_is_a_batch_axis_mismatch(options):
    lines = _explained("gqa", **options)
    assert "q                    (B=2, nh=4, T=5, hs=16)" in " ".join(lines)
    assert "k.transpose(-2, -1)  (B=2, nkv=2, hs=16, T=5)" in " ".join(lines)
    assert ("expected: a @ b needs batch axes (all but the last two) that broadcast, each equal "
            "or 1: axis -3: nh=4 vs nkv=2") in lines
    assert ("hint: k.transpose(-2, -1) has 2x fewer heads than q (grouped-query attention): "
            "repeat its heads first, e.g. k.transpose(-2, -1).repeat_interleave(2, dim=-3)"
            ) in lines
    assert not any("a's last axis" in text for text in lines)  # hs == hs: never the complaint


def test_heads_left_after_the_tokens_is_named_with_the_transpose_that_fixes_it():
    lines = _explained("heads_last", ops=True)
    assert ("expected: a @ b needs batch axes (all but the last two) that broadcast, each equal "
            "or 1: axis -3: T=5 vs nh=4") in lines
    assert ("hint: q has its heads on the wrong axis (e.g. (B, T, nh, hs) instead of "
            "(B, nh, T, hs)): q.transpose(1, 2) after the view") in lines


@pytest.mark.parametrize("options", [{}, {"ops": True}, {"meta": True}],
                         ids=["modules", "ops", "meta"])
def test_einsum_is_explained_by_its_subscripts(options):
    lines = _explained("einsum", **options)
    assert ("expected: einsum('bhid,bhjd->bhij'): subscript h is one size in every operand, "
            "but it is nh=4 in q and nkv=2 in k") in lines
    assert ("hint: k has 2x fewer along h than q (grouped-query attention?): repeat it first, "
            "e.g. k.repeat_interleave(2, dim=1)") in lines


@pytest.mark.parametrize("options", [{}, {"ops": True}], ids=["modules", "ops"])
def test_reshape_says_which_size_was_given_and_which_was_needed(options):
    lines = _explained("minus_one", **options)
    assert ("expected: sizes next to -1 that divide q (B=2, nh=4, T=5, hs=16)'s 640 elements: "
            "(2, 5, -1, 48) leaves -1 = 640 / 480, not a whole number") in lines
    assert not any("compute one axis with -1" in text for text in lines)  # it already does
    lines = _explained("merge", **options)
    given = "(2, 5, 32) holds 320"
    assert any(text.startswith("expected: as many elements as ") and text.endswith(
        f": 640; {given}") for text in lines)
    assert ("hint: to merge the trailing axes let -1 compute the last size: (2, 5, -1) gives "
            "(B=2, T=5, 64)") in lines


class LearnerSlip(nn.Module):
    """The shape slips of a learner's first training loop, one per ``slip``."""

    def __init__(self, slip: str) -> None:
        super().__init__()
        self.slip = slip
        self.head = nn.Linear(16, 64)  # C=16 -> V=64

    def forward(self, x, targets):
        logits = self.head(x)  # (B, T, V)
        if self.slip == "loss":
            return nn.functional.cross_entropy(logits, targets)
        if self.slip == "flat_logits":
            return nn.functional.cross_entropy(logits.view(-1, 64), targets)
        if self.slip == "flat_targets":
            return nn.functional.cross_entropy(logits, targets.view(-1))
        if self.slip == "cat":
            shorter = logits[:, 1:]
            return torch.cat([logits, shorter], dim=-1)
        if self.slip == "rank":
            return torch.cat([logits, targets], dim=-1)
        if self.slip == "stack":
            shorter = logits[:, 1:]
            return torch.stack([logits, shorter])
        if self.slip == "index":
            return logits[:, 5]
        if self.slip == "expand":
            return logits.expand(3, 5, 64)
        if self.slip == "vector":
            weights = torch.ones(5)
            return logits @ weights
        raise AssertionError(self.slip)


def _slip(slip: str, **options) -> list[str]:
    x, targets = torch.randn(2, 5, 16), torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises((RuntimeError, IndexError, ValueError)) as info:
        trace_shapes(LearnerSlip(slip), x, targets, dims={"C": 16, "V": 64}, **options)
    return [line.strip() for line in _note(info.value).splitlines()]


OPTIONS = pytest.mark.parametrize("options", [{}, {"ops": True}], ids=["modules", "ops"])


@OPTIONS
def test_cross_entropy_on_3d_logits_says_to_flatten_the_tokens(options):
    lines = _slip("loss", **options)
    assert ("expected: cross_entropy(input, target) takes the class scores with the classes on "
            "axis 1: input (N, C) with target (N,), or input (N, C, d1, ...) with target "
            "(N, d1, ...)") in lines
    assert ("hint: logits (B=2, T=5, V=64) has its classes last: flatten the tokens, "
            "cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1)) as nanoGPT does, "
            "or move the classes to axis 1 with logits.transpose(1, 2)") in lines
    lines = _slip("flat_logits", ops=True)  # the operands themselves: logits already flat
    assert any(text.startswith("expected: cross_entropy(input, target) takes") for text in lines)
    assert ("hint: flatten targets too: targets.view(-1) gives one target per row of "
            "logits.view(-1, 64)") in lines
    lines = _slip("flat_targets", ops=True)
    assert ("hint: flatten logits too: logits.view(-1, logits.size(-1)) gives one row per "
            "target") in lines


@OPTIONS
def test_cat_and_stack_say_which_axis_differs(options):
    lines = _slip("cat", **options)
    assert ("expected: every axis but the joined one (dim=2) equal in all the tensors: logits "
            "has T=5 on axis 1, shorter has 4") in lines
    assert ("hint: join along the axis where they differ (dim=...), or make the other axes "
            "equal first (e.g. crop to the shorter)") in lines
    lines = _slip("rank", **options)
    assert "expected: tensors with the same number of axes to join (got 3 and 2)" in lines
    assert "hint: add the missing axis first, e.g. x.unsqueeze(-1)" in lines
    lines = _slip("stack", **options)
    assert ("expected: tensors of one shape for stack, which adds a new axis: logits "
            "(B=2, T=5, V=64); shorter (B=2, 4, V=64)") in lines
    assert ("hint: to join along an existing axis use torch.cat; else make the shapes equal "
            "first") in lines


@OPTIONS
def test_index_expand_and_vector_products_say_what_fits(options):
    lines = _slip("index", **options)
    assert ("expected: an index from 0 to 4 (or -5 to -1) along logits's axis 1 (T=5); 5 is "
            "past the end") in lines
    assert "hint: Python counts from 0: the last position is -1 (or size - 1)" in lines
    lines = _slip("expand", **options)
    assert ("expected: expand to stretch only axes of size 1: axis 0 has size 2, which cannot "
            "become 3") in lines
    lines = _slip("vector", **options)
    assert "expected: a @ v needs a's last axis (V=64) to equal v's length (T=5)" in lines
