"""NaN/Inf watch: find where the first non-finite value was *made*, cheaply enough to leave on.

Two tiers:

- cheap, every checked step: forward hooks hand each module's outputs (and the model's inputs)
  to a :class:`~torchlens_edu.nans.checks.Batch`, and tensor hooks do the same for the
  gradients reaching those outputs. A batch reduces everything it holds with one multi-tensor op
  to each tensor's largest magnitude (exact: NaN, inf or finite as the tensor is, no overflow;
  on CPU a 2-norm screens first), and is read back once at the end of the forward and once at
  the end of the backward: a few ops and one host sync per phase, however deep the model.
- precise, only when the cheap tier fires: the failing step is replayed identically and watched
  call by call (see :mod:`~torchlens_edu.nans.replay`) to name the producing op, its module and
  the user's line.

>>> import torch, torchlens_edu as tle
>>> model = torch.nn.Linear(2, 2)
>>> with tle.watch_nans(model):
...     model(torch.ones(1, 2)).sum().backward()
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from types import FrameType
from typing import Any, Literal

import torch
import torch.nn as nn

from torchlens_edu._core.arguments import require_flag
from torchlens_edu._core.console import get_console
from torchlens_edu._core.frames import user_source
from torchlens_edu._core.interrupts import arm, disarm, uninterruptible, uninterruptible_enter
from torchlens_edu._core.model_state import save_rng
from torchlens_edu._core.modules import (
    is_compiled,
    is_hook_point,
    module_aliases,
    module_paths,
    require_module,
    uses_fsdp,
)
from torchlens_edu._core.replay_state import recomputing, replay_scope
from torchlens_edu._core.tree import iter_tensors
from torchlens_edu.dims import Dims, dims_argument
from torchlens_edu.nans.breakpoint import stop_at_producer
from torchlens_edu.nans.causes import hint_for
from torchlens_edu.nans.checks import Batch, Reading, checkable, memory_budget, unseen
from torchlens_edu.nans.ranks import decode, encode, rank, share
from torchlens_edu.nans.replay import Replayer, ReplayInputs, Stopped
from torchlens_edu.nans.report import (
    ALL_KINDS,
    Kind,
    NonFiniteReport,
    Phase,
    Producer,
    TensorSummary,
    kind_of,
)
from torchlens_edu.printing.stats import is_dtensor

__all__ = ["NanWatch", "NonFiniteError", "NonFiniteReport", "watch_nans"]

# DistributedDataParallel keeps per-step reducer state that an exception raised inside backward
# leaves half-updated; the learner then sees DDP's internal assert on the next step, not ours.
DDP_AFTER_BACKWARD_ERROR = (
    "; note: this error was raised inside a DistributedDataParallel backward, so DDP's next "
    "step will fail with an internal assert (DDP's own behaviour): fix the cause, then rebuild "
    "the DDP wrapper or restart training from a checkpoint")

Mode = Literal["raise", "warn", "break"]


class NonFiniteError(RuntimeError):
    """A NaN or Inf was made; ``.report`` (a :class:`NonFiniteReport`) says where and why.

    >>> err = NonFiniteError(NonFiniteReport(phase="forward", module="", op="log", kind="nan",
    ...                                      source="", hint="hint"))
    >>> err.report.op
    'log'
    """

    def __init__(self, report: NonFiniteReport) -> None:
        super().__init__(report)  # the report as the only argument: the error pickles
        self.report = report

    def __str__(self) -> str:
        # the one-line summary first: it is what pytest's short summary and log lines show
        return f"{self.report.summary()}\n{self.report}"


@dataclass(eq=False, kw_only=True)  # identity: ``step in pending`` must not compare tensors
class _Step:
    """One checked forward (and the backward through it): its cheap-tier batch, replay inputs."""

    index: int
    replay: ReplayInputs
    source: str  # the user's line that called the model
    checks: Batch[None]
    # id -> weakref of each output checked: a tensor passed through (eval dropout) counts once;
    # a freed output's id can come back on a new tensor, which the dead weakref tells apart
    seen: dict[int, weakref.ref[torch.Tensor]] = field(default_factory=dict)
    producer: Producer | None = None  # what the precise tier found


def _is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _refuse_compiled(paths: dict[nn.Module, str]) -> None:
    """The watch's hooks inside torch.compile'd code would be compiled by TorchDynamo: slow
    (seconds for a toy model), pages of graph-break warnings. Say how to watch instead."""
    compiled = [path for module, path in paths.items() if is_compiled(module)]
    if not compiled:
        return
    name = f"model.{compiled[0]}" if compiled[0] else "model"
    raise TypeError(f"watch_nans cannot look inside torch.compile'd code ({name} is an "
                    "OptimizedModule): TorchDynamo would compile the watch's hooks into it. "
                    f"While you hunt the NaN, watch and run the eager original {name}._orig_mod "
                    f"(the same modules and weights), e.g. with tle.watch_nans({name}._orig_mod): "
                    "..., and compile again when it is fixed")


class NanWatch:
    """The context manager :func:`watch_nans` returns; ``.reports`` lists what it found.

    It watches the forwards of the thread that made it (and the backward passes they start),
    so that several threads may each watch one model.

    >>> model = torch.nn.Linear(2, 2)
    >>> with NanWatch(model) as watch:
    ...     _ = model(torch.ones(1, 2))
    >>> watch.reports
    []
    """

    def __init__(self, model: nn.Module, *, mode: Mode = "raise", check_inf: bool = True,
                 every: int = 1, dims: Mapping[str, int] | None = None) -> None:
        require_module(model, "watch_nans()")
        if mode not in ("raise", "warn", "break"):
            raise ValueError(f"mode={mode!r}: choose 'raise' (stop with NonFiniteError), 'warn' "
                             "(print and go on) or 'break' (open the debugger at the line)")
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"every={every!r}: check every N-th forward, N an int >= 1")
        self.model, self.mode, self.every = model, mode, every
        require_flag(check_inf, "check_inf", "watch_nans")
        self.kinds: frozenset[Kind] = ALL_KINDS if check_inf else frozenset({"nan"})
        self.dims = dims_argument(dims)
        self.reports: list[NonFiniteReport] = []
        self._paths = module_paths(model)
        _refuse_compiled(self._paths)
        # DistributedDataParallel's forward starts collectives: replay the module inside it
        target = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self._replayer = Replayer(model, target, self.kinds, self.dims)
        # FSDP gathers parameters inside the step, a DTensor op may redistribute (an all-reduce
        # of a partial sum): replays must run on every rank together, or on none
        self._collective = self._replayer.finish = uses_fsdp(model) or any(
            is_dtensor(p) for p in model.parameters())
        self._allow_inf: set[str] = set()  # module paths seen to output -inf on purpose
        self._handles: list[Any] = []
        self._active = False
        self._replaying = False
        self._thread = threading.get_ident()  # forwards of other threads are theirs to watch
        self._calls = 0
        self._step: _Step | None = None
        self._nested = 0
        self._forwards_open = 0  # forwards of the model now running (checked or not)
        self._budget = memory_budget(model)
        self._grads: Batch[_Step] = Batch(self._budget)  # the backward pass being checked
        self._queued = -1  # the backward pass (graph task) whose check is queued
        self._warned: set[tuple[str, str, str, str]] = set()

    # ------------------------------------------------------------------ attach / detach
    # uninterruptible: a Ctrl-C waits until every hook is attached, or every hook is gone
    @uninterruptible_enter
    def __enter__(self) -> NanWatch:
        root = self.model
        arm(self)
        try:
            self._handles.append(root.register_forward_pre_hook(self._on_start, with_kwargs=True))
            for module in self._paths:
                if not is_hook_point(module):  # an identity: its input was checked already
                    self._handles.append(module.register_forward_hook(self._on_module))
            self._handles.append(root.register_forward_hook(self._on_end, always_call=True))
            for name, param in params_to_probe(root):
                self._handles.append(param.register_post_accumulate_grad_hook(
                    partial(self._on_param_grad, name)))
        except BaseException:
            self._detach()
            raise
        self._active = True
        return self

    @uninterruptible
    def __exit__(self, *exc: object) -> None:
        self._detach()

    def _detach(self) -> None:
        self._active = False
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._step = None
        self._grads.clear()
        disarm(self)

    # ------------------------------------------------------------------ cheap tier: forward
    def _on_start(self, module: nn.Module, args: tuple, *rest: Any) -> None:
        # *rest: torch may call a kwargs hook without kwargs while another thread adds it
        if self._replaying or threading.get_ident() != self._thread or recomputing():
            return
        (kwargs,) = rest
        self._forwards_open += 1
        if self._step is not None:  # the model calls itself: one step, checked at the end
            self._nested += 1
            return
        self._calls += 1
        if (self._calls - 1) % self.every:
            return
        cpu, cuda = save_rng()
        step = _Step(index=self._calls, source=user_source(), checks=Batch(self._budget),
                     replay=ReplayInputs(args=args, kwargs=kwargs, rng_cpu=cpu, rng_cuda=cuda))
        for i, t in enumerate(t for t in iter_tensors((args, kwargs)) if _is_float(t)):
            if checkable(t):
                step.checks.add(f"input {i}", t, signed=True)
        self._step = step

    def _on_module(self, module: nn.Module, args: tuple, output: Any) -> None:
        step = self._step
        if self._replaying or threading.get_ident() != self._thread:
            return
        if step is None:
            if not self._forwards_open and not recomputing():  # called outside the model
                self._check_outside(module, output)
            return
        path = self._paths.get(module, "")
        seen = step.seen
        for t in iter_tensors(output):
            if not checkable(t):
                continue
            ref = seen.get(id(t))
            if ref is not None and ref() is t:
                continue  # already checked: passed through unchanged
            seen[id(t)] = weakref.ref(t)
            step.checks.add(path, t)
            if t.requires_grad:
                with unseen():
                    t.register_hook(partial(self._on_grad, step, path))

    def _on_end(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._replaying or threading.get_ident() != self._thread or recomputing():
            return  # (a checkpointed model recomputed in backward: not a new forward)
        self._forwards_open = max(self._forwards_open - 1, 0)
        step = self._step
        if step is None:
            return
        if self._nested:
            self._nested -= 1
            return
        self._step = None
        if output is None and sys.exc_info()[0] is not None:
            step.checks.clear()
            return  # the forward itself raised: that error is the news
        for i, t in enumerate(t for t in iter_tensors(output) if _is_float(t)):
            if t.requires_grad:
                with unseen():
                    t.register_hook(partial(self._keep_grad, step, i))
        bad = self._first_bad(step.checks.read())
        phase: Phase = "input" if bad is not None and bad.signed else "forward"
        self._verdict(step, phase, bad)

    def _check_outside(self, module: nn.Module, output: Any) -> None:
        """A module of the model called outside its forward (``model.head(model(x))``): its
        output is checked on the spot. There is no forward of the model to replay, so the
        report names the module and the line, and how to find the op."""
        path = self._paths.get(module, "")
        checks: Batch[None] = Batch(self._budget)
        for t in iter_tensors(output):
            if checkable(t):
                checks.add(path, t)
        bad = self._first_bad(checks.read())
        if bad is None or bad.kind is None:
            return
        name = type(self.model).__name__
        self._deliver(self._unreproduced("forward", path, bad.kind, user_source(), 0, why=(
            f"{path!r} was called outside {name}'s forward (directly, as in "
            f"model.{path}(...)), and only whole forwards of {name} are replayed to find "
            f"the op; watch the module itself to name it: watch_nans(model.{path})")), None)

    # ------------------------------------------------------------------ cheap tier: backward
    def _on_grad(self, step: _Step, path: str, grad: torch.Tensor) -> None:
        if not self._active or self._replaying or not checkable(grad):
            return
        self._grads.add(path, grad, step)
        self._queue()

    def _on_param_grad(self, name: str, param: torch.Tensor) -> None:
        # only in the backward of a checked step (its output's gradient arrives first)
        if not len(self._grads) or self._replaying or param.grad is None or not checkable(
                param.grad):
            return
        self._grads.add(f"parameter {name}", param.grad)
        self._queue()

    def _queue(self) -> None:
        # one check when this backward pass ends (a pass that failed midway drops its
        # callback: the task id tells a new pass from the one already queued)
        task = torch._C._current_graph_task_id()
        if task != self._queued:
            self._queued = task
            engine = torch.autograd.Variable._execution_engine
            if self._collective:
                # FSDP queues its end-of-backward callback (which reshards the parameters and
                # finishes the gradient reduce-scatters) during the backward, maybe after this
                # hook: a callback queued from a callback runs after it
                engine.queue_callback(lambda: engine.queue_callback(self._on_backward_end))
            else:
                engine.queue_callback(self._on_backward_end)

    def _keep_grad(self, step: _Step, index: int, grad: torch.Tensor) -> None:
        if self._active and not self._replaying:
            step.replay.out_grads[index] = grad  # for a backward replay; dropped after the check

    def _on_backward_end(self) -> None:
        self._queued = -1
        readings = self._grads.read()
        steps = list(dict.fromkeys(r.owner for r in readings if r.owner is not None))
        bad = self._first_bad(readings)
        # the step whose gradients went bad; a bad parameter gradient: the last step
        owner = bad.owner if bad is not None and bad.owner is not None else (
            steps[-1] if steps else None)
        try:
            self._verdict(owner, "backward", bad)
        finally:
            for step in steps:
                step.replay.out_grads.clear()

    def _first_bad(self, readings: list[Reading]) -> Reading | None:
        check_inf = "+inf" in self.kinds
        for reading in readings:
            kind = reading.kind
            if kind is None or (kind != "nan" and not check_inf):
                continue
            # an additive mask comes in holding -inf on purpose; so do modules the replay
            # found to output -inf on purpose (a NaN there is still news)
            if kind == "-inf" or (kind != "nan" and reading.label in self._allow_inf):
                continue
            return reading
        return None

    # ------------------------------------------------------------------ verdict
    def _verdict(self, step: _Step | None, phase: Phase, bad: Reading | None) -> None:
        """Locate what this rank saw, agree with the other ranks, deliver if anyone is bad.

        Under FSDP a step runs collectives (the forward and the backward gather parameters, the
        backward reduce-scatters gradients), and so may DTensor ops (redistributing a partial
        sum), so a replay on one rank alone would wait forever for the others: the ranks first
        share what their cheap tier saw, and then every rank replays the step or none does.
        """
        report = None
        seen = bad is not None and bad.kind is not None
        may_replay = True  # may this rank replay the step to locate what it saw?
        replay_all = False  # must every rank replay it (the others' collectives need this one)?
        if self._collective:
            first = share(encode(phase, bad.kind) if bad is not None and bad.kind else 0)
            if not any(first):
                return
            if phase == "backward":  # every rank needs the step's forward and output gradients
                may_replay = replay_all = all(share(int(step is not None and bool(
                    step.replay.out_grads))))
            else:
                replay_all = any(decode(c)[0] == "forward" for c in first if c)
        with replay_scope():  # all of the precise tier is unseen by the other observers
            if bad is not None and bad.kind is not None:
                report = self._locate(step, phase, bad.label, bad.kind, may_replay=may_replay)
            # a rank that saw nothing (or only a bad input, which is not replayed) joins in
            if replay_all and step is not None and not (seen and phase != "input"):
                self._replay_along(step, phase)
        codes = share(0 if report is None else encode(report.phase, report.kind))
        if report is None and any(codes):
            report = self._other_rank_report(codes)
        if report is None:
            return
        here = rank() or 0  # outside torch.distributed the only code is this process's
        others = [str(r) for r, c in enumerate(codes) if c and r != here]
        if others and report.cause != "other_rank":
            report.hint += (
                f"; rank {', '.join(others)} found non-finite values in this step too: a value "
                "that crosses ranks (a DTensor redistribution, FSDP's gather of a parameter) "
                "reaches every rank, and the rank whose producer had finite inputs made it")
        self._deliver(report, step)

    def _replay_along(self, step: _Step, phase: Phase) -> None:
        """Join another rank's replay (its parameter gathers need every rank)."""
        self._replaying = True
        try:
            if phase == "backward":
                self._replayer.backward(step.replay)
            else:
                self._replayer.forward(step.replay)
        finally:
            self._replaying = False

    def _other_rank_report(self, codes: list[int]) -> NonFiniteReport:
        phase, kind = decode(next(c for c in codes if c))
        ranks = [r for r, c in enumerate(codes) if c]
        return NonFiniteReport(
            phase=phase, module="", op="", kind=kind, source=user_source(), rank=rank(),
            hint=hint_for("other_rank", f"rank {', '.join(map(str, ranks))} found {kind} in the "
                          f"{phase}; this rank stops too so that it does not wait for it "
                          "forever: read that rank's report"),
            cause="other_rank")

    def _locate(self, step: _Step | None, phase: Phase, label: str, kind: Kind, *,
                may_replay: bool = True) -> NonFiniteReport | None:
        """The precise tier: replay the step and name the producer (``may_replay=False``: under
        FSDP, when some rank cannot replay the backward, so none does)."""
        if step is None:  # a parameter's gradient, with no watched forward to replay
            return self._unreproduced(phase, label, kind, "", 0)
        replay = step.replay
        dims = Dims.infer(self.model, (replay.args, replay.kwargs), self.dims)
        self._replayer.dims = dims
        if phase == "input":
            t = [t for t in iter_tensors((replay.args, replay.kwargs)) if _is_float(t)][
                int(label.removeprefix("input "))]
            summary = TensorSummary.of(label, t, dims)
            return NonFiniteReport(
                phase="input", module="", op="", kind=kind_of([summary]), source=step.source,
                rank=rank(), hint=hint_for(
                    "input", "the values were non-finite before the model ran; check the data "
                    "pipeline (or what fed this input), the model is not at fault"),
                cause="input", step=step.index, inputs=[summary])
        if not may_replay:
            return self._unreproduced(phase, label, kind, step.source, step.index, why=(
                "under FSDP every rank replays the backward together or none does, and a rank "
                "had no watched forward (or no output gradient) to replay it from; the module "
                "named is the one whose output's gradient held it"))
        self._replaying = True
        try:
            if phase == "forward":
                producer = self._replayer.forward(replay)
            else:
                producer = self._replayer.backward(replay)
        finally:
            self._replaying = False
        if producer is None:
            if phase == "forward" and label in self._replayer.allowed_modules:
                # its -inf is intended (a mask): no alarm, and none for these modules again
                self._allow_inf |= self._replayer.allowed_modules
                return None
            return self._unreproduced(phase, label, kind, step.source, step.index)
        step.producer = producer
        return _to_report(producer, step)

    def _unreproduced(self, phase: Phase, label: str, kind: Kind, source: str, index: int,
                      why: str = "") -> NonFiniteReport:
        """The cheap tier saw a non-finite value that the replay did not make again.

        This still raises (in ``mode="raise"``): the cheap tier reads each tensor's largest
        magnitude, which is non-finite exactly when an element is, so the value was really
        there and would flow on into the loss and the optimizer. What the report must not do
        is pretend to know its producer: no op, a summary saying "producer not found", and a
        hint that says where the two tiers disagree and how to make the replay agree.
        """
        # a parameter's gradient: name the module that owns it
        module = label.removeprefix("parameter ").rpartition(".")[0] if label.startswith(
            "parameter ") else label
        what = {"nan": "NaN", "inf": "an Inf"}.get(kind, kind)
        return NonFiniteReport(
            phase=phase, module=module, op="", kind=kind, source=source, rank=rank(),
            hint=hint_for("not_reproduced", f"the check after the step found {what} in "
                          f"{label or 'the root module'!r}'s {phase} values, but " + (why or (
                              "replaying the step to find the op that made it did not make "
                              "it again (a non-deterministic op, state that changed since, or "
                              "a gradient from outside the watched forward); rerun with "
                              "torch.use_deterministic_algorithms(True), or watch the code "
                              "after the model"))),
            cause="not_reproduced", step=index)

    def _module_named(self, path: str) -> nn.Module | None:
        return next((m for m, p in self._paths.items() if p == path), None)

    def _deliver(self, report: NonFiniteReport, step: _Step | None) -> None:
        if (report.phase == "backward" and self.mode != "warn"
                and isinstance(self.model, nn.parallel.DistributedDataParallel)):
            report.hint += DDP_AFTER_BACKWARD_ERROR
        module = self._module_named(report.module)
        paths = module_aliases(self.model).get(module, []) if module is not None else []
        report.aliases = [path for path in paths if path != report.module]
        self.reports.append(report)
        if self.mode == "warn":
            key = (report.phase, report.module, report.op, report.source)
            if key not in self._warned:  # the same NaN every step after: say it once
                self._warned.add(key)
                get_console(stderr=True).print(report)
            return
        if self.mode == "break" and step is not None and report.cause != "other_rank":
            producer = step.producer
            stop_at_producer(report, producer.index if producer else None,
                             partial(self._replay_to, step), refused=(
                                 "the replay up to that line would run the step's collectives "
                                 "(FSDP's parameter gathers, DTensor redistributions) on this "
                                 "rank alone, and wait forever for the others"
                                 if self._collective else ""))
        raise NonFiniteError(report)

    def _replay_to(self, step: _Step, index: int,
                   on_stop: Callable[[FrameType | None], None] | None) -> Stopped | None:
        self._replayer.on_stop = on_stop
        self._replaying = True
        try:
            return self._replayer.stop_at_call(step.replay, index)
        finally:
            self._replaying = False
            self._replayer.on_stop = None


def params_to_probe(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Parameters whose gradient can go bad while every module's output gradient stays finite.

    A parameter of a built-in ``torch.nn`` layer (Linear, Embedding, LayerNorm, ...) in float32
    or float64 gets its gradient from the layer's finite input and finite output gradient: only
    an overflow past ~1e38 could break it, and the next step's forward would show that. Those
    are skipped, which makes the check free for GPT-2. Parameters used by the user's own code
    (``torch.sqrt(self.gain)``) and half-precision ones are read at the end of the backward.

    >>> class Scaled(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc, self.gain = nn.Linear(2, 2), nn.Parameter(torch.ones(2))
    >>> [name for name, _ in params_to_probe(Scaled())]
    ['gain']
    """
    found: list[tuple[str, nn.Parameter]] = []
    seen: set[int] = set()
    for path, module in model.named_modules():
        builtin = type(module).__module__.startswith("torch.nn.")
        for name, p in module._parameters.items():  # its own, as named_parameters(recurse=False)
            if p is None or id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            if builtin and p.dtype in (torch.float32, torch.float64):
                continue
            found.append((f"{path}.{name}" if path else name, p))
    return found


def _to_report(producer: Producer, step: _Step) -> NonFiniteReport:
    return NonFiniteReport(
        phase=producer.phase, module=producer.module, op=producer.op, kind=producer.kind,
        source=producer.source, rank=rank(), hint=producer.hint, cause=producer.cause,
        step=step.index, forward_op=producer.forward_op, inputs=producer.inputs,
        outputs=producer.outputs, params=producer.params, call=producer.call)


def watch_nans(model: nn.Module, *, mode: Mode = "raise", check_inf: bool = True,
               every: int = 1, dims: Mapping[str, int] | None = None) -> NanWatch:
    """Watch ``model`` for NaN/Inf; at the first one, name the op, module and line that made it.

    ``mode``: ``"raise"`` a :class:`NonFiniteError`, ``"warn"`` (print the report, go on), or
    ``"break"`` (stop in the debugger at the producing line, then raise). ``check_inf=False``
    watches NaN only; ``every=N`` checks every N-th forward (and its backward); ``dims`` names
    sizes for the report's shapes (``{"B": 8}``).

    >>> model = torch.nn.Linear(2, 2)
    >>> with watch_nans(model) as watch:
    ...     model(torch.ones(1, 2)).sum().backward()
    >>> watch.reports
    []
    """
    return NanWatch(model, mode=mode, check_inf=check_inf, every=every, dims=dims)
