"""show / show_attention: never raise, show torch's numbers, and fit terminal, pipe and Jupyter."""

from __future__ import annotations

import io
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console
from test_printing_stats import fast, tensors

import torchlens_edu as tle
from torchlens_edu.printing import AttentionView, TensorView

ANSI = re.compile(r"\x1b\[")


def _render(view, *, color: bool, width: int = 120) -> str:
    console = Console(file=io.StringIO(), width=width, force_terminal=color,
                      color_system="truecolor" if color else None, no_color=not color)
    console.print(view)
    return console.file.getvalue()  # type: ignore[attr-defined]


def _causal(B: int, nh: int, T: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, nh, T, T, generator=gen)
    return scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")).softmax(-1)


@fast
@given(tensors(), st.booleans(), st.booleans())
def test_show_never_raises(t: torch.Tensor, heatmap: bool, color: bool) -> None:
    text = _render(TensorView(t, dims={"T": 4}, heatmap=heatmap), color=color)
    assert text.startswith(("Tensor[", "Parameter[")) or ANSI.match(text)
    assert color or not ANSI.search(text)


def test_table_shows_torchs_values_with_current_precision() -> None:
    x = torch.tensor([[1.23456, -2.5], [0.0, 1e-2]])
    text = _render(TensorView(x), color=False)
    for v in x.flatten().tolist():
        assert f"{v:.4f}" in text
    with tle.printoptions(precision=2):
        assert "1.23" in _render(TensorView(x), color=False)
        assert "1.2346" not in _render(TensorView(x), color=False)


def test_table_summarises_with_edgeitems_and_threshold() -> None:
    x = torch.arange(100.0).reshape(10, 10)
    with tle.printoptions(edgeitems=2, threshold=10):
        lines = _render(TensorView(x), color=False).splitlines()
    rows = [line.split()[0] for line in lines[2:]]
    assert rows == ["0", "1", "…", "8", "9"]
    assert lines[1].split() == ["0", "1", "…", "8", "9"]
    with tle.printoptions(threshold=1000):
        assert len(_render(TensorView(x), color=False).splitlines()) == 12  # title, header, 10


def test_dims_label_axes_and_slices() -> None:
    x = torch.randn(2, 3, 4)
    text = _render(TensorView(x, dims={"B": 2, "T": 3, "C": 4}), color=False)
    assert text.startswith("Tensor[B=2, T=3, C=4] f32")
    assert "[0, :, :]  T=3 × C=4" in text and "[1, :, :]  T=3 × C=4" in text


def test_heatmap_block_averages_big_slices_and_shades_without_colour() -> None:
    x = torch.linspace(0, 1, 200 * 300).reshape(200, 300)
    plain = _render(TensorView(x, heatmap=True), color=False, width=200)
    assert "200×300 shown as 32×64" in plain
    assert "shown as 32×40" in _render(TensorView(x, heatmap=True), color=False, width=80)
    grid = plain.splitlines()[-32:]
    assert grid[0].startswith("  ") and grid[-1].endswith("██")  # low values blank, high full
    colour = _render(TensorView(x, heatmap=True), color=True)
    assert "\x1b[38;2;" in colour  # truecolor blocks


def test_no_color_env_and_pipes_are_plain(monkeypatch, capsys) -> None:
    x = torch.randn(4, 4)
    tle.show(x)  # pytest's capture is not a TTY
    out = capsys.readouterr().out
    assert out.startswith("Tensor[4, 4]") and not ANSI.search(out)
    monkeypatch.setenv("NO_COLOR", "1")
    console = Console(file=io.StringIO(), force_terminal=True, width=100)
    tle.show(x, heatmap=True, console=console)
    assert not re.search(r"\x1b\[[0-9;]*3[0-9];2;", console.file.getvalue())  # no colours
    assert re.search("[░▒▓█]", console.file.getvalue())


def test_html_for_jupyter() -> None:
    html = TensorView(torch.randn(3, 3))._repr_html_()
    assert html.startswith("<") and "<pre" in html and "background-color" in html
    att = AttentionView(_causal(1, 1, 4)[0, 0], ["a", "b", "c", "d"])._repr_html_()
    assert "·" in att and ">a" in att.replace(" ", "")


@pytest.mark.parametrize("shape, kwargs, title", [
    ((1, 1, 5, 5), {}, "attention"),
    ((2, 3, 5, 5), {"batch": 1, "head": 2}, "attention  batch 1 of 2 · head 2 of 3"),
    ((2, 3, 5, 5), {}, "attention  batch 0 of 2 · mean of 3 heads"),
])
def test_show_attention_accepts_every_layout(shape, kwargs, title) -> None:
    w = _causal(*shape[:2], shape[-1])
    for weights in (w, w[0], w[0, 0]):
        if weights.dim() < 4 and "batch" in kwargs:
            continue
        text = _render(AttentionView(weights, list("abcde"), **kwargs), color=False)
        assert text.splitlines()[1].split() == list("abcde")  # keys across
        assert [line.split()[0] for line in text.splitlines()[2:]] == list("abcde")  # queries
    text = _render(AttentionView(w, list("abcde"), **kwargs), color=False)
    assert text.startswith(title)
    row0 = text.splitlines()[2].split()
    assert row0[1] == "1.00" and row0[2:] == ["·"] * 4  # the causal triangle is visible


def test_show_attention_numbers_are_the_weights() -> None:
    w = _causal(1, 1, 4)[0, 0]
    rows = _render(AttentionView(w), color=False).splitlines()[2:]
    for q, line in enumerate(rows):
        cells = line.split()[1:]
        for k, cell in enumerate(cells):
            assert cell == ("·" if k > q else f"{w[q, k].item():.2f}")


def test_show_attention_layers_and_kv_cache_queries() -> None:
    layers = [_causal(1, 2, 6, seed=i) for i in range(3)]
    text = _render(AttentionView(layers, [f"t{i}" for i in range(6)], layer=2, head=1),
                   color=False)
    assert text.startswith("attention  layer 2 of 3 · head 1 of 2")
    # a decode step with a KV cache: 2 new queries attend over 6 keys
    step = layers[0][0, 0, -2:]
    text = _render(AttentionView(step, [f"t{i}" for i in range(6)]), color=False)
    assert [line.split()[0] for line in text.splitlines()[2:]] == ["t4", "t5"]


def test_show_attention_long_sequences_use_blocks() -> None:
    tokens = [f" w{i}" for i in range(100)]
    text = _render(AttentionView(_causal(1, 1, 100), tokens), color=False, width=200)
    assert "100 shown as 64 columns" in text and "·" in text
    text = _render(AttentionView(_causal(1, 1, 30), tokens[:30]), color=False, width=200)
    assert text.splitlines()[1].split()[:3] == ["␣"] * 3  # key tokens written downwards
    assert text.splitlines()[-1].startswith("␣w29")


@pytest.mark.parametrize("weights, kwargs, message", [
    (torch.rand(5), {}, "expected \\(T, T\\)"),
    (torch.rand(6, 5), {}, "more queries than keys"),
    (torch.rand(2, 3, 5, 5), {"head": 3}, "head=3 is out of range.*head=0..2"),
    (torch.rand(2, 3, 5, 5), {"batch": 2}, "batch=2 is out of range"),
    ([torch.rand(1, 2, 5, 5)] * 2, {}, "2 layers: pass layer=0..1"),
    (torch.rand(5, 5), {"tokens": ["a"]}, "1 token for 5 key positions"),
    ("weights", {}, "takes a tensor"),
    (torch.ones(3, 3, dtype=torch.long), {}, "must be floating point"),
])
def test_show_attention_errors_are_clear(weights, kwargs, message) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        tle.show_attention(weights, **kwargs)


def test_show_attention_prints(capsys) -> None:
    tle.show_attention(_causal(1, 1, 3), ["x", "y", "z"])
    assert capsys.readouterr().out.startswith("attention  (3 queries × 3 keys")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_show_on_cuda() -> None:
    x = torch.randn(64, 64, device="cuda")
    assert "cuda:0" in _render(TensorView(x, heatmap=True), color=True)
    assert "1.00" in _render(AttentionView(_causal(1, 1, 4).cuda()), color=False)


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
@pytest.mark.parametrize("dtype", [
    torch.bool, torch.uint8, torch.int8, torch.int64, torch.uint16, torch.uint32, torch.uint64,
    torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64,
    torch.complex32])
def test_show_every_dtype(dtype: torch.dtype) -> None:
    x = (torch.arange(60.0).reshape(3, 4, 5) % 7).to(dtype).transpose(0, 2)
    with tle.printoptions(threshold=10, edgeitems=1):
        for heatmap in (False, True):
            text = _render(TensorView(x, heatmap=heatmap), color=True)
            assert "Tensor[5, 4, 3]" in text


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_show_nested_tensor_says_what_to_do() -> None:
    nested = torch.nested.nested_tensor([torch.randn(2, 3), torch.randn(4, 3)])
    text = _render(TensorView(nested), color=False)
    assert text.startswith("NestedTensor[2 tensors: [2, 3], [4, 3]] f32 cpu")
    assert "show(t.unbind()[0])" in text
