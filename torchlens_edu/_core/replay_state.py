"""Is the toolkit re-running a step right now? (``tle.replaying()``)

When the NaN watch finds a NaN/Inf it runs the failing step again, watched op by op, to name
the op that made it. That replay runs the model's own code and every hook on it, the user's
included, because a hook may change what the step computes. Hooks with side effects (counting,
logging, saving) ask :func:`replaying` and skip it; the toolkit's own observers (capture, hook
call numbering, shape traces) do the same, so that nothing records the step twice.

The answer is per thread: a replay in one thread is not one in another. A backward replay may
run on autograd's worker threads (on a GPU); while it runs, those threads count as replaying
too.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["recomputing", "replay_scope", "replaying"]

_threads: dict[int, int] = {}  # thread id -> how many replays it is inside
_backwards = 0  # replays now inside a backward (whose hooks may run on autograd's threads)
_lock = threading.Lock()


def replaying() -> bool:
    """True while the NaN watch replays a step to find the op that made a NaN/Inf.

    A hook with side effects can skip the replay (the step itself already ran it):

    >>> import torch, torchlens_edu as tle
    >>> seen = []
    >>> model = torch.nn.Linear(2, 2)
    >>> def log_shape(module, args, output):
    ...     if not tle.replaying():
    ...         seen.append(tuple(output.shape))
    >>> handle = model.register_forward_hook(log_shape)
    >>> _ = model(torch.ones(1, 2))
    >>> seen, tle.replaying()
    ([(1, 2)], False)
    """
    if not _threads:  # the common case, on every module call of a traced model: one check
        return False
    if threading.get_ident() in _threads:
        return True
    return _backwards > 0 and torch._C._current_graph_task_id() != -1


def recomputing() -> bool:
    """True while a module's forward runs inside a backward pass: activation checkpointing
    (``torch.utils.checkpoint``) recomputing what it did not keep. Such a call repeats one the
    forward already made; observers do not record it as a new call.

    >>> recomputing()
    False
    """
    return torch._C._current_graph_task_id() != -1 and not replaying()


@contextmanager
def replay_scope(*, backward: bool = False) -> Iterator[None]:
    """Mark this thread (and, with ``backward``, autograd's threads) as replaying.

    >>> with replay_scope():
    ...     replaying()
    True
    """
    global _backwards
    me = threading.get_ident()
    with _lock:
        _threads[me] = _threads.get(me, 0) + 1
        _backwards += backward
    try:
        yield
    finally:
        with _lock:
            _backwards -= backward
            if _threads[me] == 1:
                del _threads[me]
            else:
                _threads[me] -= 1
