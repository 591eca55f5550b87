"""Loading Hugging Face checkpoints: parity with transformers, every layout, every bad file."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from support import hf_checkpoints as hfc
from torchlens_edu.models import GPT2, GPT2Config
from torchlens_edu.models.devices import DeviceUnavailableError, resolve_device
from torchlens_edu.models.loading import (
    CheckpointError,
    WeightsNotFoundError,
    config_from_hf,
    load_pretrained,
)
from torchlens_edu.models.offline import load_best_available

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_models():
    """shape name -> random HF GPT2LMHeadModel (built once per module: transformers is slow)."""
    return {shape: hfc.hf_model(shape, seed=i) for i, shape in enumerate(hfc.SHAPES)}


@pytest.fixture(scope="module")
def saved(hf_models, tmp_path_factory):
    """(shape, "safetensors" | "bin") -> checkpoint directory."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for shape, model in hf_models.items():
        out[shape, "safetensors"] = hfc.save_safetensors(model, root / f"{shape}-st")
        out[shape, "bin"] = hfc.save_bin(model, root / f"{shape}-bin")
    return out


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache, offline."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _ids(config, B=2, T=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (B, T), generator=generator)


def _max_diff(ours, hf, ids):
    with torch.no_grad():
        return (ours(ids) - hf(ids).logits).abs().max().item()


# ------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("impl", ["explicit", "sdpa"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("shape", list(hfc.SHAPES))
def test_logits_match_transformers(hf_models, saved, shape, fmt, impl):
    ours = GPT2.from_pretrained(saved[shape, fmt], progress=False).with_attn_impl(impl)
    hf = hf_models[shape]
    assert ours.config.n_inner == hf.config.n_inner
    assert ours.config.layer_norm_epsilon == hf.config.layer_norm_epsilon
    assert _max_diff(ours, hf, _ids(ours.config)) < 1e-4


def test_loaded_model_is_eval_tied_and_fully_materialised(saved):
    m = GPT2.from_pretrained(saved["2L-32C-2h", "safetensors"], progress=False)
    assert not m.training
    assert m.lm_head.weight is m.transformer.wte.weight
    assert not any(p.is_meta for p in m.parameters())
    assert all(p.is_contiguous() and p.dtype == torch.float32 for p in m.parameters())
    loss = m(_ids(m.config)).logsumexp(-1).mean()
    loss.backward()  # the tie survives training: one gradient for the shared matrix
    assert m.lm_head.weight.grad is m.transformer.wte.weight.grad


def test_greedy_generation_matches_transformers(hf_models, saved):
    hf = hf_models["2L-32C-2h"]
    ours = GPT2.from_pretrained(saved["2L-32C-2h", "safetensors"], progress=False)
    prompt = _ids(ours.config, B=2, T=5, seed=3)
    expected = hf.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    for impl in ("explicit", "sdpa"):
        got = ours.with_attn_impl(impl).generate(prompt, 20, temperature=0)
        assert torch.equal(got, expected), impl


@pytest.mark.parametrize("impl", ["explicit", "sdpa"])
def test_kv_cache_generation_equals_no_cache(saved, impl):
    m = GPT2.from_pretrained(saved["3L-48C-4h-inner80", "bin"], progress=False)
    m.with_attn_impl(impl)
    prompt = _ids(m.config, B=2, T=4, seed=5)
    greedy = m.generate(prompt, 20, temperature=0)
    assert torch.equal(greedy, m.generate(prompt, 20, temperature=0, use_cache=False))
    sampled = m.generate(prompt, 20, temperature=1.0, top_k=10, seed=7)
    assert torch.equal(sampled, m.generate(prompt, 20, temperature=1.0, top_k=10, seed=7,
                                           use_cache=False))


def test_dtype_bfloat16(saved, hf_models):
    m = GPT2.from_pretrained(saved["2L-32C-2h", "safetensors"], dtype=torch.bfloat16,
                             progress=False)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert m.lm_head.weight is m.transformer.wte.weight
    ids = _ids(m.config)
    with torch.no_grad():
        ref = hf_models["2L-32C-2h"](ids).logits
        assert (m(ids).float() - ref).abs().max() < 0.1


# ------------------------------------------------------------------------------ layouts


def test_fake_hub_cache_offline(hf_models, hub_cache):
    hfc.fake_hub_cache(hf_models["2L-32C-2h"], hub_cache, "gpt2")
    m = GPT2.from_pretrained("gpt2", progress=False)
    assert _max_diff(m, hf_models["2L-32C-2h"], _ids(m.config)) < 1e-4


def test_fake_hub_cache_repo_id_and_bin(hf_models, hub_cache):
    hfc.fake_hub_cache(hf_models["1L-64C-1h"], hub_cache, "openai-community/gpt2", fmt="bin")
    m = GPT2.from_pretrained("openai-community/gpt2", progress=False)
    assert _max_diff(m, hf_models["1L-64C-1h"], _ids(m.config)) < 1e-4


def test_single_file_infers_config_from_shapes(hf_models, tmp_path):
    # GPT-2's heads are 64 wide: n_embd=64 -> one head, as this model has
    hf = hf_models["1L-64C-1h"]
    hf.save_pretrained(tmp_path / "full")
    lonely = tmp_path / "weights.safetensors"
    lonely.write_bytes((tmp_path / "full" / "model.safetensors").read_bytes())
    m = GPT2.from_pretrained(lonely, progress=False)
    assert (m.config.n_layer, m.config.n_head, m.config.n_embd) == (1, 1, 64)
    assert (m.config.vocab_size, m.config.n_positions) == (64, 32)
    assert _max_diff(m, hf, _ids(m.config)) < 1e-4


def test_single_file_uses_neighbouring_config_or_explicit_config(saved, hf_models, tmp_path):
    bin_file = saved["3L-48C-4h-inner80", "bin"] / "pytorch_model.bin"
    m = GPT2.from_pretrained(bin_file, progress=False)  # config.json beside it: 4 heads
    assert m.config.n_head == 4 and m.config.n_inner == 80
    lonely = tmp_path / "w.bin"
    lonely.write_bytes(bin_file.read_bytes())
    with pytest.raises(CheckpointError, match="cannot infer the number of heads"):
        load_pretrained(GPT2, lonely, progress=False)  # n_embd=48: no 64-wide heads
    config = config_from_hf(saved["3L-48C-4h-inner80", "bin"] / "config.json")
    m = load_pretrained(GPT2, lonely, progress=False, config=config)
    assert _max_diff(m, hf_models["3L-48C-4h-inner80"], _ids(m.config)) < 1e-4


def test_our_own_state_dict_loads_without_transposes(tiny_gpt2, tiny_ids, tmp_path):
    from safetensors.torch import save_file

    state = {k: v for k, v in tiny_gpt2.state_dict().items() if k != "lm_head.weight"}
    save_file(state, tmp_path / "ours.safetensors")
    m = load_pretrained(GPT2, tmp_path / "ours.safetensors", progress=False,
                        config=tiny_gpt2.config)
    with torch.no_grad():
        assert torch.equal(m(tiny_ids), tiny_gpt2(tiny_ids))


def test_embedded_name_resolves_to_package_dir(hf_models, tmp_path, monkeypatch):
    from torchlens_edu.models import tokenizer

    embedded = hfc.save_safetensors(hf_models["2L-32C-2h"], tmp_path / "embedded")
    monkeypatch.setattr(tokenizer, "EMBEDDED_DIR", embedded)
    m = GPT2.from_pretrained("embedded", progress=False)
    assert _max_diff(m, hf_models["2L-32C-2h"], _ids(m.config)) < 1e-4


def test_progress_bar_is_transient(saved, capsys):
    GPT2.from_pretrained(saved["2L-32C-2h", "safetensors"], progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "loading" not in err


# ------------------------------------------------------------------------------ best available


def test_best_available_prefers_cached_gpt2(hf_models, hub_cache):
    hfc.fake_hub_cache(hf_models["2L-32C-2h"], hub_cache, "gpt2")
    model, tok, notice = load_best_available(device="cpu", progress=False)
    assert notice is None and tok.name == "gpt2" and model.config.n_embd == 32


def test_best_available_falls_back_to_embedded_then_random(hf_models, hub_cache, tmp_path,
                                                           monkeypatch):
    from torchlens_edu.models import offline, tokenizer

    embedded = hfc.save_safetensors(hf_models["2L-32C-2h"], tmp_path / "embedded")
    (embedded / "tokenizer.json").write_text('{"type": "chars", "vocab": ["a", "b", " "]}')
    monkeypatch.setattr(tokenizer, "EMBEDDED_DIR", embedded)
    model, tok, notice = load_best_available(device="cpu", progress=False)
    assert "embedded" in notice and tok.name == "embedded" and model.config.vocab_size == 100

    monkeypatch.setattr(tokenizer, "EMBEDDED_DIR", tmp_path / "nothing")
    monkeypatch.setattr(offline, "RANDOM_FALLBACK", GPT2Config(n_layer=1, n_head=2, n_embd=16))
    state = torch.random.get_rng_state()
    model, tok, notice = load_best_available(device="cpu", progress=False)
    assert torch.equal(state, torch.random.get_rng_state())  # the user's RNG is untouched
    assert "random" in notice and tok.name == "gpt2" and model.config.vocab_size == 50257
    again, _, _ = load_best_available(device="cpu", progress=False)
    assert torch.equal(model.transformer.wte.weight, again.transformer.wte.weight)  # seeded


# ------------------------------------------------------------------------------ errors


def test_offline_without_cache_says_how_to_get_weights(hub_cache):
    with pytest.raises(WeightsNotFoundError) as info:
        GPT2.from_pretrained("gpt2", progress=False)
    message = str(info.value)
    assert "huggingface-cli download gpt2" in message
    assert "HF_HUB_OFFLINE=0" in message
    assert "from_pretrained('embedded')" in message


def test_no_network_fails_fast(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError, match=r"unreachable.*huggingface-cli download"):
        GPT2.from_pretrained("gpt2", progress=False)
    assert time.perf_counter() - start < 10


def test_truncated_files(saved, tmp_path):
    for fmt, name in (("safetensors", "model.safetensors"), ("bin", "pytorch_model.bin")):
        src = saved["2L-32C-2h", fmt]
        bad = tmp_path / fmt
        bad.mkdir()
        (bad / "config.json").write_bytes((src / "config.json").read_bytes())
        data = (src / name).read_bytes()
        (bad / name).write_bytes(data[: len(data) * 2 // 3])
        with pytest.raises(CheckpointError, match="damaged or incomplete"):
            GPT2.from_pretrained(bad, progress=False)


def test_wrong_shapes_name_the_keys(saved, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    src = saved["2L-32C-2h", "safetensors"]
    (bad / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes())
    (bad / "config.json").write_bytes((src / "config.json").read_bytes())
    hfc.rewrite_config(bad, vocab_size=101, n_layer=3)
    with pytest.raises(CheckpointError) as info:
        GPT2.from_pretrained(bad, progress=False)
    message = str(info.value)
    assert "transformer.wte.weight: checkpoint (100, 32), model (101, 32)" in message
    assert "missing keys: transformer.h.2." in message


def test_missing_and_unexpected_keys_are_named(hf_models, tmp_path):
    from safetensors.torch import save_file

    hf = hf_models["2L-32C-2h"]
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    del state["transformer.h.1.mlp.c_fc.bias"]
    state["transformer.h.0.attn.rotary.weight"] = torch.zeros(3)
    bad = tmp_path / "bad"
    bad.mkdir()
    hf.config.to_json_file(bad / "config.json")
    save_file(state, bad / "model.safetensors")
    with pytest.raises(CheckpointError,
                       match=r"missing keys: transformer\.h\.1\.mlp\.c_fc\.bias.*"
                             r"unexpected keys: transformer\.h\.0\.attn\.rotary\.weight"):
        GPT2.from_pretrained(bad, progress=False)


def test_untied_lm_head_is_refused(hf_models, tmp_path):
    from safetensors.torch import save_file

    hf = hf_models["2L-32C-2h"]
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    state["lm_head.weight"] += 1
    bad = tmp_path / "bad"
    bad.mkdir()
    hf.config.to_json_file(bad / "config.json")
    save_file(state, bad / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"lm_head\.weight differs"):
        GPT2.from_pretrained(bad, progress=False)


class _RunsCode:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_that_is_not_weights_only_is_refused_without_running_it(saved, tmp_path):
    src = saved["2L-32C-2h", "bin"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_bytes((src / "config.json").read_bytes())
    state = torch.load(src / "pytorch_model.bin", weights_only=True)
    marker = tmp_path / "code-ran"
    state["payload"] = _RunsCode(marker)
    torch.save(state, bad / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="not a weights-only checkpoint"):
        GPT2.from_pretrained(bad, progress=False)
    assert not marker.exists()


@pytest.mark.parametrize(("change", "match"), [
    (dict(activation_function="relu"), "activation_function='relu'"),
    (dict(model_type="llama"), "'llama' model, not GPT-2"),
    (dict(scale_attn_by_inverse_layer_idx=True), "does not implement"),
])
def test_unsupported_configs(saved, tmp_path, change, match):
    src = saved["2L-32C-2h", "safetensors"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_bytes((src / "config.json").read_bytes())
    hfc.rewrite_config(bad, **change)
    with pytest.raises(CheckpointError, match=match):
        GPT2.from_pretrained(bad, progress=False)


def test_gelu_pytorch_tanh_and_n_ctx_are_accepted(saved, tmp_path):
    src = saved["2L-32C-2h", "safetensors"]
    (tmp_path / "config.json").write_bytes((src / "config.json").read_bytes())
    hfc.rewrite_config(tmp_path, activation_function="gelu_pytorch_tanh", n_positions=None,
                       n_ctx=48)
    config = config_from_hf(tmp_path / "config.json")
    assert config.n_positions == 48


def test_missing_paths_and_empty_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        GPT2.from_pretrained(tmp_path / "nope.safetensors", progress=False)
    with pytest.raises(CheckpointError, match="has no weights"):
        GPT2.from_pretrained(tmp_path, progress=False)


# ------------------------------------------------------------------------------ devices


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error(saved):
    with pytest.raises(DeviceUnavailableError, match=r"CUDA is not available.*device='cpu'"):
        resolve_device("cuda")
    with pytest.raises(DeviceUnavailableError):
        GPT2.from_pretrained(saved["2L-32C-2h", "safetensors"], device="cuda", progress=False)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a machine without MPS")
def test_mps_without_mps_is_a_clear_error():
    with pytest.raises(DeviceUnavailableError, match=r"'mps'.*not available"):
        resolve_device("mps")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_loading_matches_cpu(saved, hf_models):
    m = GPT2.from_pretrained(saved["2L-32C-2h", "safetensors"], device="cuda", progress=False)
    assert m.device.type == "cuda" and m.lm_head.weight is m.transformer.wte.weight
    ids = _ids(m.config)
    with torch.no_grad():
        ref = hf_models["2L-32C-2h"](ids).logits
        assert (m(ids.cuda()).cpu() - ref).abs().max() < 1e-3
    prompt = ids[:, :4].cuda()
    assert torch.equal(m.generate(prompt, 10, temperature=0),
                       m.generate(prompt, 10, temperature=0, use_cache=False))


# ------------------------------------------------------------------------------ every bad file


def _copy(saved, tmp_path, fmt="safetensors"):
    src = saved["2L-32C-2h", fmt]
    bad = tmp_path / "bad"
    bad.mkdir()
    for file in src.iterdir():
        (bad / file.name).write_bytes(file.read_bytes())
    return bad


def test_errors_users_catch_are_public():
    import torchlens_edu.models as models

    for name in ("CheckpointError", "WeightsNotFoundError", "DeviceUnavailableError"):
        assert name in models.__all__ and getattr(models, name).__doc__
    assert models.CheckpointError is CheckpointError
    assert models.WeightsNotFoundError is WeightsNotFoundError


@pytest.mark.parametrize("text", [b"hello there\n", b"<!DOCTYPE html>", b"",
                                  b"version https://git-lfs.github.com/spec/v1\n"])
def test_a_text_file_as_bin_names_the_file(tmp_path, text):
    weights = tmp_path / "pytorch_model.bin"
    weights.write_bytes(text)
    with pytest.raises(CheckpointError, match=rf"{weights} is not a PyTorch checkpoint: it starts "
                                              r"with b'.*not with the zip archive torch\.save"):
        GPT2.from_pretrained(weights, progress=False)


@pytest.mark.parametrize("head", [b"\x80\x02garbage", b"PK\x03\x04garbage"])
def test_a_broken_torch_file_is_damaged_not_code(tmp_path, head):
    weights = tmp_path / "pytorch_model.bin"
    weights.write_bytes(head)
    with pytest.raises(CheckpointError, match=rf"{weights} is damaged or incomplete"):
        GPT2.from_pretrained(weights, progress=False)


def test_config_json_holding_a_list(saved, tmp_path):
    bad = _copy(saved, tmp_path)
    (bad / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(CheckpointError, match=rf"{bad / 'config.json'} holds a JSON list, not "
                                              "the object of a model config"):
        GPT2.from_pretrained(bad, progress=False)


@pytest.mark.parametrize(("change", "words"), [
    (dict(n_head=0), r"n_head=0 must be a positive integer \(the number of attention heads\)"),
    (dict(vocab_size="abc"), "vocab_size='abc' must be an integer"),
    (dict(n_layer=2.5), "n_layer=2.5 must be an integer"),
    (dict(n_embd=True), "n_embd=True must be an integer"),
    (dict(n_head=3), "n_embd=32 must be divisible by n_head=3"),
    (dict(n_positions=None, n_ctx=-4), "n_ctx=-4 must be a positive integer"),
    (dict(resid_pdrop=1.5), r"resid_pdrop=1\.5 must be a probability in \[0, 1\)"),
    (dict(layer_norm_epsilon="tiny"), "layer_norm_epsilon='tiny' must be a number"),
    (dict(n_head=None), "lacks the field 'n_head'"),
])
def test_bad_config_values_name_the_file_and_key(saved, tmp_path, change, words):
    bad = _copy(saved, tmp_path)
    hfc.rewrite_config(bad, **change)
    config = bad / "config.json"
    with pytest.raises(CheckpointError, match=rf"^{config}:? {words}"):
        GPT2.from_pretrained(bad, progress=False)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_integer_weights_name_the_file_and_key(hf_models, tmp_path, fmt):
    from safetensors.torch import save_file

    hf = hf_models["2L-32C-2h"]
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    state["transformer.h.1.attn.c_attn.bias"] = state["transformer.h.1.attn.c_attn.bias"].int()
    bad = tmp_path / "bad"
    bad.mkdir()
    hf.config.to_json_file(bad / "config.json")
    weights = bad / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    if fmt == "safetensors":
        save_file(state, weights)
    else:
        torch.save(state, weights)
    with pytest.raises(CheckpointError, match=rf"^{weights} does not fit GPT2\(.*weights that are "
                                              r"not floating point: transformer\.h\.1\.attn\."
                                              r"c_attn\.bias: torch\.int32"):
        GPT2.from_pretrained(bad, progress=False)


def test_shape_and_key_errors_name_the_file(saved, tmp_path):
    bad = _copy(saved, tmp_path)
    hfc.rewrite_config(bad, vocab_size=101)
    with pytest.raises(CheckpointError, match=rf"^{bad / 'model.safetensors'} does not fit GPT2"):
        GPT2.from_pretrained(bad, progress=False)


def test_an_impossible_inferred_config_names_the_file(tmp_path):
    from safetensors.torch import save_file

    weights = tmp_path / "w.safetensors"  # embeddings only, no blocks: n_layer would be 0
    save_file({"wte.weight": torch.zeros(10, 64), "wpe.weight": torch.zeros(8, 64)}, weights)
    with pytest.raises(CheckpointError, match=rf"^{weights}: the config inferred from its tensor "
                                              r"shapes is impossible \(n_layer=0 must be"):
        GPT2.from_pretrained(weights, progress=False)
