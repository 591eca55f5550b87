"""Nothing left behind: Ctrl-C at random moments in nested observers, and observers in threads.

Issue 16.6 measured 38 of 3,000 Ctrl-Cs leaving hooks, the op recorder's torch-function mode or
print options behind, and 13 turning into "pop from empty mode stack".
``support/sigint_stress.py`` is the harness (run it by hand for more runs); here it runs a few
hundred times.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from support.sigint_stress import OBSERVERS, observer, snapshot
from support.threads import in_threads
from torchlens_edu.models import GPT2, GPT2Config

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.slow
def test_ctrl_c_at_random_moments_leaves_nothing_behind() -> None:
    runs = 240
    env = {**os.environ, "PYTHONPATH": os.path.dirname(HERE)}
    done = subprocess.run([sys.executable, os.path.join(HERE, "support", "sigint_stress.py"),
                           "--runs", str(runs), "--seed", "0"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["wrong"] == []  # every interrupt arrived as KeyboardInterrupt
    assert result["leaks"] == []
    assert result["interrupted"] >= runs // 5  # the Ctrl-Cs did land, in all sorts of places


@pytest.mark.slow
def test_observers_in_threads_see_their_own_forwards_and_leave_nothing_behind() -> None:
    torch.manual_seed(0)
    model = GPT2(GPT2Config.preset("tiny"))
    clean = snapshot(model)
    in_these_threads = list(OBSERVERS)

    def work(i: int) -> None:
        rng = random.Random(i)
        ids = torch.full((1, 3 + i), i)
        for _ in range(12):
            order = rng.sample(in_these_threads, rng.randint(1, len(in_these_threads)))
            held = [observer(name, model) for name in order]
            _nest(held, order, model, ids, 3 + i)

    errors = in_threads(work)
    assert errors == []
    now = snapshot(model)
    assert {k: now[k] for k in clean if now[k] != clean[k]} == {}


def _nest(held: list, order: list[str], model: torch.nn.Module, ids: torch.Tensor,
          length: int) -> None:
    if not held:  # autograd.grad: threads must not accumulate into one .grad at once
        torch.autograd.grad(model(ids).sum(), model.transformer.wte.weight)
        return
    with held[0] as obs:
        if order[0] == "hooks":
            obs.forward("transformer.h.0", lambda c: _same(c.output.shape[1], length))
        _nest(held[1:], order[1:], model, ids, length)
    if order[0] == "capture":  # this thread's batch, and only it: blocks output (B, T, C)
        blocks = [key for key in obs if key[0] in ("transformer.h.0", "transformer.h.1")]
        assert {obs[key].shape[1] for key in blocks} == {length}
        assert {obs.grad(*key).shape[1] for key in blocks} == {length}
    if order[0] == "trace":
        assert {e.outputs[0][0][1] for e in obs.trace.events
                if e.kind == "module" and e.path == "transformer.wte"} == {length}


def _same(got: int, expected: int) -> None:
    assert got == expected, f"a hook saw another thread's batch: T={got}, not {expected}"


def test_a_ctrl_c_during_an_uninterruptible_call_is_raised_when_it_returns() -> None:
    import _thread
    import signal

    from torchlens_edu._core.interrupts import uninterruptible

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("Python's SIGINT handler is not installed here")
    steps: list[int] = []

    @uninterruptible
    def attach() -> None:
        _thread.interrupt_main()
        for step in range(3):  # each call checks for signals: the Ctrl-C waits
            steps.append(step)

    with pytest.raises(KeyboardInterrupt):
        attach()
    assert steps == [0, 1, 2]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_enter_interrupted_by_ctrl_c_exits_before_raising() -> None:
    import _thread
    import signal

    from torchlens_edu._core.interrupts import uninterruptible_enter

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("Python's SIGINT handler is not installed here")
    calls: list[str] = []

    class Observer:
        @uninterruptible_enter
        def __enter__(self) -> Observer:
            calls.append("attached")
            _thread.interrupt_main()
            calls.append("still attaching")
            return self

        def __exit__(self, *exc: object) -> None:
            calls.append("detached")

    with pytest.raises(KeyboardInterrupt), Observer():
        calls.append("body")  # never: the with block does not start
    assert calls == ["attached", "still attaching", "detached"]


def test_op_recorders_closed_out_of_order_each_take_themselves_off() -> None:
    """TorchFunctionMode.__exit__ pops the top mode, whichever it is: closing two op traces
    out of order left the first one recording, and could pop from an empty stack."""
    from torchlens_edu.shapes import ShapeTracer

    first, second = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    a, b = ShapeTracer(first, ops=True), ShapeTracer(second, ops=True)
    x = torch.zeros(1, 2)
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)
    second(x)
    b.__exit__(None, None, None)
    assert [e.name for e in b.trace.events if e.kind == "op"] == ["linear"]
    assert a.trace.events == []
    assert torch._C._len_torch_function_stack() == 0
    a.__exit__(None, None, None)  # a second exit: nothing to pop, no error
