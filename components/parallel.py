"""Per-file data work (hash, decode, prepare) spread over local cores or a Dask cluster.

    results = parallel.map_files(probe_one, paths, params.compute, desc="ingest")

`map_files` returns fn(item) for every item, in item order, whoever computed it: one process, a
pool of local processes (`compute.workers`, 0 = every core) or the workers of a Dask scheduler
(`compute.dask_scheduler`, or the environment variable MEDTUNE_DASK_SCHEDULER). Outputs built from
the results are therefore the same bytes in all three cases (tests/test_parallel.py). `fn` must be
a module-level function (or a functools.partial of one): it is pickled to the workers.

The work is sent in chunks, so a worker pays its inter-process round trip once per chunk and not
per file; below MIN_PARALLEL items the pool's start-up (about 0.3 s) costs more than it saves and
the work stays in this process.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

from tqdm import tqdm

from components.params import ComputeParams

log = logging.getLogger("medtune.parallel")

T = TypeVar("T")
R = TypeVar("R")

DASK_ENV = "MEDTUNE_DASK_SCHEDULER"
MIN_PARALLEL = 64   # fewer items than this run in this process
CHUNKS_PER_WORKER = 8  # chunks per worker: small enough to balance uneven files, large enough to amortise


def local_cores() -> int:
    """Cores this process may run on (its CPU affinity, which a container or `taskset` narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def scheduler_address(compute: ComputeParams) -> str | None:
    """The Dask scheduler to use: MEDTUNE_DASK_SCHEDULER, else compute.dask_scheduler, else None."""
    return os.environ.get(DASK_ENV) or compute.dask_scheduler


def workers(compute: ComputeParams) -> int:
    return compute.workers or local_cores()


def _run_chunk(fn: Callable[[T], R], chunk: Sequence[T]) -> list[R]:
    return [fn(item) for item in chunk]


def _chunks(items: Sequence[T], n_workers: int) -> list[Sequence[T]]:
    size = max(1, -(-len(items) // (n_workers * CHUNKS_PER_WORKER)))
    return [items[i:i + size] for i in range(0, len(items), size)]


def map_files(fn: Callable[[T], R], items: Iterable[T], compute: ComputeParams, desc: str = "") -> list[R]:
    """[fn(item) for item in items], computed where `compute` says (see the module doc)."""
    items = list(items)
    address = scheduler_address(compute)
    if address:
        return _map_dask(fn, items, address, desc)
    n_workers = min(workers(compute), max(1, len(items) // MIN_PARALLEL))
    if n_workers <= 1:
        return [fn(item) for item in tqdm(items, desc=desc, unit="file", disable=not desc)]
    # forkserver, not fork: a forked child of a process with threads (Prefect's, torch's) can
    # inherit a lock held by another thread and hang.
    context = multiprocessing.get_context("forkserver")
    results: list[R] = []
    with ProcessPoolExecutor(n_workers, mp_context=context) as pool, \
            tqdm(total=len(items), desc=desc, unit="file", disable=not desc) as bar:
        for part in pool.map(_run_chunk, [fn] * len(chunks := _chunks(items, n_workers)), chunks):
            results += part
            bar.update(len(part))
    return results


def _map_dask(fn: Callable[[T], R], items: list[T], address: str, desc: str) -> list[R]:
    from distributed import Client  # imported only when a cluster is configured (about 1 s)

    try:
        client = Client(address, timeout="10s")
    except OSError as exc:
        raise RuntimeError(f"Dask scheduler {address} (compute.dask_scheduler / {DASK_ENV}) did not answer: "
                           f"{exc}; start it (`dask scheduler`) or unset it to use local cores.") from None
    with client:
        n_workers = max(1, sum(w["nthreads"] for w in client.scheduler_info()["workers"].values()))
        log.info("%s: %d file(s) on the Dask cluster at %s (%d threads)", desc or "map", len(items), address,
                 n_workers)
        # pure=False: two chunks with equal contents are still two pieces of work to return.
        futures = client.map(_run_chunk, [fn] * len(chunks := _chunks(items, n_workers)), chunks, pure=False)
        results: list[Any] = []
        for part in client.gather(futures):
            results += part
    return results
