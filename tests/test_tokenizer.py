"""Tokenizers: exact GPT-2 BPE offline, verified vocabulary files, character tokenizers."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from torchlens_edu.models import get_tokenizer
from torchlens_edu.models import tokenizer as tokmod
from torchlens_edu.models.tokenizer import CharTokenizer, GPT2Tokenizer

KARPATHY = "Hello!! I'm Andrej Karpathy. It's 2022. w00t :D 🤗"
KARPATHY_IDS = [15496, 3228, 314, 1101, 10948, 73, 509, 5117, 10036, 13, 632, 338, 33160, 13,
                266, 405, 83, 1058, 35, 12520, 97, 245]


def test_gpt2_test_vector():
    tok = get_tokenizer()
    assert tok.encode(KARPATHY) == KARPATHY_IDS
    assert tok.decode(KARPATHY_IDS) == KARPATHY
    assert (tok.name, tok.vocab_size) == ("gpt2", 50257)


def test_more_vectors():
    tok = get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.encode("") == []
    assert tok.decode_piece(12520) == b" \xf0\x9f"  # " " + half of 🤗: tokens are bytes


def test_endoftext_in_text_is_plain_text():
    tok = get_tokenizer()
    ids = tok.encode("a<|endoftext|>b")
    assert tok.eot_token not in ids
    assert tok.decode(ids) == "a<|endoftext|>b"
    assert tok.decode([tok.eot_token]) == "<|endoftext|>"


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_gpt2_round_trips_any_unicode(text):
    tok = get_tokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_encoding_is_cached():
    assert get_tokenizer()._enc is get_tokenizer("gpt2-xl")._enc


def test_offline_and_no_tiktoken_download_cache(monkeypatch, tmp_path):
    # Build from our files with a poisoned download cache: nothing may be fetched or cached.
    vocab = tmp_path / "vocab"
    shutil.copytree(tokmod.GPT2_VOCAB_DIR, vocab)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    tok = GPT2Tokenizer(vocab)
    assert tok.encode(KARPATHY) == KARPATHY_IDS
    assert not (tmp_path / "cache").exists()
    assert tokmod.os.environ["TIKTOKEN_CACHE_DIR"] == str(tmp_path / "cache")  # restored


def test_corrupted_vocabulary_is_refused(tmp_path):
    vocab = tmp_path / "vocab"
    shutil.copytree(tokmod.GPT2_VOCAB_DIR, vocab)
    with open(vocab / "vocab.bpe", "ab") as f:
        f.write(b"x y\n")
    with pytest.raises(ValueError, match=r"vocab\.bpe is corrupted: sha256"):
        GPT2Tokenizer(vocab)
    (vocab / "encoder.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"encoder\.json is missing"):
        GPT2Tokenizer(vocab)


def test_shipped_files_match_their_recorded_hashes():
    import hashlib

    for name, expected in tokmod.GPT2_VOCAB_SHA256.items():
        data = (tokmod.GPT2_VOCAB_DIR / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == expected


# ------------------------------------------------------------------------------ characters


@pytest.fixture
def char_dir(tmp_path):
    """A model directory whose tokenizer.json is the agreed character format."""
    d = tmp_path / "charmodel"
    d.mkdir()
    spec = {"type": "chars", "vocab": ["\n", " ", "a", "b", "c", "é", "?"], "note": "test"}
    (d / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return d


def test_char_tokenizer_from_directory(char_dir):
    tok = get_tokenizer(char_dir)
    assert isinstance(tok, CharTokenizer) and tok.name == "charmodel" and tok.vocab_size == 7
    assert tok.encode("abc é\n") == [2, 3, 4, 1, 5, 0]
    assert tok.decode([2, 3, 4, 1, 5, 0]) == "abc é\n"
    # a weights file inside the directory finds the same tokenizer
    (char_dir / "model.safetensors").touch()
    assert get_tokenizer(char_dir / "model.safetensors").vocab == tok.vocab


def test_embedded_tokenizer(char_dir, monkeypatch):
    monkeypatch.setattr(tokmod, "EMBEDDED_DIR", char_dir)
    tok = get_tokenizer("embedded")
    assert tok.name == "embedded" and tok.decode(tok.encode("cab")) == "cab"
    monkeypatch.setattr(tokmod, "EMBEDDED_DIR", char_dir / "missing")
    with pytest.raises(FileNotFoundError, match="embedded model's tokenizer"):
        get_tokenizer("embedded")


def test_char_tokenizer_errors(char_dir):
    tok = get_tokenizer(char_dir)
    with pytest.raises(ValueError, match="characters 'xz' are not in"):
        tok.encode("axz")
    with pytest.raises(ValueError, match=r"outside the vocabulary 0\.\.6"):
        tok.decode([7])
    assert CharTokenizer(vocab=("a", "?"), unk="?").encode("ab") == [0, 1]
    with pytest.raises(ValueError, match="distinct single characters"):
        CharTokenizer(vocab=("a", "a"))


def test_hf_tokenizer_json_means_gpt2_bpe(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {}}))
    assert isinstance(get_tokenizer(tmp_path), GPT2Tokenizer)


def test_bad_names_and_files(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer 'llama'"):
        get_tokenizer("llama")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the tokenizer description"):
        CharTokenizer.from_file(bad)
    bad.write_text('{"type": "bpe"}')
    with pytest.raises(ValueError, match="is not a character tokenizer"):
        CharTokenizer.from_file(bad)


# ------------------------------------------------------------------------------ a model's own


def test_a_loaded_model_hands_out_its_own_tokenizer(char_dir, tmp_path):
    from safetensors.torch import save_file

    from torchlens_edu.models import GPT2, GPT2Config

    embedded = GPT2.from_pretrained("embedded", progress=False)
    assert embedded.name_or_path == "embedded" and get_tokenizer(embedded).name == "embedded"
    # a directory with weights and a character tokenizer.json
    model = GPT2(GPT2Config(vocab_size=7, n_positions=16, n_embd=64, n_layer=1, n_head=1))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()
               if k != "lm_head.weight"}, char_dir / "model.safetensors")
    loaded = GPT2.from_pretrained(char_dir / "model.safetensors", progress=False)
    tok = get_tokenizer(loaded)
    assert isinstance(tok, CharTokenizer) and tok.vocab_size == 7
    # a model built from GPT-2's config uses GPT-2's BPE; any other has no tokenizer of its own
    assert isinstance(get_tokenizer(GPT2(GPT2Config(n_layer=1, n_embd=64, n_head=1))),
                      GPT2Tokenizer)
    with pytest.raises(ValueError, match=r"built from a config with vocab_size=7, not loaded "
                                         r"from weights.*BPE has 50257 tokens"):
        get_tokenizer(model)
    with pytest.raises(TypeError, match=r"expects a model .* got int"):
        get_tokenizer(3)


def test_a_tokenizer_bigger_than_the_model_is_refused(char_dir):
    from safetensors.torch import save_file

    from torchlens_edu.models import GPT2, GPT2Config

    model = GPT2(GPT2Config(vocab_size=5, n_positions=16, n_embd=64, n_layer=1, n_head=1))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()
               if k != "lm_head.weight"}, char_dir / "model.safetensors")
    loaded = GPT2.from_pretrained(char_dir, progress=False)
    with pytest.raises(ValueError, match=r"has 7 tokens, more than the model's vocabulary of 5: "
                                         "it is not this model's tokenizer"):
        get_tokenizer(loaded)


def test_readme_gpt2_snippet_runs_with_the_embedded_model(capsys):
    """The README says the snippet also takes "embedded": it must run as written with it."""
    import re
    from pathlib import Path

    import torch

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("### A readable GPT-2 that loads the real weights", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'GPT2.from_pretrained("gpt2"' in code and "get_tokenizer(model)" in code
    code = code.replace('GPT2.from_pretrained("gpt2"', 'GPT2.from_pretrained("embedded"')
    exec(compile(code, "README.md", "exec"), {"torch": torch})
    printed = capsys.readouterr().out
    assert printed.startswith("The meaning of life is") and len(printed) > 30
