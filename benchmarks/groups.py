"""The benchmark groups: each builds its models once and times ours against the peer, side by side.

A group runs in a process of its own (``run.py`` starts it), so that one peer's side effects
(TorchLens keeps torch's functions wrapped after its first trace) never reach another group.
Every group returns rows; a row is a plain dict that ``run.py`` writes to JSON and Markdown.
"""

from __future__ import annotations

import gc
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from torchlens_edu.models import GPT2, GPT2Config


@dataclass(frozen=True)
class Setting:
    """What a run measures: model size, inputs, repetitions, device."""

    n_layer: int = 12  # GPT-2 small: 12 layers, C=768, 12 heads, V=50257
    n_embd: int = 768
    n_head: int = 12
    vocab_size: int = 50257
    shapes: tuple[tuple[int, int], ...] = ((1, 128), (4, 256))
    reps: int = 7
    warmup: int = 2
    new_tokens: int = 32
    describe_shape: tuple[int, int] = (50257, 768)  # GPT-2's token embedding matrix
    device: str = "cpu"

    @property
    def config(self) -> GPT2Config:
        return GPT2Config.preset("gpt2", n_layer=self.n_layer, n_embd=self.n_embd,
                                 n_head=self.n_head, vocab_size=self.vocab_size, dropout=0.0)


def timed(fns: dict[str, Callable[[], Any]], s: Setting) -> dict[str, dict[str, float]]:
    """Median (and relative spread) in ms of each function, interleaved rep by rep.

    Interleaving, with the order flipped every rep, spreads machine noise and drift over all
    contenders instead of charging it to whichever ran last.
    """
    sync = torch.cuda.synchronize if s.device.startswith("cuda") else (lambda: None)
    for fn in fns.values():
        for _ in range(s.warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(s.reps):
        names = list(fns) if rep % 2 == 0 else list(reversed(fns))
        for name in names:
            sync()
            start = time.perf_counter()
            fns[name]()
            sync()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: _stats(values) for name, values in samples.items()}


def _stats(values: list[float]) -> dict[str, float]:
    q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values * 3)
    median = statistics.median(values)
    return {"median": median, "spread": (q3 - q1) / median if median else 0.0}


def row(group: str, name: str, shape: str, s: Setting, times: dict[str, dict[str, float]],
        metric: str, value: float, target: str, ok: bool | None, note: str = "") -> dict:
    """One line of the results table."""
    return {"group": group, "name": name, "input": shape, "device": s.device,
            "times_ms": {k: round(v["median"], 3) for k, v in times.items()},
            "spread": {k: round(v["spread"], 3) for k, v in times.items()},
            "metric": metric, "value": round(value, 4), "target": target, "ok": ok,
            "note": note}


def ids_for(shape: tuple[int, int], s: Setting) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, s.vocab_size, shape, generator=g).to(s.device)


def ours(s: Setting) -> GPT2:
    torch.manual_seed(0)
    return GPT2(s.config).to(s.device).eval()


def hf_gpt2(s: Setting) -> torch.nn.Module:
    from transformers import GPT2Config as HFConfig
    from transformers import GPT2LMHeadModel

    c = s.config
    config = HFConfig(n_layer=c.n_layer, n_embd=c.n_embd, n_head=c.n_head,
                      vocab_size=c.vocab_size, n_positions=c.n_positions, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).to(s.device).eval()


def _shape(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]} tokens"


class Leaks:
    """Hooks left behind on the models a group used (the promise: zero, after all of it)."""

    def __init__(self) -> None:
        self.models: list[tuple[str, torch.nn.Module, dict[str, int]]] = []
        self.call = vars(torch.nn.Module)["__call__"]

    def watch(self, name: str, model: torch.nn.Module) -> torch.nn.Module:
        from torchlens_edu.pytest_plugin import hook_counts  # imports pytest: only when used

        self.models.append((name, model, hook_counts(model)))
        return model

    def left(self) -> list[str]:
        from torchlens_edu.pytest_plugin import hook_counts

        found = [f"{name}: {where} +{n - before.get(where, 0)}"
                 for name, model, before in self.models
                 for where, n in hook_counts(model).items() if n > before.get(where, 0)]
        if vars(torch.nn.Module)["__call__"] is not self.call:
            found.append("nn.Module.__call__ was replaced")
        return found


# --- groups --------------------------------------------------------------------------------
# Each group builds its models once, then measures every input shape with a helper that takes
# that shape's ids (closures over a parameter, not over a loop variable).

def forward(s: Setting, leaks: Leaks) -> list[dict]:
    """Our GPT-2 forward (fast attention path) vs Hugging Face GPT2LMHeadModel (sdpa)."""
    mine, theirs = leaks.watch("our GPT-2", ours(s)), leaks.watch("HF GPT-2", hf_gpt2(s))

    def one(shape: tuple[int, int], ids: torch.Tensor) -> dict:
        with torch.no_grad():
            t = timed({"ours": lambda: mine(ids), "HF": lambda: theirs(ids).logits}, s)
        ratio = t["ours"]["median"] / t["HF"]["median"]
        return row("forward", "GPT-2 forward vs HF GPT2LMHeadModel", _shape(shape), s, t,
                   "ours / HF", ratio, "<= 1.0", ratio <= 1.0)

    return [one(shape, ids_for(shape, s)) for shape in s.shapes]


def generate(s: Setting, leaks: Leaks) -> list[dict]:
    """KV-cache greedy generation, tokens per second, vs HF ``generate``."""
    mine, theirs = leaks.watch("our GPT-2", ours(s)), leaks.watch("HF GPT-2", hf_gpt2(s))
    n = s.new_tokens

    def one(shape: tuple[int, int], ids: torch.Tensor) -> dict:
        mask = torch.ones_like(ids)

        def hf() -> Any:
            return theirs.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, pad_token_id=0)

        t = timed({"ours": lambda: mine.generate(ids, n, temperature=0), "HF": hf}, s)
        tps = {k: shape[0] * n / (v["median"] / 1e3) for k, v in t.items()}
        ratio = tps["ours"] / tps["HF"]
        return row("generate", f"generate {n} tokens (KV cache) vs HF generate",
                   _shape(shape) + " prompt", s, t, "ours tok/s / HF tok/s", ratio, ">= 1.0",
                   ratio >= 1.0, f"ours {tps['ours']:.0f} tok/s, HF {tps['HF']:.0f} tok/s")

    return [one(shape, ids_for(shape, s)) for shape in s.shapes]


def module_trace(s: Setting, leaks: Leaks) -> list[dict]:
    """Hooks on every module and the module-level shape trace vs a plain forward / torchinfo."""
    from torchinfo import summary

    import torchlens_edu as tle

    model = leaks.watch("our GPT-2", ours(s))

    def one(shape: tuple[int, int], ids: torch.Tensor) -> list[dict]:
        def hooked() -> Any:
            shapes: list[Any] = []
            with tle.hooks(model) as h:
                h.forward("*", lambda call: shapes.append(getattr(call.output, "shape", None)))
                return model(ids)

        def torch_hooks() -> Any:  # the floor: bare register_forward_hook, nothing else
            shapes: list[Any] = []
            # on the modules hooks("*") reaches: hook points (attn.q ... attn.att) are left
            # out, since a hook there asks GPT-2 for its explicit (slower) attention path
            handles = [m.register_forward_hook(
                lambda mod, args, out: shapes.append(getattr(out, "shape", None)))
                for m in model.modules() if not getattr(type(m), "is_hook_point", False)]
            try:
                return model(ids)
            finally:
                for handle in handles:
                    handle.remove()

        with torch.no_grad():
            t = timed({"plain": lambda: model(ids), "hooks": hooked, "torch hooks": torch_hooks,
                       "trace_shapes": lambda: tle.trace_shapes(model, ids),
                       "torchinfo": lambda: summary(model, input_data=ids, verbose=0)}, s)
        plain = t["plain"]["median"]
        hooks = t["hooks"]["median"] / plain
        trace = t["trace_shapes"]["median"] / plain
        return [
            row("module_trace", "forward with hooks on every module (record shapes)",
                _shape(shape), s, {k: t[k] for k in ("plain", "hooks", "torch hooks")},
                "hooks / plain", hooks, "<= 1.05", hooks <= 1.05,
                f"bare torch hooks / plain = {t['torch hooks']['median'] / plain:.2f} (the "
                "floor for any per-module hook)"),
            row("module_trace", "module-level trace vs torchinfo summary", _shape(shape), s,
                {k: t[k] for k in ("plain", "trace_shapes", "torchinfo")}, "trace / plain",
                trace, "<= 1.05", trace <= 1.05,
                f"torchinfo summary / plain = {t['torchinfo']['median'] / plain:.2f}"),
        ]

    return [r for shape in s.shapes for r in one(shape, ids_for(shape, s))]


def compare(s: Setting, leaks: Leaks) -> list[dict]:
    """``tle.compare`` of GPT-2 against a copy vs the two plain forwards it replaces: module
    level (they agree), and with a difference in the last block (the op-level pass runs inside
    that one module only)."""
    import copy

    import torchlens_edu as tle

    model = leaks.watch("our GPT-2", ours(s))
    same = leaks.watch("its copy", copy.deepcopy(model))
    buggy = leaks.watch("a copy with a bug", copy.deepcopy(model))
    with torch.no_grad():
        buggy.transformer.h[-1].mlp.c_proj.bias.add_(1.0)  # the first difference: last block
    shape = s.shapes[0]  # 1x128: the size the issue asks for
    ids = ids_for(shape, s)

    def plain() -> Any:
        with torch.no_grad():
            return model(ids), same(ids)

    t = timed({"two forwards": plain, "compare": lambda: tle.compare(same, model, ids),
               "compare, differing": lambda: tle.compare(buggy, model, ids)}, s)
    base = t["two forwards"]["median"]
    level = t["compare"]["median"] / base
    located = t["compare, differing"]["median"] / base
    return [
        row("compare", "module-level compare (models agree) / two plain forwards",
            _shape(shape), s, {k: t[k] for k in ("two forwards", "compare")},
            "compare / two forwards", level, "<= 3.0", level <= 3.0),
        row("compare", "compare finding a difference in the last block (op pass inside it)",
            _shape(shape), s, {k: t[k] for k in ("two forwards", "compare, differing")},
            "compare / two forwards", located, "<= 3.0", located <= 3.0,
            "op-level pass runs only inside the first diverging module"),
    ]


def op_trace(s: Setting, leaks: Leaks) -> list[dict]:
    """Op-level trace with source lines vs TorchLens' full capture.

    TorchLens wraps torch's functions on its first trace and leaves them wrapped, so ours and
    the plain forward are timed first, TorchLens after, and the plain forward once more to show
    what the wrapping costs everything that runs later in the same process.
    """
    import torchlens

    import torchlens_edu as tle

    model = leaks.watch("our GPT-2", ours(s))

    def one(shape: tuple[int, int], ids: torch.Tensor) -> dict:
        with torch.no_grad():
            t = timed({"plain": lambda: model(ids),
                       "trace_shapes(ops=True)": lambda: tle.trace_shapes(model, ids, ops=True)},
                      s)
            t.update(timed({"TorchLens": lambda: torchlens.trace(model, ids)}, s))
            after = timed({"plain after TorchLens": lambda: model(ids)}, s)
        plain = t["plain"]["median"]
        ratio = t["trace_shapes(ops=True)"]["median"] / plain
        return row("op_trace", "op-level trace (source lines) vs TorchLens", _shape(shape), s,
                   t, "trace / plain", ratio, "<= 2.0", ratio <= 2.0,
                   f"TorchLens / plain = {t['TorchLens']['median'] / plain:.2f}; plain forward "
                   f"after TorchLens ran: {after['plain after TorchLens']['median'] / plain:.2f}x")

    return [one(shape, ids_for(shape, s)) for shape in s.shapes]


def capture(s: Setting, leaks: Leaks) -> list[dict]:
    """Capturing every block's attention and MLP outputs vs TransformerLens ``run_with_cache``
    (each as overhead over its own model's plain forward)."""
    import torchlens_edu as tle

    model = leaks.watch("our GPT-2", ours(s))
    bridge = leaks.watch("TransformerLens", _transformer_lens(s))

    def attn_and_mlp(path: str, module: torch.nn.Module) -> bool:
        return path.startswith("transformer.h.") and path.endswith((".attn", ".mlp"))

    def one(shape: tuple[int, int], ids: torch.Tensor) -> dict:
        def captured() -> Any:
            with tle.inspect(model).capture(attn_and_mlp) as cache:
                model(ids)
            return cache

        with torch.no_grad():
            t = timed({"plain": lambda: model(ids), "capture": captured,
                       "TL plain": lambda: bridge(ids),
                       "TL run_with_cache": lambda: bridge.run_with_cache(ids)}, s)
        mine = t["capture"]["median"] / t["plain"]["median"]
        theirs = t["TL run_with_cache"]["median"] / t["TL plain"]["median"]
        return row("capture", "capture every block's attn + MLP vs TL run_with_cache",
                   _shape(shape), s, t, "our overhead / TL overhead", mine / theirs, "<= 1.0",
                   mine <= theirs,
                   f"ours {mine:.3f}x its forward ({2 * s.n_layer} tensors), TransformerLens "
                   f"{theirs:.3f}x its forward (it caches every hook point)")

    return [one(shape, ids_for(shape, s)) for shape in s.shapes]


def _transformer_lens(s: Setting) -> torch.nn.Module:
    from transformer_lens import TransformerBridge, TransformerBridgeConfig

    c = s.config
    cfg = TransformerBridgeConfig(n_layers=c.n_layer, d_model=c.n_embd, d_head=c.head_size,
                                  n_heads=c.n_head, d_mlp=c.mlp_width, d_vocab=c.vocab_size,
                                  n_ctx=c.n_positions, act_fn="gelu_new",
                                  normalization_type="LN", device=s.device, seed=0)
    bridge = TransformerBridge.boot_native(cfg).eval()
    # its first forward adds hooks of its own: settle it before counting hooks
    bridge(torch.zeros(1, 4, dtype=torch.long, device=s.device)).sum().backward()
    bridge.zero_grad(set_to_none=True)
    return bridge


def nan_watch(s: Setting, leaks: Leaks) -> list[dict]:
    """Forward + backward under the NaN watch vs ``detect_anomaly(check_nan=True)``."""
    import warnings

    import torchlens_edu as tle

    model = leaks.watch("our GPT-2", ours(s).train())  # dropout is 0: same work every step

    def one(shape: tuple[int, int], ids: torch.Tensor) -> dict:
        def step() -> None:
            model.zero_grad(set_to_none=True)
            logits = model(ids)
            F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()

        def watched() -> None:
            with tle.watch_nans(model):
                step()

        def anomaly() -> None:
            with torch.autograd.detect_anomaly(check_nan=True):
                step()

        with warnings.catch_warnings():  # detect_anomaly warns on every use
            warnings.simplefilter("ignore", UserWarning)
            t = timed({"plain": step, "watch_nans": watched, "detect_anomaly": anomaly}, s)
        plain = t["plain"]["median"]
        ratio = t["watch_nans"]["median"] / plain
        return row("nan_watch", "NaN watch (fwd+bwd) vs detect_anomaly(check_nan=True)",
                   _shape(shape), s, t, "watch / plain", ratio, "<= 1.3", ratio <= 1.3,
                   f"detect_anomaly / plain = {t['detect_anomaly']['median'] / plain:.2f} "
                   "(and it checks only the backward, only NaN)")

    return [one(shape, ids_for(shape, s)) for shape in s.shapes]


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside it (on a GPU, each is at least a kernel launch)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def watch_op_count(model: torch.nn.Module, ids: torch.Tensor) -> tuple[int, int, float]:
    """Dispatched aten ops of one forward+backward, plain and under ``watch_nans``, and the
    largest number of bytes the watch held waiting for a batched check (as a fraction of the
    model's parameter and buffer bytes). The second watched step is the one counted: the first
    builds what is cached."""
    import torchlens_edu as tle
    from torchlens_edu.nans import checks

    def step() -> None:
        model.zero_grad(set_to_none=True)
        logits = model(ids)
        F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()

    step()
    with OpCounter() as plain:
        step()
    held = [0]
    add = checks.Batch.add

    def counting_add(batch: checks.Batch, *args: Any, **kwargs: Any) -> None:
        add(batch, *args, **kwargs)
        held[0] = max(held[0], batch._pending.bytes)

    checks.Batch.add = counting_add  # type: ignore[method-assign]
    try:
        with tle.watch_nans(model):
            step()
            with OpCounter() as watched:
                step()
    finally:
        checks.Batch.add = add  # type: ignore[method-assign]
    model.zero_grad(set_to_none=True)
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return plain.count, watched.count, held[0] / size


def nan_watch_ops(s: Setting, leaks: Leaks) -> list[dict]:
    """Extra dispatched ops the NaN watch's cheap tier adds to a step (GPT-2 small, 1x64)."""
    model = leaks.watch("our GPT-2", ours(s).train())
    shape = (1, 64)
    plain, watched, held = watch_op_count(model, ids_for(shape, s))
    extra = watched - plain
    return [row("nan_watch_ops", "NaN watch: extra dispatched aten ops per fwd+bwd",
                _shape(shape), s, {}, "extra ops", extra, "<= 16", extra <= 16,
                f"plain {plain} ops, watched {watched} (a TorchDispatchMode counts them; "
                f"machine-independent); tensors held for the batched check peaked at "
                f"{held:.1%} of the parameter bytes (budget 5%)")]


class _PassThrough(TorchFunctionMode):
    """The floor of any ``__torch_function__`` tracer: a mode that only passes each op on."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        return func(*args, **(kwargs or {}))


def _cpu_ms_per_call(fns: dict[str, Callable[[], Any]], reps: int, calls: int) -> dict[str, float]:
    """Median CPU milliseconds (``time.process_time``: other processes' load is not charged)
    of ``calls`` back-to-back calls of each function, interleaved rep by rep, per call."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(reps):
        for name in (list(fns) if rep % 2 == 0 else list(reversed(fns))):
            start = time.process_time()
            for _ in range(calls):
                fns[name]()
            samples[name].append((time.process_time() - start) * 1e3 / calls)
    return {name: statistics.median(values) for name, values in samples.items()}


def op_trace_per_op(s: Setting, leaks: Leaks) -> list[dict]:
    """Python cost per op of the op recorder vs an empty ``TorchFunctionMode``, on a 2-layer toy
    GPT-2 (C=32) whose forward is nearly all per-op overhead: the cost a GPU's launch-bound
    forward feels."""
    import torchlens_edu as tle

    toy = Setting(n_layer=2, n_embd=32, n_head=2, vocab_size=128)
    model = leaks.watch("toy GPT-2", ours(toy))
    ids = ids_for((1, 8), toy)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # process_time counts every thread: idle spinning ones too
    with torch.no_grad():
        n_ops = sum(e.kind == "op" for e in tle.trace_shapes(model, ids, ops=True).events)

        def empty_mode() -> Any:
            with _PassThrough():
                return model(ids)

        fns = {"plain": lambda: model(ids), "empty TorchFunctionMode": empty_mode,
               "trace_shapes(ops=False)": lambda: tle.trace_shapes(model, ids),
               "trace_shapes(ops=True)": lambda: tle.trace_shapes(model, ids, ops=True)}
        for fn in fns.values():  # warm-up: the caches of both sides are built
            for _ in range(3):
                fn()
        ms = _cpu_ms_per_call(fns, reps=max(s.reps, 5) * 3, calls=10)
    torch.set_num_threads(threads)
    floor = (ms["empty TorchFunctionMode"] - ms["plain"]) * 1e3 / n_ops  # us per op
    # the op recorder's own cost: what ops=True adds to the module-level trace (whose per-trace
    # costs, hooks and dims, do not grow with the number of ops)
    ours_us = (ms["trace_shapes(ops=True)"] - ms["trace_shapes(ops=False)"]) * 1e3 / n_ops
    whole_us = (ms["trace_shapes(ops=True)"] - ms["plain"]) * 1e3 / n_ops
    ratio = ours_us / floor if floor > 0 else float("inf")
    times = {name: {"median": value, "spread": 0.0} for name, value in ms.items()}
    return [row("op_trace_per_op", "op trace per-op cost / empty TorchFunctionMode per-op cost",
                f"toy GPT-2 (2 layers), {n_ops} ops", s, times, "per-op ratio", ratio, "<= 6",
                ratio <= 6,
                f"op recorder {ours_us:.1f} us/op over trace_shapes(ops=False), empty "
                f"TorchFunctionMode {floor:.1f} us/op over a plain forward; the whole op trace "
                f"over a plain forward, per-trace costs included: {whole_us:.1f} us/op = "
                f"{whole_us / floor:.1f}x (CPU time via time.process_time, 1 thread, medians of "
                "interleaved reps)")]


def describe(s: Setting, leaks: Leaks) -> list[dict]:
    """``describe`` vs lovely-tensors on a 50257x768 tensor (GPT-2's embedding matrix)."""
    rows, cols = s.describe_shape
    import lovely_tensors

    import torchlens_edu as tle

    t_ = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)).to(s.device)

    def one_pass() -> Any:
        return torch.aminmax(t_), t_.mean(), t_.std()

    t = timed({"describe": lambda: tle.describe(t_),
               "lovely": lambda: str(lovely_tensors.lovely(t_)),
               "aminmax+mean+std": one_pass}, s)
    speedup = t["lovely"]["median"] / t["describe"]["median"]
    floor = t["describe"]["median"] / t["aminmax+mean+std"]["median"]
    return [row("describe", "describe vs lovely-tensors lovely()", f"{rows}x{cols} f32", s, t,
                "lovely / describe", speedup, ">= 10", speedup >= 10,
                f"describe / (aminmax + mean + std) = {floor:.2f} (target <= 3)")]


def meta_xl(s: Setting, leaks: Leaks) -> list[dict]:
    """Shape-only trace of GPT-2 XL on meta tensors: time and peak memory of this process."""
    import torchlens_edu as tle

    gc.collect()
    before = _peak_rss_mb()
    start = time.perf_counter()
    with torch.device("meta"):
        model = GPT2(GPT2Config.preset("gpt2-xl"))
    built = time.perf_counter()
    trace = tle.trace_shapes(model, torch.zeros(1, 128, dtype=torch.long), meta=True)
    done = time.perf_counter()
    peak = _peak_rss_mb()
    seconds = done - built
    return [row("meta", "meta trace of gpt2-xl (1x128)", "1x128 tokens", s,
                {"build": {"median": (built - start) * 1e3, "spread": 0.0},
                 "trace": {"median": seconds * 1e3, "spread": 0.0}},
                "trace seconds", seconds, "< 2 s", seconds < 2.0,
                f"{len(trace.events)} events; peak RSS {peak:.0f} MB (after imports "
                f"{before:.0f} MB); target < 500 MB: {'met' if peak < 500 else 'missed'}")
            | {"peak_rss_mb": round(peak, 1), "rss_after_imports_mb": round(before, 1)}]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


GROUPS: dict[str, Callable[[Setting, Leaks], list[dict]]] = {
    "forward": forward, "generate": generate, "module_trace": module_trace,
    "op_trace": op_trace, "capture": capture, "nan_watch": nan_watch,
    "nan_watch_ops": nan_watch_ops, "op_trace_per_op": op_trace_per_op,
    "describe": describe,
    "meta": meta_xl, "compare": compare,
}
