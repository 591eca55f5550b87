"""`torchlens-edu trace "prompt"`."""

from __future__ import annotations

from torchlens_edu.cli import main


def test_trace_the_embedded_model(capsys):
    assert main(["trace", "--depth", "1", "Hello world"]) == 0
    out = capsys.readouterr().out
    assert "ShapeTrace of GPT2" in out and "(x4, identical shapes)" in out
    assert "lm_head Linear" in out


def test_trace_ops_with_include(capsys):
    assert main(["trace", "--ops", "--include", "transformer.h.0.attn", "Hi"]) == 0
    out = capsys.readouterr().out
    assert "q = q.view(B, T, nh, hs).transpose(1, 2)" in out
    assert "lm_head" not in out


def test_trace_gpt2_xl_on_meta_loads_no_weights(capsys):
    assert main(["trace", "--model", "gpt2-xl", "--meta", "--depth", "1", "Hello"]) == 0
    out = capsys.readouterr().out
    assert "shape-only run on meta tensors" in out
    assert "transformer.h.0..47 Block" in out and "C=1600" in out


def test_empty_prompt_is_refused(capsys):
    assert main(["trace", ""]) == 2
    assert "argument prompt: the prompt is empty" in capsys.readouterr().err
