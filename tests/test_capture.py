"""capture() / ActivationCache: shapes equal the real ones on the zoo, gradients, the memory
estimate and limit, in-place edits, and the table."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import torchlens_edu as tle
import torchlens_edu.capture
import torchlens_edu.shapes
from support.zoo import ZOO, ZOO_BY_NAME, ModelGuard, ZooEntry, reference_outputs
from torchlens_edu._core.tree import iter_tensors
from torchlens_edu.capture import CaptureTooLarge, capture, parse_bytes

# every module's values, cloned and compared: about 3 s of CPU on the two GPT-2s
_SLOW_TO_CAPTURE = {"hf_gpt2", "gpt2_ours"}


@pytest.mark.parametrize("entry", [
    pytest.param(e, id=e.name, marks=[pytest.mark.slow] if e.name in _SLOW_TO_CAPTURE else [])
    for e in ZOO])
def test_captured_shapes_and_values_equal_the_real_ones(entry: ZooEntry) -> None:
    model = entry.build_or_skip()
    real = {(path, call): outs for path, call, outs in reference_outputs(model, entry)}
    guard = ModelGuard(model)
    with torch.no_grad(), tle.inspect(model).capture("*", clone=True) as cache:
        out = entry.run(model)
    assert set(cache) == set(real)
    for key, tensors in real.items():
        got = list(iter_tensors(cache[key]))
        assert [t.shape for t in got] == [t.shape for t in tensors], key
        for a, b in zip(got, tensors, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert "ActivationCache" in repr(cache)
    guard.check(out)


@pytest.mark.parametrize("name", ["gpt2_ours", "hf_llama", "lstm", "mlp_twice"])
def test_gradients_match_autograd(name: str) -> None:
    entry = ZOO_BY_NAME[name]
    model = entry.build_or_skip()
    guard = ModelGuard(model)
    with capture(model, "*", grads=True, detach=False) as cache:
        out = entry.run(model)
        logits = next(iter_tensors(out))
        loss = logits.float().pow(2).mean()
        keys = [k for k in cache if next(iter_tensors(cache[k])).requires_grad][:6]
        wanted = [next(iter_tensors(cache[k])) for k in keys]
        expected = torch.autograd.grad(loss, wanted, retain_graph=True, allow_unused=True)
        loss.backward()
    for key, ref in zip(keys, expected, strict=True):
        got = next(iter_tensors(cache.activation(*key).grad))
        if ref is None:
            assert got is None
        else:
            torch.testing.assert_close(got, ref)
    assert "max|g|" in repr(cache)
    guard.check(out)


def test_cache_access_by_path_and_call() -> None:
    entry = ZOO_BY_NAME["mlp_twice"]
    model = entry.build()
    with capture(model, "block", inputs=True) as cache:
        x = entry.inputs()[0][0]
        model(x)
    assert cache.keys() == [("block", 0), ("block", 1)]
    assert "block" in cache and ("block", 1) in cache and ("out", 0) not in cache
    with pytest.raises(KeyError, match=r"ran 2 times.*cache\['block', 0\]"):
        cache["block"]
    assert torch.equal(cache.inputs("block", 0)[0][0], x)
    assert torch.equal(cache.inputs("block", 1)[0][0], cache["block", 0])
    with pytest.raises(KeyError, match="Did you mean block"):
        cache["blok"]
    with pytest.raises(KeyError, match=r"calls 0\.\.1"):
        cache["block", 5]
    assert list(cache.to_dict()) == ["block#0", "block#1"]
    assert cache.paths() == ["block"]


def test_the_cache_holds_the_latest_forward() -> None:
    model = ZOO_BY_NAME["gpt2_ours"].build()
    with capture(model, "transformer.h.0") as cache:
        model(torch.zeros(1, 3, dtype=torch.long))
        model(torch.zeros(2, 5, dtype=torch.long))
    assert cache.forwards == 2 and len(cache) == 1
    assert cache["transformer.h.0"].shape == (2, 5, 32)


def test_named_dims_in_the_table() -> None:
    model = ZOO_BY_NAME["gpt2_ours"].build()
    with capture(model, "transformer.h.0.mlp.c_fc") as cache:
        model(torch.zeros(2, 8, dtype=torch.long))
    text = repr(cache)
    assert "(B=2, T=8, 4C=128)" in text and "NaN/Inf" in text
    assert "ActivationCache: 1 calls" in text


def test_nan_and_inf_are_counted_in_the_table() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Softplus())
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))
    with capture(model, "0") as cache:
        model(torch.ones(3, 2))
    row = next(line for line in repr(cache).splitlines() if line.startswith("0 "))
    assert row.split("│")[-1].strip() == "6"


def test_memory_is_estimated_from_a_meta_run_and_cached() -> None:
    model = ZOO_BY_NAME["gpt2_ours"].build()
    ids = torch.zeros(2, 8, dtype=torch.long)
    with capture(model, "transformer.h.*") as cache:
        model(ids)
    assert cache.estimate == cache.nbytes > 0
    calls = []
    real = torchlens_edu.capture.meta_twin
    try:
        torchlens_edu.capture.meta_twin = lambda *a, **k: calls.append(1) or real(*a, **k)
        with capture(model, "transformer.h.*") as again:
            model(ids)
    finally:
        torchlens_edu.capture.meta_twin = real
    assert calls == [] and again.estimate == cache.estimate  # same shapes: no second meta run
    with capture(model, "transformer.h.*", grads=True) as with_grads:
        model(ids).sum().backward()
    assert with_grads.estimate == 2 * cache.estimate


def test_a_capture_too_large_is_refused_before_the_forward_runs() -> None:
    model = ZOO_BY_NAME["gpt2_ours"].build()
    ran: list[bool] = []  # the real forward is refused first; the meta run is on a twin
    spy = model.transformer.wte.register_forward_hook(lambda m, a, out: ran.append(a[0].is_meta))
    guard = ModelGuard(model)
    with pytest.raises(CaptureTooLarge, match=r"would hold .* above the limit of 1000 B"), \
            capture(model, "*", max_bytes=1000):
        model(torch.zeros(2, 8, dtype=torch.long))
    assert ran == []
    guard.check()
    spy.remove()


def test_the_memory_estimate_is_invisible_to_every_other_observer() -> None:
    """Issue 16.1: the meta run called the user's hooks (a value-reading hook raised there and
    its HookSet removed itself) and doubled an outer shape trace's events."""
    from torchlens_edu.nans import watch_nans
    from torchlens_edu.shapes import ShapeTracer

    model = ZOO_BY_NAME["gpt2_ours"].build()
    ids = torch.zeros(2, 8, dtype=torch.long)

    def observed(with_capture: bool) -> tuple[list[float], list[bool], list[int], list[str]]:
        seen: list[float] = []
        raw: list[bool] = []
        spy = model.transformer.h[0].register_forward_hook(
            lambda m, a, out: raw.append(out.is_meta))
        try:
            with tle.hooks(model) as h, ShapeTracer(model) as outer, \
                    ShapeTracer(model, ops=True) as outer_ops, \
                    ShapeTracer(discover=True) as found, watch_nans(model) as watch:
                h.forward("transformer.h.0", lambda c: seen.append(c.output.sum().item()))
                if with_capture:
                    with capture(model, "transformer.h.*") as cache:
                        model(ids)
                    assert cache.estimate == cache.nbytes > 0
                else:
                    model(ids)
                assert h.active and watch.reports == []
        finally:
            spy.remove()
        return seen, raw, [len(outer.trace.events), len(outer_ops.trace.events)], found.trace.roots

    seen, raw, events, roots = observed(with_capture=True)
    assert (seen, raw, events, roots) == observed(with_capture=False)
    assert len(seen) == 1 and raw == [False] and events[0] == 30 and roots == ["GPT2"]


def test_threads_each_capture_their_own_forwards() -> None:
    """Issue 16.5: four threads capturing one model held each other's batches, and torch's
    hook dispatch raced (a kwargs hook called without kwargs while another thread added it)."""
    import threading

    model = ZOO_BY_NAME["gpt2_ours"].build()
    guard = ModelGuard(model)
    errors: list[BaseException] = []
    lengths: list[set[int]] = [set() for _ in range(4)]
    start = threading.Barrier(4)
    with capture(model, "transformer.h.*") as alone:
        model(torch.zeros(1, 3, dtype=torch.long))

    def work(i: int) -> None:
        ids = torch.full((1, 3 + i), i)
        start.wait()
        try:
            for _ in range(15):
                with capture(model, "transformer.h.*") as cache:
                    model(ids)
                lengths[i] |= {out.shape[1] for _, out in cache.items()}
                assert cache.keys() == alone.keys()
        except BaseException as error:  # the assertion below shows it
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert lengths == [{3}, {4}, {5}, {6}]
    guard.check()


class ValueDependent(nn.Module):
    """Reads a value of an activation in its forward, which a shape-only (meta) run cannot do
    (the values of its inputs it could: they stay real)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b(self.a(x))
        steps = int(x.abs().sum().item() > -1)  # 1, read from an activation
        for _ in range(steps):
            x = self.b(self.a(x))
        return x


def test_without_a_meta_run_the_limit_is_kept_while_capturing() -> None:
    model = ValueDependent()
    guard = ModelGuard(model)
    x = torch.ones(4, 64)  # each output: 1 KiB
    with capture(model, "*", max_bytes="3KiB") as cache, \
            pytest.raises(CaptureTooLarge, match=r"already reached 4 KiB"):
        model(x)
    assert len(cache) == 0 and "no estimate" in cache.note
    guard.check()
    with capture(model, "a", max_bytes="3KiB") as cache:
        model(x)
    assert cache.keys() == [("a", 0), ("a", 1)] and cache.estimate is None


def test_in_place_changes_after_capture_are_flagged_and_clone_prevents_them() -> None:
    entry = ZOO_BY_NAME["inplace_after"]
    model = entry.build()
    with capture(model, "fc1") as shared:
        entry.run(model)
    assert shared.activation("fc1").modified_in_place
    assert "changed in place" in repr(shared)
    with capture(model, "fc1", clone=True) as cloned:
        entry.run(model)
    assert not cloned.activation("fc1").modified_in_place
    torch.testing.assert_close(shared["fc1"], 2 * cloned["fc1"])


def test_detach_and_device_options() -> None:
    model = ZOO_BY_NAME["gpt2_ours"].build()
    ids = torch.zeros(1, 4, dtype=torch.long)
    with capture(model, "lm_head") as detached:
        model(ids)
    assert detached["lm_head"].grad_fn is None
    with capture(model, "lm_head", detach=False, device="cpu") as attached:
        model(ids)
    assert attached["lm_head"].grad_fn is not None
    with capture(model, "lm_head", device="meta") as moved:
        model(ids)
    assert moved["lm_head"].is_meta


def test_parse_bytes() -> None:
    assert parse_bytes("1.5K") == 1536 and parse_bytes("2 MB") == 2_000_000
    for bad in ("lots", "-1GB", 0, "3 parsecs"):
        with pytest.raises(ValueError, match="max_bytes"):
            parse_bytes(bad)  # type: ignore[arg-type]


def test_empty_cache_says_how_to_fill_it() -> None:
    model = nn.Linear(2, 2)
    with capture(model, "") as cache:
        pass
    assert "run the model inside the `with` block" in repr(cache)
    with pytest.raises(KeyError, match="nothing captured yet"):
        cache[""]


def test_html_repr_for_jupyter() -> None:
    model = nn.Linear(2, 2)
    with capture(model, "") as cache:
        model(torch.zeros(1, 2))
    assert "<pre" in cache._repr_html_() and "ActivationCache" in cache._repr_html_()


def test_capture_under_inference_mode_and_sparse_outputs() -> None:
    class ToSparse(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.to_sparse()

    model = nn.Sequential(nn.Linear(4, 4), ToSparse())
    with torch.inference_mode(), capture(model, "*") as cache:
        model(torch.ones(2, 4))
    assert cache["1"].is_sparse and not cache.activation("0").modified_in_place
    assert "(2, 4)" in repr(cache)


def test_reading_the_cache_wrongly_says_what_to_do() -> None:
    """An int key, a path that was not captured, gradients that were not asked for or never
    arrived: one message each, never a silent None or a message that contradicts itself."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    x = torch.zeros(2, 4)
    with tle.inspect(model).capture("*", grads=True) as cache:
        y = model(x)
    with pytest.raises(TypeError) as info:
        cache[0]  # type: ignore[index]
    assert str(info.value) == ("the cache is keyed by module path, a str such as "
                               "'transformer.h.0.attn', not int 0: write cache['0']")
    with pytest.raises(KeyError) as missing:
        cache["2"]
    assert missing.value.args[0] == "'2' was not captured. Captured: '' (the model), '0', '1'"
    y.sum().backward()  # after the block: its gradient hooks are gone
    with pytest.raises(RuntimeError) as late:
        cache.grad("0")
    assert str(late.value) == ("no gradient has reached a captured output: call loss.backward() "
                               "inside the `with` block (its gradient hooks end with it), on "
                               "outputs made with gradients on (not under torch.no_grad())")
    with tle.inspect(model).capture("*") as plain:
        model(x).sum().backward()
    with pytest.raises(KeyError) as unasked:
        plain.grad("0")
    assert unasked.value.args[0] == ("gradients were not captured: use capture(..., "
                                     "grads=True), then call loss.backward()")
    with tle.inspect(model).capture("*", grads=True) as inside:
        model(x).sum().backward()
    assert inside.grad("0").shape == (2, 4)
