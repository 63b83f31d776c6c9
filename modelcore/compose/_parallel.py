"""Cache-sized blocks on a few Python threads, each running single-threaded torch ops.

Torch ops release the GIL while they run, so k Python threads looping over their own
cache-sized blocks (intra-op threads set to 1 by the caller, ``single_thread``) use k
cores with no barrier per op: an OpenMP team waits at the end of every op for its
slowest member, which on a shared machine means a stall per op whenever another process
holds a core (``_threads.py``). Blocks are handed out one at a time from a shared
counter, so a thread on a busy core just takes fewer of them.

``work(i, state)`` must only write what block ``i`` owns (disjoint output rows or file
ranges); ``state`` is one per thread (its scratch buffers).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from typing import TypeVar

S = TypeVar("S")


def default_workers() -> int:
    """Threads for block loops: the cores this process may run on, at most 4."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(4, n))


def run_blocks(
    n_blocks: int,
    work: Callable[[int, S], None],
    make_state: Callable[[], S],
    n_workers: int,
) -> None:
    """Run ``work(i, state)`` for i in 0..n_blocks-1 on up to ``n_workers`` threads (the
    caller's included); the first exception stops the others and is re-raised."""
    n = max(1, min(n_workers, n_blocks))
    counter = itertools.count()  # next() on it is atomic under the GIL
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            state = make_state()
            while not errors:
                i = next(counter)
                if i >= n_blocks:
                    return
                work(i, state)
        except BaseException as e:  # re-raised in the caller below
            errors.append(e)

    helpers = [threading.Thread(target=loop, daemon=True) for _ in range(n - 1)]
    for t in helpers:
        t.start()
    loop()
    for t in helpers:
        t.join()
    if errors:
        raise errors[0]
