"""Named dimensions: where names come from, and when a size is ambiguous."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from torchlens_edu.dims import Dims, dims_from_config, dims_from_inputs, format_shape
from torchlens_edu.models import GPT2, GPT2Config


def test_gpt2_config_roles():
    dims = dims_from_config(GPT2Config.preset("gpt2"))
    assert dims == {"C": 768, "nh": 12, "V": 50257, "ctx": 1024, "hs": 64, "3C": 2304,
                    "4C": 3072}


def test_hugging_face_config_roles():
    transformers = pytest.importorskip("transformers")
    llama = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                     intermediate_size=172, vocab_size=300,
                                     max_position_embeddings=128)
    dims = dims_from_config(llama)
    assert dims["C"] == 64 and dims["nh"] == 4 and dims["hs"] == 16 and dims["nkv"] == 2
    assert dims["ff"] == 172 and dims["V"] == 300 and dims["ctx"] == 128
    bert = dims_from_config(transformers.BertConfig(hidden_size=48, num_attention_heads=3,
                                                    intermediate_size=192))
    assert bert["4C"] == 192 and bert["hs"] == 16


def test_inputs_give_batch_and_tokens():
    assert dims_from_inputs(torch.zeros(2, 16, dtype=torch.long)) == {"B": 2, "T": 16}
    assert dims_from_inputs({"input_ids": torch.zeros(3, 5, dtype=torch.long)}) == {"B": 3, "T": 5}
    assert dims_from_inputs(torch.zeros(2, 7, 32)) == {"B": 2, "T": 7}
    assert dims_from_inputs(torch.zeros(8, 3, 32, 32)) == {"B": 8}
    assert dims_from_inputs(torch.zeros(8, 16)) == {}  # (B, F) or unbatched (T, C)?


def test_infer_prefers_the_users_words():
    model = GPT2(GPT2Config.preset("tiny"))
    dims = Dims.infer(model, [torch.zeros(2, 8, dtype=torch.long)], {"T": 9})
    assert dims["T"] == 9 and dims["B"] == 2 and dims["C"] == 32
    assert Dims.infer(None, [], None) == {}


def test_shapes_print_with_names():
    dims = Dims({"B": 2, "T": 16, "nh": 12, "hs": 64})
    assert dims.format((2, 12, 16, 64)) == "(B=2, nh=12, T=16, hs=64)"
    assert format_shape((2, 16, 768), {"B": 2, "T": 16, "C": 768}, brackets="[]") == \
        "[B=2, T=16, C=768]"
    assert format_shape((3, 4)) == "(3, 4)"


def test_shared_sizes_are_shown_not_guessed():
    dims = Dims({"B": 1, "T": 64, "nh": 12, "hs": 64, "C": 768})
    # q (B, nh, T, hs) and scores (B, nh, T, T) look the same: say both.
    assert dims.format((1, 12, 64, 64)) == "(B=1, nh=12, 64:T|hs, 64:T|hs)"
    assert dims.format((1, 64, 12, 64)) == "(B=1, 64:T|hs, nh=12, 64:T|hs)"
    # a lone last axis of an activation is a feature axis: hs, not T
    assert dims.format((12, 7, 64)) == "(nh=12, 7, hs=64)"
    # token ids (B, T) are not features
    assert dims.format((1, 64)) == "(B=1, 64:T|hs)"
    assert dims.format((64, 768)) == "(64:T|hs, C=768)"


def test_position_settles_the_batch_axis_and_then_the_others():
    dims = Dims({"B": 2, "nh": 2, "T": 8, "hs": 16})
    assert dims.format((2, 2, 8, 16)) == "(B=2, nh=2, T=8, hs=16)"
    assert dims.labels((2, 8)) == ["B=2", "T=8"]
    assert dims.format((4, 2)) == "(4, nh=2)"  # B is the first axis or none


def test_a_size_two_axis_after_the_first_is_never_the_batch():
    dims = Dims({"B": 2, "T": 10})
    assert dims.format((2, 3, 10, 4, 2)) == "(B=2, 3, T=10, 4, 2)"  # was (B=2, 3, T=10, 4, B=2)
    assert dims.format((3, 2)) == "(3, 2)"


def test_models_without_a_config_get_names_from_their_modules():
    from torchlens_edu.dims import dims_from_modules

    class Attention(nn.Module):  # the Annotated Transformer's names: h heads of d_k
        def __init__(self) -> None:
            super().__init__()
            self.h, self.d_k, self.heads = 4, 8, 4
            self.proj = nn.Linear(32, 32)

    model = nn.ModuleDict({"tok_emb": nn.Embedding(100, 32), "pos_emb": nn.Embedding(16, 32),
                           "attn": Attention(), "up": nn.Linear(32, 64),
                           "down": nn.Linear(64, 32), "head": nn.Linear(32, 100)})
    assert dims_from_modules(model) == {"V": 100, "C": 32, "ctx": 16, "nh": 4, "hs": 8,
                                        "3C": 96, "ff": 64}
    dims = Dims.infer(model, [torch.zeros(2, 5, dtype=torch.long)])
    assert dims.format((2, 4, 5, 8)) == "(B=2, nh=4, T=5, hs=8)"
    assert dims.format((2, 5, 64)) == "(B=2, T=5, ff=64)"


def test_heads_that_differ_between_modules_get_no_name():
    from torchlens_edu.dims import dims_from_modules

    encoder, decoder = nn.Module(), nn.Module()
    encoder.num_heads, decoder.num_heads = 4, 8
    assert "nh" not in dims_from_modules(nn.ModuleList([encoder, decoder]))


def test_size_one_axes_are_not_named_except_a_batch_of_one():
    dims = Dims({"B": 1, "T": 1})
    assert dims.format((1, 1, 5)) == "(B=1, 1, 5)"


def test_bad_names_and_sizes_are_refused():
    with pytest.raises(ValueError, match="short word"):
        Dims({"a b": 2})
    with pytest.raises(ValueError, match="non-negative int"):
        Dims({"B": -1})


@pytest.mark.parametrize("bad", ["abc", ["B", "T"], [1, 2], 3])
@pytest.mark.parametrize("tool", ["capture", "trace_shapes", "watch_nans", "inspect", "show"])
def test_a_dims_argument_that_is_not_a_dict_gets_one_clear_error(tool: str, bad: object) -> None:
    """Issue 16.14: dims="abc" or a list gave AttributeError (or a dict() error) deep inside."""
    import torchlens_edu as tle

    model = torch.nn.Linear(2, 2)
    calls = {
        "capture": lambda: tle.inspect(model).capture("*", dims=bad).__enter__(),
        "trace_shapes": lambda: tle.trace_shapes(model, torch.zeros(1, 2), dims=bad),
        "watch_nans": lambda: tle.watch_nans(model, dims=bad),
        "inspect": lambda: tle.inspect(model, dims=bad),
        "show": lambda: tle.show(torch.zeros(2), dims=bad),
    }
    with pytest.raises(TypeError, match=r"dims=.*: give a dict of dimension names and their "
                                        r"sizes, e.g. dims=\{'B': 8, 'T': 16\}, or None") as info:
        calls[tool]()
    names_only = isinstance(bad, str) or bad == ["B", "T"]
    assert ("names alone cannot be matched to sizes" in str(info.value)) == names_only
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_module_dims_read_without_module_getattr_agree_with_getattr() -> None:
    """The fast module attribute read (no nn.Module.__getattr__ miss per name) finds the same
    ints: instance attributes, class attributes, properties, and a module's own __getattr__."""
    import torch.nn as nn

    from torchlens_edu.dims import _MODULE_FIELDS, _first_int, _head_attributes

    class ClassHeads(nn.Module):
        n_head = 4

    class PropertyHeads(nn.Module):
        @property
        def num_heads(self) -> int:
            return 6

    class DynamicHeads(nn.Module):
        def __getattr__(self, name: str) -> object:
            return 8 if name == "heads" else super().__getattr__(name)

    own = nn.Linear(2, 2)
    own.n_heads = 2
    modules = (own, ClassHeads(), PropertyHeads(), DynamicHeads(), nn.Linear(2, 2))
    for module in modules:
        for role, fields in _MODULE_FIELDS.items():
            assert _head_attributes([module])[role] == {_first_int(module, fields)} - {None}
    assert [_head_attributes([m])["nh"] for m in modules] == [{2}, {4}, {6}, {8}, set()]


# --- module roles settle shared sizes: GPT-2 with n_embd == n_positions ---------------------

@pytest.fixture(scope="module")
def square_gpt() -> GPT2:
    """A GPT-2 whose width equals its context (C = ctx = 64): every weight has a shared size."""
    return GPT2(GPT2Config(vocab_size=100, n_positions=64, n_embd=64, n_layer=1,
                           n_head=4)).eval()


def _op_row(text: str, code: str) -> str:
    """The op row of a rendered trace that shows this source code (one line, wide render)."""
    return next(line for line in text.splitlines() if code in line and " -> " in line)


@pytest.mark.parametrize("meta", [False, True])
def test_position_embedding_is_ctx_by_C_in_an_op_trace_when_C_equals_ctx(square_gpt, meta):
    import torchlens_edu as tle

    tr = tle.trace_shapes(square_gpt, torch.zeros(1, 10, dtype=torch.long), ops=True, meta=meta)
    text = tr.to_text(width=400)
    assert tr.dims["C"] == tr.dims["ctx"] == 64  # the size alone cannot tell them apart
    # wpe's weight is (ctx, C): the embedding's role says which axis is which
    assert "embedding  (T=10) i64, (ctx=64, C=64) -> (T=10, C=64)" in _op_row(
        text, "pos_emb = self.transformer.wpe(pos)")
    # a linear layer's and a norm's weights hold features: C, never ctx
    assert "(B=1, T=10, C=64), (C=64, C=64), (C=64) -> (B=1, T=10, C=64)" in _op_row(
        text, "return self.resid_dropout(self.c_proj(y))")
    assert "(B=1, T=10, C=64), (C=64), (C=64) -> (B=1, T=10, C=64)" in _op_row(
        text, "x = self.transformer.ln_f(x)")
    assert "C|ctx" not in text and "ctx|C" not in text
    wpe_op = next(e for e in tr.to_dict()["events"]
                  if e["kind"] == "op" and e["path"] == "transformer.wpe")
    assert wpe_op["dims"]["inputs"] == [["T=10"], ["ctx=64", "C=64"]]


def test_inspect_names_each_weight_by_its_role_when_C_equals_ctx(square_gpt):
    import torchlens_edu as tle

    lines = str(tle.inspect(square_gpt)).splitlines()
    wpe = lines.index(next(line for line in lines if "wpe Embedding" in line))
    assert "· weight (ctx=64, C=64)  4,096" in lines[wpe + 1]
    assert any("· weight (C=64, 4C=256)  16,384" in line for line in lines)  # mlp.c_proj
    assert any("· weight (V=100, C=64)  6,400" in line for line in lines)  # wte, lm_head
    assert not any("|" in line.split("·")[-1] for line in lines if "·" in line)


def test_a_weight_axis_is_never_the_batch_or_the_tokens():
    # Linear(64, 2) in a batch of 2: the weight's 2 is an output feature, not B
    dims = Dims({"B": 2, "T": 64, "C": 64})
    from torchlens_edu.dims import parameter_axes

    roles = parameter_axes("head", nn.Linear(64, 2), "weight", 2)
    assert dims.format((2, 64), axes=roles) == "(2, C=64)"
    assert dims.format((2, 64)) == "(B=2, 64:T|C)"  # the bare shape: position only


def test_hugging_face_and_transformer_lens_position_weights_are_ctx_by_C():
    from torchlens_edu.dims import model_parameter_axes

    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2Model(transformers.GPT2Config(n_embd=64, n_positions=64, n_layer=1,
                                                        n_head=4, vocab_size=100))
    axes = model_parameter_axes(hf)
    dims = Dims({"C": 64, "ctx": 64, "3C": 192, "V": 100})
    assert dims.format(hf.wpe.weight.shape, axes=axes[id(hf.wpe.weight)]) == "(ctx=64, C=64)"
    c_attn = hf.h[0].attn.c_attn.weight  # Conv1D: (in, out)
    assert dims.format(c_attn.shape, axes=axes[id(c_attn)]) == "(C=64, 3C=192)"

    class PosEmbed(nn.Module):  # TransformerLens' layout: a bare W_pos (n_ctx, d_model)
        def __init__(self) -> None:
            super().__init__()
            self.W_pos = nn.Parameter(torch.zeros(64, 64))

    tl_like = nn.ModuleDict({"pos_embed": PosEmbed()})
    w_pos = tl_like["pos_embed"].W_pos
    assert dims.format(w_pos.shape, axes=model_parameter_axes(tl_like)[id(w_pos)]) == \
        "(ctx=64, C=64)"


class _WrongWidth(nn.Module):
    """C = ctx = 64, and a projection built for 48 features: a shape error in a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(100, 64), nn.Embedding(64, 64)
        self.proj = nn.Linear(48, 64)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))  # (B, T, C)
        return self.proj(x)


@pytest.mark.parametrize("mode", ["modules", "ops", "meta"])
def test_a_shape_error_names_the_weights_axes_by_their_role(mode):
    import torchlens_edu as tle

    with pytest.raises(RuntimeError) as info:
        tle.trace_shapes(_WrongWidth(), torch.zeros(2, 5, dtype=torch.long),
                         ops=mode == "ops", meta=mode == "meta")
    note = info.value.shape_trace.error
    weight = next(line for line in note.splitlines() if "weight" in line)
    assert "(C=64, 48)" in weight, note  # not (64:C|ctx, 48): a linear layer's axes are features
    assert "C|ctx" not in note
    assert "the layer's in_features (48)" in note


def test_a_nan_report_names_the_weights_axes_by_their_role():
    import torchlens_edu as tle

    model = _WrongWidth()
    model.proj = nn.Linear(64, 64)  # the right width now; an Inf planted in its weight instead
    with torch.no_grad():
        model.proj.weight[0, 0] = float("inf")
    with pytest.raises(tle.NonFiniteError) as info, tle.watch_nans(model):
        model(torch.zeros(2, 5, dtype=torch.long))
    rows = {s.name: s.shape for s in info.value.report.inputs}
    assert rows["parameter proj.weight"] == "(C=64, C=64)"  # not (64:C|ctx, 64:C|ctx)
    assert rows["input 0"] == "(B=2, T=5, C=64)"
