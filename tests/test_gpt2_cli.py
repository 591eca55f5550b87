"""``torchlens-edu generate``: run in-process through the real CLI dispatcher."""

from __future__ import annotations

import json

import pytest
import torch

from support import hf_checkpoints as hfc
from torchlens_edu.cli import main
from torchlens_edu.models import GPT2, get_tokenizer

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bpe_model_dir(tmp_path_factory):
    """A tiny random checkpoint with GPT-2's full vocabulary, so the BPE tokenizer fits it."""
    hf = hfc.hf_model("2L-32C-2h", vocab_size=50257, n_embd=16, n_positions=32)
    return hfc.save_safetensors(hf, tmp_path_factory.mktemp("bpe") / "model")


@pytest.fixture(scope="module")
def char_model_dir(tmp_path_factory):
    """A tiny random checkpoint with its own character tokenizer.json."""
    hf = hfc.hf_model("2L-32C-2h", vocab_size=6)
    d = hfc.save_safetensors(hf, tmp_path_factory.mktemp("chars") / "model")
    (d / "tokenizer.json").write_text(json.dumps({"type": "chars",
                                                  "vocab": [" ", "a", "b", "c", "d", "!"]}))
    return d


def _generate(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_greedy_output_is_the_models_continuation(bpe_model_dir, capsys):
    code, out, err = _generate(capsys, "Hello world", "--model", str(bpe_model_dir),
                               "--max-new-tokens", "8", "--temperature", "0", "--device", "cpu")
    assert code == 0, err
    tok = get_tokenizer("gpt2")
    model = GPT2.from_pretrained(bpe_model_dir, progress=False)
    prompt = tok.encode("Hello world")
    new = model.generate(torch.tensor([prompt]), 8, temperature=0)[0, len(prompt):].tolist()
    assert out == "Hello world" + tok.decode(new) + "\n"
    assert "8 tokens in" in err


def test_seed_makes_sampling_reproducible(bpe_model_dir, capsys):
    argv = ("Once", "--model", str(bpe_model_dir), "--max-new-tokens", "6", "--seed", "3",
            "--temperature", "1.0", "--top-k", "0")
    first = _generate(capsys, *argv)
    second = _generate(capsys, *argv)
    assert first[0] == second[0] == 0 and first[1] == second[1]


def test_char_model_uses_its_own_tokenizer(char_model_dir, capsys):
    code, out, err = _generate(capsys, "abc", "--model", str(char_model_dir),
                               "--max-new-tokens", "5", "--temperature", "0")
    assert code == 0, err
    assert out.startswith("abc") and len(out.rstrip("\n")) == 8
    assert set(out.rstrip("\n")) <= set(" abcd!")


def test_default_model_falls_back_to_embedded_with_a_notice(char_model_dir, capsys, monkeypatch,
                                                           tmp_path):
    from torchlens_edu.models import tokenizer

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: no real gpt2
    monkeypatch.setattr(tokenizer, "EMBEDDED_DIR", char_model_dir)
    code, out, err = _generate(capsys, "ab", "--max-new-tokens", "3", "--seed", "0")
    assert code == 0, err
    assert "note:" in err and "embedded" in err
    assert out.startswith("ab")


def test_errors_are_one_clear_line_and_exit_code_1(char_model_dir, tmp_path, capsys,
                                                  monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    code, _, err = _generate(capsys, "hi", "--model", str(tmp_path / "missing.safetensors"))
    assert code == 1 and "error:" in err and "no such file" in err
    code, _, err = _generate(capsys, "xyz", "--model", str(char_model_dir))
    assert code == 1 and "not in the" in err
    code, _, err = _generate(capsys, "hi", "--model", "gpt2")  # offline, empty cache
    assert code == 1 and "huggingface-cli download gpt2" in err
    code, _, err = _generate(capsys, "hi", "--temperature", "-1")
    assert code == 2 and "argument --temperature: must be a finite number >= 0" in err


def test_gpt2_tokenizer_on_a_small_vocab_model_is_refused(tmp_path, capsys):
    d = hfc.save_safetensors(hfc.hf_model("1L-64C-1h"), tmp_path / "m")  # vocab 64, no tokenizer
    code, _, err = _generate(capsys, "Hello", "--model", str(d))
    assert code == 1 and "knows only 64 tokens" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda(char_model_dir, capsys):
    code, _, err = _generate(capsys, "ab", "--model", str(char_model_dir), "--device", "cuda")
    assert code == 1 and "CUDA is not available" in err


def test_empty_prompt_starts_after_endoftext(bpe_model_dir, capsys):
    code, out, err = _generate(capsys, "", "--model", str(bpe_model_dir), "--max-new-tokens", "3",
                               "--temperature", "0")
    assert code == 0, err
    assert out.endswith("\n")
