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
