"""Independent training jobs in worker processes, results in submission order.

Sweeps here train settings that share nothing, each too small to use many threads well, so two
single-threaded processes beat one two-threaded one. :func:`in_order` runs ``fn(*task)`` for every
task -- in this process when ``jobs == 1``, else in ``jobs`` spawned workers that split this process's
torch threads between them, the costliest tasks submitted first -- and yields the results in the tasks' order, each as soon as it and every task
before it are done, so a caller that writes as it goes can resume where it stopped.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

Result = TypeVar("Result")


def check_jobs(jobs: object) -> int:
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    return jobs


def in_order(fn: Callable[..., Result], tasks: Sequence[tuple[Any, ...]], jobs: int = 1,
             cost: Callable[[tuple[Any, ...]], float] | None = None) -> Iterator[Result]:
    """``fn(*task)`` for each task, yielded in task order; ``jobs > 1`` runs them in worker processes.

    ``fn`` must be importable by name (workers are spawned); ``cost(task)`` orders submission (largest
    first) so the longest job does not start last. Each worker gets this process's torch thread count
    divided by ``jobs`` (at least one). Workers exit when this process dies.
    """
    check_jobs(jobs)
    if jobs == 1 or len(tasks) < 2:
        for task in tasks:
            yield fn(*task)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    threads = max(1, torch.get_num_threads() // jobs)
    order = sorted(range(len(tasks)), key=lambda i: -cost(tasks[i])) if cost else range(len(tasks))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_worker,
                             initargs=(os.getpid(), threads)) as pool:
        submitted = {i: pool.submit(fn, *tasks[i]) for i in order}
        for i in range(len(tasks)):  # in task order; the others keep running meanwhile
            yield submitted[i].result()


def _start_worker(parent: int, threads: int) -> None:
    """Worker initialiser: ``threads`` intra-op torch threads, and a daemon thread that ends this process as
    soon as ``parent`` is gone.

    A worker whose parent was killed (``kill -9``, a crash) is re-parented; without this it would
    train to the end of its job (and the pool's resource tracker would wait for it) with nobody to
    read the result.
    """
    import torch

    torch.set_num_threads(threads)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="revlens-exit-with-parent", daemon=True).start()
