"""Ctrl-C at random moments inside nested observers; then check that nothing was left behind.

Run by ``tests/test_stress.py`` in a subprocess (SIGINT goes to this process only), or by hand
for more runs: ``python tests/support/sigint_stress.py --runs 3000``. Prints one JSON line: how many
runs were interrupted, and every run that left state behind (with where the interrupt was
raised), raised something other than ``KeyboardInterrupt`` or lost the Ctrl-C.

Each run nests some of the observers (capture, hooks, trace_shapes ops=True, watch_nans,
printoptions, installed) in one order (every order of all six comes up in 720 runs), runs a
forward and backward of a tiny GPT-2 inside (or nothing, so that the Ctrl-C lands in the
enters and exits), and sends SIGINT at a random moment: from a real timer signal
(``setitimer``) in even runs, from a thread (``_thread.interrupt_main``) in odd ones. The orders
and delays come from a seeded generator; where the signal lands still depends on the clock.
"""

from __future__ import annotations

import _thread
import argparse
import itertools
import json
import os
import random
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn as nn

# the repository root (this file is tests/support/sigint_stress.py), for a run by hand
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torchlens_edu as tle
from torchlens_edu.models import GPT2, GPT2Config
from torchlens_edu.printing.options import get_printoptions
from torchlens_edu.shapes import ShapeTracer

OBSERVERS = ("capture", "hooks", "trace", "nans", "print", "installed")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks", "_global_forward_hooks_always_called")
_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                 "_backward_pre_hooks", "_forward_hooks_with_kwargs",
                 "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


def observer(name: str, model: nn.Module) -> AbstractContextManager[Any]:
    if name == "capture":
        return tle.inspect(model).capture("transformer.h.*", grads=True)
    if name == "hooks":
        return tle.hooks(model)
    if name == "trace":
        return ShapeTracer(model, ops=True)
    if name == "nans":
        return tle.watch_nans(model)
    if name == "print":
        return tle.printoptions("edu", precision=2)
    return tle.installed()


def nest(names: list[str], model: nn.Module, body: Callable[[], None]) -> None:
    if not names:
        body()
        return
    with observer(names[0], model) as obs:  # a plain `with`, as users write it
        if names[0] == "hooks":
            obs.forward("transformer.h.*", lambda c: None)
            obs.backward("lm_head", lambda c: None)
        nest(names[1:], model, body)


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything an observer may touch, as comparable values."""
    from torchlens_edu.models import gpt2

    module_hooks = sorted(
        f"{path}.{attr}" for path, m in model.named_modules() for attr in _MODULE_HOOKS
        if getattr(m, attr, None))
    tensor_hooks = sorted(
        name for name, p in model.named_parameters()
        if p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None))
    return {
        "module hooks": module_hooks,
        "parameter hooks": tensor_hooks,
        "global hooks": [n for n in _GLOBAL_HOOKS
                         if getattr(nn.modules.module, n, None)],
        "torch function modes": torch._C._len_torch_function_stack(),
        "print options": get_printoptions(),
        "Tensor.__repr__": torch.Tensor.__repr__,
        "repr": repr(torch.ones(2)),
        "grad mode": torch.is_grad_enabled(),
        "anomaly mode": (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()),
        "explicit attention": gpt2._explicit.get(),  # explicit_attention() left entered
        "SIGINT handler": signal.getsignal(signal.SIGINT),
        "meta parameters": [n for n, p in model.named_parameters() if p.is_meta],
    }


class Interrupter:
    """One SIGINT after ``delay`` seconds: a real timer signal, or a thread's interrupt_main."""

    sent = False  # whether the SIGINT went out (then a KeyboardInterrupt must follow)

    def __init__(self, delay: float, use_thread: bool) -> None:
        self.delay, self.use_thread = delay, use_thread
        self._timer: threading.Timer | None = None
        Interrupter.sent = False

    def start(self) -> None:
        if self.use_thread:
            self._timer = threading.Timer(self.delay, _interrupt_main)
            self._timer.start()
        else:
            signal.setitimer(signal.ITIMER_REAL, max(self.delay, 1e-6))

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer.join()
        else:
            signal.setitimer(signal.ITIMER_REAL, 0)


def _alarm(signum: int, frame: Any) -> None:
    Interrupter.sent = True
    os.kill(os.getpid(), signal.SIGINT)  # a real, asynchronous SIGINT


def _interrupt_main() -> None:
    Interrupter.sent = True
    _thread.interrupt_main()


def orders(rng: random.Random) -> Iterator[list[str]]:
    """Every order of all six observers (shuffled), then random subsets, forever."""
    every = [list(p) for p in itertools.permutations(OBSERVERS)]
    rng.shuffle(every)
    yield from every
    while True:
        yield rng.sample(OBSERVERS, rng.randint(1, len(OBSERVERS)))


def main(runs: int, seed: int, order: list[str] | None = None) -> dict[str, Any]:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = GPT2(GPT2Config.preset("tiny"))
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(1))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    signal.signal(signal.SIGALRM, _alarm)
    rng = random.Random(seed)

    def forward_backward() -> None:
        model(ids).logsumexp(-1).mean().backward()
        model.zero_grad(set_to_none=True)
        repr(model.lm_head.weight[:2, :2])

    def nothing() -> None:
        pass

    # How long a run takes, to spread the Ctrl-Cs over all of it (enters and exits included).
    durations = {}
    for body in (forward_backward, nothing):
        times = []
        for _ in range(5):  # the first runs warm up: the median is a typical one
            start = time.perf_counter()
            nest(list(OBSERVERS), model, body)
            times.append(time.perf_counter() - start)
        durations[body] = sorted(times)[2]
    clean = snapshot(model)
    interrupted, leaks, wrong = 0, [], []
    chosen = itertools.repeat(order) if order else orders(rng)
    for run, names in zip(range(runs), chosen, strict=False):
        body = forward_backward if run % 4 < 2 else nothing
        interrupter = Interrupter(rng.uniform(0, 1.1 * durations[body]), use_thread=run % 2 == 1)
        got_interrupt = False
        where: list[str] = []  # where the KeyboardInterrupt was raised, for a leak's record
        try:
            try:
                interrupter.start()
                nest(names, model, body)
            finally:
                interrupter.stop()
            waited = 0.0
            while Interrupter.sent and waited < 2:  # sent, and held a moment: it lands here
                time.sleep(0.001)
                waited += 0.001
            time.sleep(0.001)  # an alarm that fired just now sends its SIGINT here
        except KeyboardInterrupt as interrupt:
            got_interrupt = True
            where = [f"{f.name}:{f.lineno}" for f in traceback.extract_tb(interrupt.__traceback__)]
        except BaseException as error:  # what must never happen: anything but Ctrl-C
            wrong.append({"run": run, "order": names, "error": repr(error)})
        if Interrupter.sent and not got_interrupt:  # held, and never raised
            wrong.append({"run": run, "order": names, "error": "Ctrl-C lost"})
        interrupted += got_interrupt
        model.zero_grad(set_to_none=True)
        now = snapshot(model)
        left = {k: (clean[k], now[k]) for k in clean if now[k] != clean[k]}
        if any(not torch.equal(v, weights[k]) for k, v in model.state_dict().items()):
            left["weights"] = ("unchanged", "changed")
        if left:
            leaks.append({"run": run, "order": names, "raised at": where[-8:],
                          "left": {k: [repr(a), repr(b)] for k, (a, b) in left.items()}})
            _repair(model)
    return {"runs": runs, "interrupted": interrupted, "leaks": leaks, "wrong": wrong}


def _repair(model: nn.Module) -> None:
    """Undo what a broken run left, so that the next runs are measured from a clean state."""
    from torchlens_edu.printing import options

    for m in model.modules():
        for attr in _MODULE_HOOKS:
            getattr(m, attr).clear()
    while torch._C._len_torch_function_stack():
        torch._C._pop_torch_function_stack()
    for attr in _GLOBAL_HOOKS:
        getattr(nn.modules.module, attr).clear()
    if options._original_repr is not None:
        options.uninstall()
    tle.set_printoptions("default")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    torch.set_grad_enabled(True)
    torch.set_anomaly_enabled(False)
    from torchlens_edu._core import interrupts
    from torchlens_edu.models import gpt2

    interrupts._armed.clear()  # the leaked observer will never detach
    if hasattr(gpt2, "_force_explicit"):
        gpt2._force_explicit = 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--order", help="one nesting order for every run, e.g. trace,hooks,nans")
    args = parser.parse_args()
    print(json.dumps(main(args.runs, args.seed, args.order.split(",") if args.order else None)))
