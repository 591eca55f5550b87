"""Run one piece of test code in several threads at once, switching between them often, and
hand back what they raised (the test asserts the list is empty, so pytest shows the errors)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable


def in_threads(work: Callable[[int], None], n: int = 4, *,
               switch_interval: float = 1e-5) -> list[BaseException]:
    """Call ``work(i)`` for i in 0..n-1, each in its own thread, all starting together.

    >>> in_threads(lambda i: None)
    []
    """
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def run(i: int) -> None:
        start.wait()
        try:
            work(i)
        except BaseException as error:  # returned to the test, which shows it
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(switch_interval)  # switch often: the threads' work interleaves
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    return errors
