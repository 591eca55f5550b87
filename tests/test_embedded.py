"""The embedded model: shipped in Hugging Face layout, loaded through the real GPT-2 code path,
and trained enough that its attention has structure worth looking at."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F

from torchlens_edu.commands.demo import TEMPERATURE, TOP_K
from torchlens_edu.models import GPT2, get_tokenizer
from torchlens_edu.models.analysis import attention_weights, induction_head, previous_token_head
from torchlens_edu.models.tokenizer import EMBEDDED_DIR

SENTENCE = ("It is a truth universally acknowledged, that a single man in possession of a good "
            "fortune, must be in want of a wife.")
OPENING = "It is a truth universally acknowledged, that a single man"  # fits the context of 64


@pytest.fixture(scope="module")
def model() -> GPT2:
    return GPT2.from_pretrained("embedded", progress=False)


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer("embedded")


def test_files_are_hugging_face_layout_and_small() -> None:
    from safetensors import safe_open

    config = json.loads((EMBEDDED_DIR / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["activation_function"] == "gelu_new"
    total = sum(f.stat().st_size for f in EMBEDDED_DIR.iterdir())
    assert total <= 10 * 2**20, f"embedded model is {total / 2**20:.1f} MiB, limit 10 MiB"
    with safe_open(str(EMBEDDED_DIR / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        c_attn = f.get_slice("transformer.h.0.attn.c_attn.weight").get_shape()
    assert "lm_head.weight" not in keys  # tied, as Hugging Face saves GPT-2
    assert c_attn == [config["n_embd"], 3 * config["n_embd"]]  # Conv1D layout: (in, out)


def test_loads_with_its_tokenizer(model: GPT2, tok) -> None:
    assert model.config.vocab_size == tok.vocab_size
    assert tok.decode(tok.encode(SENTENCE)) == SENTENCE
    assert not model.training


@pytest.mark.slow
def test_agrees_with_hugging_face(model: GPT2, tok) -> None:
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(EMBEDDED_DIR, attn_implementation="eager").eval()
    idx = torch.tensor([tok.encode(OPENING)])
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)).abs().max() < 1e-4


def test_has_a_previous_token_head(model: GPT2, tok) -> None:
    att = attention_weights(model, torch.tensor([tok.encode(OPENING)]))[:, 0]  # (L, nh, T, T)
    layer, head, score = previous_token_head(att)  # mean weight of query t on key t - 1
    assert score > 0.5, f"best previous-token head h.{layer} head {head}: {score:.2f}"


@pytest.fixture(scope="module")
def words() -> list[str]:
    return (EMBEDDED_DIR / "words.txt").read_text().split()


def _repeated_random_letters(tok, seed: int, n: int = 32) -> torch.Tensor:
    """A random string of letters and spaces (unpredictable), then the same string again."""
    letters = torch.tensor(tok.encode(" abcdefghijklmnopqrstuvwxyz"))
    s = letters[torch.randint(len(letters), (n,), generator=torch.Generator().manual_seed(seed))]
    return torch.cat([s, s])[None]  # (1, 2n): the default fills the context of 64


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_induction_second_copy_is_predicted(model: GPT2, tok, seed: int) -> None:
    idx = _repeated_random_letters(tok, seed)
    n = idx.shape[1] // 2
    with torch.no_grad():
        loss = F.cross_entropy(model(idx)[0, :-1], idx[0, 1:], reduction="none")  # (2n-1,)
    first, second = loss[: n - 1].mean(), loss[n:].mean()
    # the first copy costs about log(27) = 3.3 nats a letter; the second can be copied
    assert second < 0.25 * first, f"loss first copy {first:.2f}, second copy {second:.2f}"


def test_has_an_induction_head(model: GPT2, tok) -> None:
    # on a random string seen twice, query n + i looks at i + 1: the token after the earlier copy
    layer, head, score = induction_head(model, tok)
    assert score > 0.5, f"best induction head h.{layer} head {head}: {score:.2f}"


def test_generates_real_words(model: GPT2, tok, words: list[str]) -> None:
    vocabulary = set(words)
    ctx = model.config.n_positions

    def known_share(temperature: float, seed: int | None, top_k: int | None = None) -> float:
        generated = []
        for prompt in ("Elizabeth", "Mr. Darcy", "She was"):  # each fills the context
            out = model.generate(torch.tensor([tok.encode(prompt)]), ctx,
                                 temperature=temperature, seed=seed, top_k=top_k)
            assert out.shape[1] == ctx  # generation stops when the context is full
            text = tok.decode(out[0].tolist())
            generated += re.findall(r"[a-z]+", text.lower())[:-1]  # the last may be cut short
        assert len(generated) > 15, generated
        return sum(w in vocabulary for w in generated) / len(generated)

    assert known_share(0, None) > 0.8  # greedy
    # a share over four seeds, so one unlucky draw does not decide
    sampled = [known_share(0.8, seed) for seed in range(4)]
    assert sum(sampled) / len(sampled) > 0.8, sampled
    # as the demo samples: the README says "real words" for this temperature
    demo = [known_share(TEMPERATURE, seed, top_k=TOP_K) for seed in range(4)]
    assert sum(demo) / len(demo) > 0.9, demo


def test_sizes_are_distinct_so_every_dim_has_one_name(model: GPT2) -> None:
    from torchlens_edu.dims import Dims

    dims = Dims.infer(model)
    assert dict(dims) == {"C": 128, "nh": 4, "V": 81, "ctx": 64, "hs": 32, "3C": 384, "4C": 512}
    assert len(set(dims.values())) == len(dims)  # (4 layers too: no shape has a layer axis)


@pytest.mark.parametrize("ops", [False, True])
def test_traces_of_the_embedded_model_have_no_ambiguous_label(model: GPT2, tok, ops: bool) -> None:
    import torchlens_edu as tle

    idx = torch.tensor([tok.encode("Hello, Emma")])  # (B=1, T=11)
    trace = tle.trace_shapes(model, idx, ops=ops)
    labels = [label for event in trace.to_dict()["events"]
              for side in ("inputs", "outputs") for shape in event["dims"][side]
              for label in shape]
    assert "C=128" in labels and "T=11" in labels and ("ctx=64" in labels) == ops  # wpe.weight
    assert [label for label in labels if "|" in label] == []
    text = trace.to_text(width=400)
    assert "|" not in "".join(re.findall(r"\((?:[^()]*=[^()]*)\)", text))  # no "(128:C|ctx"
    tree = str(tle.inspect(model))
    assert "· weight (ctx=64, C=128)" in tree and "|" not in tree
