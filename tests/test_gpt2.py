"""The readable GPT-2: presets, meta builds, both attention paths, KV cache, generation."""

from __future__ import annotations

import contextlib
import sys
import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from torchlens_edu.models import GPT2, GPT2Config, KVCache, explicit_attention

# Hugging Face's GPT2LMHeadModel.num_parameters() for the four OpenAI sizes (tied lm_head once).
OPENAI_SIZES = {
    "gpt2": ((12, 12, 768), 124_439_808),
    "gpt2-medium": ((24, 16, 1024), 354_823_168),
    "gpt2-large": ((36, 20, 1280), 774_030_080),
    "gpt2-xl": ((48, 25, 1600), 1_557_611_200),
}


@pytest.mark.parametrize("name", list(OPENAI_SIZES))
def test_presets_build_on_meta_with_exact_sizes(name):
    (n_layer, n_head, n_embd), n_params = OPENAI_SIZES[name]
    config = GPT2Config.preset(name)
    assert (config.n_layer, config.n_head, config.n_embd) == (n_layer, n_head, n_embd)
    assert (config.vocab_size, config.n_positions, config.layer_norm_epsilon) == (50257, 1024, 1e-5)
    with torch.device("meta"):
        model = GPT2(config)
    assert all(p.is_meta for p in model.parameters())
    assert model.num_params() == n_params
    assert model.lm_head.weight is model.transformer.wte.weight



def test_meta_model_runs_shape_only():
    with torch.device("meta"):
        model = GPT2(GPT2Config.preset("gpt2"))
    out = model(torch.zeros(1, 4, dtype=torch.long, device="meta"))
    assert out.shape == (1, 4, 50257) and out.is_meta


def test_hf_module_names(tiny_gpt2):
    names = {name for name, _ in tiny_gpt2.named_modules()}
    for name in ("transformer.wte", "transformer.wpe", "transformer.h.1.ln_1",
                 "transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj",
                 "transformer.h.1.ln_2", "transformer.h.1.mlp.c_fc", "transformer.h.1.mlp.c_proj",
                 "transformer.ln_f", "lm_head"):
        assert name in names


def _with_impl(model: GPT2, impl: str) -> GPT2:
    return model.with_attn_impl(impl)


def test_attention_paths_agree(tiny_gpt2, tiny_ids):
    explicit = _with_impl(tiny_gpt2, "explicit")(tiny_ids)
    sdpa = _with_impl(tiny_gpt2, "sdpa")(tiny_ids)
    assert (explicit - sdpa).abs().max() < 1e-5


@pytest.mark.parametrize("impl", ["explicit", "sdpa"])
def test_cache_in_chunks_equals_one_pass(tiny_gpt2, tiny_ids, impl):
    model = _with_impl(tiny_gpt2, impl)
    full = model(tiny_ids)  # (B, T, V)
    cache = KVCache(model.config, tiny_ids.shape[0], device=tiny_ids.device, dtype=torch.float32)
    parts = [model(tiny_ids[:, :3], cache), model(tiny_ids[:, 3:4], cache),
             model(tiny_ids[:, 4:], cache)]
    assert cache.length == tiny_ids.shape[1]
    assert (torch.cat(parts, dim=1) - full).abs().max() < 1e-5


def test_explicit_attention_context_forces_the_explicit_path(tiny_gpt2, tiny_ids, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the fused kernel ran inside explicit_attention()")

    expected = tiny_gpt2(tiny_ids)
    monkeypatch.setattr(F, "scaled_dot_product_attention", refuse)
    with explicit_attention():
        got = tiny_gpt2(tiny_ids)
    assert (got - expected).abs().max() < 1e-5
    with pytest.raises(AssertionError, match="fused kernel"):
        tiny_gpt2(tiny_ids)  # outside the block, auto takes the fast path again


@pytest.mark.parametrize("impl", ["explicit", "sdpa"])
def test_generation_with_and_without_cache(tiny_gpt2, tiny_ids, impl):
    model = _with_impl(tiny_gpt2, impl)
    for kwargs in (dict(temperature=0), dict(temperature=0.9, top_k=20, seed=11)):
        with_cache = model.generate(tiny_ids, 12, **kwargs)
        assert with_cache.shape == (2, 20)
        assert torch.equal(with_cache, model.generate(tiny_ids, 12, use_cache=False, **kwargs))


def test_sampling_controls(tiny_gpt2, tiny_ids):
    greedy = tiny_gpt2.generate(tiny_ids, 6, temperature=0)
    assert torch.equal(greedy, tiny_gpt2.generate(tiny_ids, 6, temperature=1.0, top_k=1, seed=0))
    a = tiny_gpt2.generate(tiny_ids, 6, seed=5)
    assert torch.equal(a, tiny_gpt2.generate(tiny_ids, 6, seed=5))
    state = torch.random.get_rng_state()
    tiny_gpt2.generate(tiny_ids, 3, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())  # a seed never touches global RNG


def test_generation_stops_cleanly_at_the_context(tiny_gpt2):
    ctx = tiny_gpt2.config.n_positions
    prompt = torch.zeros(1, ctx - 3, dtype=torch.long)
    assert tiny_gpt2.generate(prompt, 10, temperature=0).shape == (1, ctx)
    full = torch.zeros(1, ctx, dtype=torch.long)
    assert torch.equal(tiny_gpt2.generate(full, 5), full)


def test_int32_ids_work(tiny_gpt2, tiny_ids):
    assert (tiny_gpt2(tiny_ids.int()) - tiny_gpt2(tiny_ids)).abs().max() == 0


def test_clear_errors(tiny_gpt2, tiny_ids):
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):
        tiny_gpt2(tiny_ids[0])
    with pytest.raises(TypeError, match=r"use idx\.long\(\)"):
        tiny_gpt2(tiny_ids.float())
    with pytest.raises(TypeError, match=r"use idx\.long\(\)"):
        tiny_gpt2(tiny_ids.to(torch.uint8))
    with pytest.raises(TypeError, match="tensor of token ids"):
        tiny_gpt2([[1, 2]])
    with pytest.raises(ValueError, match="do not fit GPT-2's context of 64"):
        tiny_gpt2(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        next(tiny_gpt2.stream(tiny_ids, 2, temperature=-1))
    with pytest.raises(ValueError, match="top_k"):
        tiny_gpt2.generate(tiny_ids, 2, top_k=0)
    with pytest.raises(ValueError, match="divisible"):
        GPT2Config(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="unknown GPT-2 preset"):
        GPT2Config.preset("gpt3")


def test_training_step_reaches_every_parameter(tiny_ids):
    torch.manual_seed(0)
    model = GPT2(GPT2Config.preset("tiny", dropout=0.1)).train()
    logits = model(tiny_ids[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tiny_ids[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_last_only_logits_equal_the_last_position_of_the_full_logits(tiny_gpt2, tiny_ids):
    full = tiny_gpt2(tiny_ids)  # (B, T, V)
    last = tiny_gpt2(tiny_ids, last_only=True)  # (B, 1, V)
    assert last.shape == (tiny_ids.shape[0], 1, full.shape[-1])
    torch.testing.assert_close(last[:, 0], full[:, -1])


def _fused_kernel_refused(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the fused kernel ran while someone observed attention")

    monkeypatch.setattr(F, "scaled_dot_product_attention", refuse)


def test_hook_points_hold_nothing_and_show_the_attention_pattern(tiny_gpt2, tiny_ids):
    assert not any(".attn.q" in k or ".attn.att" in k for k in tiny_gpt2.state_dict())
    attn = tiny_gpt2.transformer.h[1].attn
    seen = {}
    handles = [getattr(attn, name).register_forward_hook(
        lambda m, a, out, name=name: seen.__setitem__(name, out)) for name in
        ("q", "k", "v", "scores", "att")]
    with torch.no_grad():
        tiny_gpt2(tiny_ids)
    for handle in handles:
        handle.remove()
    assert seen["q"].shape == seen["k"].shape == (2, 2, 8, 16)  # (B, nh, T, hs)
    assert seen["att"].shape == seen["scores"].shape == (2, 2, 8, 8)  # (B, nh, T, Tk)
    assert torch.allclose(seen["att"], seen["scores"].softmax(-1))
    assert torch.allclose(seen["att"].sum(-1), torch.ones(2, 2, 8))


def test_a_hook_point_hook_may_change_the_tensor(tiny_gpt2, tiny_ids):
    # TransformerLens-style patching: uniform attention over the visible keys in layer 0
    def uniform(module, args, att):
        return (att > 0).float() / (att > 0).sum(-1, keepdim=True)

    with torch.no_grad():
        before = tiny_gpt2(tiny_ids)
        handle = tiny_gpt2.transformer.h[0].attn.att.register_forward_hook(uniform)
        try:
            patched = tiny_gpt2(tiny_ids)
        finally:
            handle.remove()
    assert (patched - before).abs().max() > 1e-4  # an unpatched run is identical (0)


@pytest.mark.parametrize("observer", ["point hook", "point pre-hook", "global hook", "tracer",
                                      "function mode"])
def test_observers_get_the_explicit_path(tiny_gpt2, tiny_ids, monkeypatch, observer):
    expected = tiny_gpt2(tiny_ids)
    _fused_kernel_refused(monkeypatch)
    points = [block.attn.att for block in tiny_gpt2.transformer.h]  # each layer decides alone
    with contextlib.ExitStack() as stack:
        if observer == "point hook":
            for att in points:
                stack.callback(att.register_forward_hook(lambda *a: None).remove)
        elif observer == "point pre-hook":
            for att in points:
                stack.callback(att.register_forward_pre_hook(lambda *a: None).remove)
        elif observer == "global hook":
            stack.callback(nn.modules.module.register_module_forward_hook(lambda *a: None).remove)
        elif observer == "tracer":  # a debugger or coverage tool: sys.settrace
            previous = sys.gettrace()
            sys.settrace(lambda *a: None)
            stack.callback(sys.settrace, previous)
        else:
            stack.enter_context(_PassThrough())  # an op-level observer
        got = tiny_gpt2(tiny_ids)
    assert (got - expected).abs().max() < 1e-5


class _PassThrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_without_observers_the_fused_kernel_runs(tiny_gpt2, tiny_ids):
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(F, "scaled_dot_product_attention", counting)
        tiny_gpt2(tiny_ids)
        with torch.device("cpu"):  # a DeviceContext is a TorchFunctionMode that watches nothing
            tiny_gpt2(tiny_ids)
    assert len(calls) == 4  # two layers, two forwards


def test_explicit_attention_is_per_thread_and_restored_on_errors(tiny_gpt2, tiny_ids,
                                                                 monkeypatch):
    from torchlens_edu.models import gpt2 as gpt2_module

    inside, outside = threading.Event(), threading.Event()
    seen = []

    def other_thread():
        inside.wait(10)
        seen.append(gpt2_module._explicit.get())
        outside.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with explicit_attention():
        inside.set()
        outside.wait(10)
        assert gpt2_module._explicit.get()
    thread.join(10)
    assert seen == [False]  # the other thread kept the fast path
    with pytest.raises(KeyboardInterrupt), explicit_attention():
        raise KeyboardInterrupt
    assert not gpt2_module._explicit.get()


@pytest.mark.parametrize(("kwargs", "words"), [
    (dict(max_new_tokens=-5), "max_new_tokens=-5 must be an integer >= 0"),
    (dict(max_new_tokens=2.5), "max_new_tokens=2.5 must be an integer >= 0"),
    (dict(temperature=float("nan")), "temperature=nan must be a finite number >= 0"),
    (dict(temperature=float("inf")), "temperature=inf must be a finite number >= 0"),
    (dict(top_k=1.5), "top_k=1.5 must be a positive number"),
    (dict(seed=2**70), r"seed=1180591620717411303424 must be an integer in \[-2\*\*63, 2\*\*64\)"),
])
def test_generation_arguments_are_refused_at_the_call(tiny_gpt2, tiny_ids, kwargs, words):
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=words):
        tiny_gpt2.generate(tiny_ids, **kwargs)
    with pytest.raises(ValueError, match=words):
        tiny_gpt2.stream(tiny_ids, **kwargs)  # at the call, before any next()


def test_zero_new_tokens_is_the_prompt(tiny_gpt2, tiny_ids):
    assert torch.equal(tiny_gpt2.generate(tiny_ids, 0), tiny_ids)


def test_prompt_longer_than_the_context_is_an_error_not_the_prompt(tiny_gpt2):
    with pytest.raises(ValueError, match=r"the prompt has 70 tokens, more than the context of 64: "
                                         r"keep the last 64 with idx\[:, -64:\]"):
        tiny_gpt2.generate(torch.zeros(1, 70, dtype=torch.long), 5)


def test_empty_prompt_is_a_clear_error(tiny_gpt2):
    empty = torch.zeros(1, 0, dtype=torch.long)
    with pytest.raises(ValueError, match=r"no token ids \(shape \(1, 0\)\): give at least one"):
        tiny_gpt2.generate(empty, 5)
    with pytest.raises(ValueError, match="no token ids"):
        tiny_gpt2(empty)


@pytest.mark.parametrize(("bad", "shown"), [(256, 256), (50256, 50256), (-1, -1)])
def test_token_id_outside_the_vocabulary_names_both_sizes(tiny_gpt2, bad, shown):
    ids = torch.tensor([[1, 2, bad]])
    words = (rf"token id {shown} is outside this model's vocabulary of 256 ids \(0\.\.255\).*"
             r"use get_tokenizer\(model\)")
    with pytest.raises(ValueError, match=words):
        tiny_gpt2(ids)
    with pytest.raises(ValueError, match=words):
        tiny_gpt2.generate(ids.int(), 3)


def test_vocabulary_check_is_invisible_to_op_traces(tiny_gpt2, tiny_ids):
    class Names(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    with Names() as seen:
        tiny_gpt2(tiny_ids)
    assert "aminmax" not in seen.names and "embedding" in seen.names


@pytest.mark.parametrize(("kwargs", "words"), [
    (dict(n_head=0), r"n_head=0 must be a positive integer \(the number of attention heads\)"),
    (dict(vocab_size="abc"), "vocab_size='abc' must be a positive integer"),
    (dict(n_layer=-2), "n_layer=-2 must be a positive integer"),
    (dict(n_positions=True), "n_positions=True must be a positive integer"),
    (dict(n_embd=0), "n_embd=0 must be a positive integer"),
    (dict(n_inner=0), r"n_inner=0 must be a positive integer \(the MLP width"),
    (dict(n_embd=30, n_head=4), "n_embd=30 must be divisible by n_head=4"),
    (dict(dropout=1.0), r"dropout=1\.0 must be a probability in \[0, 1\)"),
    (dict(dropout=-0.1), r"dropout=-0\.1 must be a probability"),
    (dict(dropout=float("nan")), "dropout=nan must be a probability"),
    (dict(layer_norm_epsilon=0.0), "layer_norm_epsilon=0.0 must be a small positive number"),
    (dict(attn_impl="flash"), "attn_impl='flash': choose 'auto', 'explicit' or 'sdpa'"),
])
def test_config_validates_itself_naming_the_field(kwargs, words):
    with pytest.raises(ValueError, match="^GPT2Config: " + words):
        GPT2Config(**kwargs)


def test_init_scales_the_residual_projections_as_gpt2_does():
    """GPT-2 paper 2.3 (and nanoGPT): the projections into the residual stream get std
    0.02 / sqrt(2 * n_layer); every other matrix 0.02; biases 0; LayerNorms 1."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=8, n_head=4, n_embd=256, vocab_size=1000, n_positions=128)
    model = GPT2(config)
    residual_std = 0.02 / (2 * config.n_layer) ** 0.5  # 0.005
    params = dict(model.named_parameters())
    for suffix, std in (("attn.c_proj.weight", residual_std), ("mlp.c_proj.weight", residual_std),
                        ("attn.c_attn.weight", 0.02), ("mlp.c_fc.weight", 0.02),
                        ("wte.weight", 0.02), ("wpe.weight", 0.02)):
        weights = torch.cat([p.flatten() for name, p in params.items() if name.endswith(suffix)])
        assert weights.numel() >= 30_000  # the std within 2 % is 5 standard errors
        assert abs(weights.std().item() / std - 1) < 0.02, suffix
        assert abs(weights.mean().item()) < 0.05 * std, suffix
    assert all(p.abs().max() == 0 for name, p in params.items() if name.endswith(".bias")
               and not name.split(".")[-2].startswith("ln"))
    assert all(torch.all(p == 1) for name, p in params.items() if name.endswith("ln_1.weight"))
