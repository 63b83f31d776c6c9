"""CPU threads for loops over cache-sized blocks: the one place modelcore manages them.

Two facts shape every CPU loop here that works block by block (the streamed merge, the
ensemble's log-mix, the MoE reference's inference schedule):

* A block of about 1 MiB is too small to share between intra-op threads: every torch op
  then ends in an OpenMP barrier, and when another process holds a core the barrier
  waits for it. So the loops run with one intra-op thread (``single_thread``).
* Torch ops release the GIL, so k Python threads each looping over their own blocks with
  one intra-op thread use k cores with no barrier per op. Blocks are handed out one at a
  time from a shared counter, so a thread on a busy core just takes fewer of them
  (``run_blocks``).

The Python threads are kept in a pool per size (``worker_threads``), each pinned to one
intra-op thread once, when it starts. The measurements behind this are in
docs/kernels.md, section "CPU threads".

``run_blocks``' ``work(i, state)`` must only write what block ``i`` owns (disjoint output
rows or file ranges); ``state`` is one per thread (its scratch buffers).
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch

S = TypeVar("S")


@contextmanager
def single_thread() -> Iterator[None]:
    """Run the body with one intra-op thread, then put the caller's count back."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def default_workers() -> int:
    """Threads for block loops: the cores this process may run on, at most 4."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    return max(1, min(4, n))


_Task = tuple[Callable[[], None], "queue.SimpleQueue[BaseException | None]"]
_local = threading.local()  # .worker is True on the pool's threads


class WorkerThreads:
    """``n`` daemon threads that run submitted callables, each thread limited to one
    intra-op thread (so ``n`` of them use ``n`` cores, no more).

    ``torch.set_num_threads`` sets the calling thread's OpenMP and MKL thread counts but
    also the process-wide default that new threads start from; the constructor puts that
    default back once every worker has pinned itself."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.pid = os.getpid()
        self._tasks: queue.SimpleQueue[_Task] = queue.SimpleQueue()
        ready = threading.Barrier(n + 1)
        caller_threads = torch.get_num_threads()
        for i in range(n):
            threading.Thread(
                target=self._serve, args=(ready,), name=f"modelcore-worker-{i}", daemon=True
            ).start()
        ready.wait()
        torch.set_num_threads(caller_threads)

    def _serve(self, ready: threading.Barrier) -> None:
        torch.get_num_threads()  # torch's per-thread lazy init first, or it would undo the next
        torch.set_num_threads(1)
        _local.worker = True
        ready.wait()
        while True:
            fn, done = self._tasks.get()
            try:
                fn()
            except BaseException as exc:  # handed to the caller, re-raised there
                done.put(exc)
            else:
                done.put(None)

    def submit(self, fns: list[Callable[[], None]]) -> Callable[[], None]:
        """Start ``fns`` on the workers; the returned function waits for all of them and
        raises the first error."""
        done: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        for fn in fns:
            self._tasks.put((fn, done))

        def wait() -> None:
            errors = [done.get() for _ in fns]
            for exc in errors:
                if exc is not None:
                    raise exc

        return wait

    def run(self, fns: list[Callable[[], None]]) -> None:
        """Run ``fns`` on the workers; return when all are done, raising the first error."""
        self.submit(fns)()


_pools: dict[int, WorkerThreads] = {}
_pools_lock = threading.Lock()


def worker_threads(n: int) -> WorkerThreads:
    """The pool of ``n`` worker threads, made on first use (and again in a forked child,
    which inherits the dict but not the threads)."""
    with _pools_lock:
        pool = _pools.get(n)
        if pool is None or pool.pid != os.getpid():
            pool = _pools[n] = WorkerThreads(n)
        return pool


def run_blocks(
    n_blocks: int,
    work: Callable[[int, S], None],
    make_state: Callable[[], S],
    n_workers: int,
    *,
    caller_works: bool = True,
) -> None:
    """Run ``work(i, state)`` for i in 0..n_blocks-1 on up to ``n_workers`` threads; the
    first exception stops the others and is re-raised.

    With ``caller_works`` the calling thread is one of the ``n_workers`` (call it with one
    intra-op thread, ``single_thread``); without, it only waits, keeping its own intra-op
    threads out of the workers' way. One thread, or a call made from a worker thread
    (whose pool is busy with the caller), runs every block in the calling thread."""
    n = max(1, min(n_workers, n_blocks))
    if getattr(_local, "worker", False):
        n = 1
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

    # The pool is sized by n_workers, not by this call's block count, so that calls with
    # different block counts share one set of threads.
    if n == 1:
        loop()
    elif caller_works:
        wait = worker_threads(n_workers - 1).submit([loop] * (n - 1))
        loop()
        wait()
    else:
        worker_threads(n_workers).run([loop] * n)
    if errors:
        raise errors[0]
