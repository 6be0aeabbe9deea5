"""Per-file data work (hash, decode, prepare) spread over local cores or a Dask cluster.

    results = parallel.map_files(probe_one, paths, params.compute, desc="ingest")

`map_files` returns fn(item) for every item, in item order, whoever computed it: one process, a
pool of local processes (`compute.workers`, 0 = every core) or the workers of a Dask scheduler
(`compute.dask_scheduler`, or the environment variable MEDTUNE_DASK_SCHEDULER). Outputs built from
the results are therefore the same bytes in all three cases (tests/test_parallel.py). `fn` must be
a module-level function (or a functools.partial of one): it is pickled to the workers, which must
import its module (the same medtune) and, on Dask, see the files at the same absolute paths.

Failures: fn raising on an item stops the map with `ItemFailed`, a StageError naming the item (and
the worker's traceback when the exception was not an expected one); a worker that dies (killed,
out of memory), a scheduler that does not answer or workers that cannot import fn's module each
stop it with a StageError that says which and what to do. On any exception, Ctrl-C included,
nothing is left running: the local workers are killed, the Dask work cancelled, the client closed.

The work is sent in chunks, so a worker pays its inter-process round trip once per chunk and not
per file. A local pool is started only when the work pays for it: the caller says how many
single-core seconds the work takes (`work_seconds`; `decode_seconds` estimates it for scans), and
each worker must be handed at least what its own start costs (WORKER_START_SECONDS), so an append
of a few hundred scans stays in this process and a full build uses every core. A caller that
gives no estimate gets a pool from MIN_PARALLEL items per worker. A configured Dask cluster is
always used. A progress bar (stderr) counts files when `desc` is given.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures as cf
from pathlib import PurePath
from typing import Any, TypeVar

from tqdm import tqdm

from components.common import StageError
from components.params import ComputeParams

log = logging.getLogger("medtune.parallel")

T = TypeVar("T")
R = TypeVar("R")

DASK_ENV = "MEDTUNE_DASK_SCHEDULER"
MIN_PARALLEL = 64  # without a work estimate: fewer items than this per worker run in this process
# A spawned worker's start: a Python process importing the stage module (numpy, Pillow, pydicom):
# 0.45-0.6 s each, measured on 2 shared cores (a pool of two, start to first result, 0.9-1.2 s).
WORKER_START_SECONDS = 0.5
CHUNKS_PER_WORKER = 8  # chunks per worker: small enough to balance uneven files, large enough to amortise
MAX_CHUNK = 256  # items: what imap_files holds per finished chunk waiting for an earlier one stays small
CONNECT_TIMEOUT = "10s"  # to reach the Dask scheduler
# fn's own errors about its input: the message says it all, no traceback needed.
EXPECTED = (StageError, ValueError, OSError)


class ItemFailed(StageError):
    """fn raised on one item; the message names the item (and carries the worker's traceback)."""


def local_cores() -> int:
    """Cores this process may run on (its CPU affinity, which a container or `taskset` narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def scheduler_address(compute: ComputeParams) -> str | None:
    """The Dask scheduler to use: MEDTUNE_DASK_SCHEDULER, else compute.dask_scheduler, else None."""
    return os.environ.get(DASK_ENV) or compute.dask_scheduler


def _address_source() -> str:
    return f"the environment variable {DASK_ENV}" if os.environ.get(DASK_ENV) else "compute.dask_scheduler"


def workers(compute: ComputeParams) -> int:
    return compute.workers or local_cores()


def decode_seconds(n_files: int, n_bytes: int) -> float:
    """Single-core seconds to decode scans (scan_info.probe or prepare_image): about 0.5 ms a file plus 10 ns
    a byte, measured on PNG and DICOM from 64 px (5 kB: 0.2-0.7 ms) to 2048 px (3.6 MB: 30-34 ms)."""
    return n_files * 5e-4 + n_bytes * 1e-8


def pool_size(work_seconds: float, cores: int) -> int:
    """Local processes worth starting for `work_seconds` of single-core work: as many as get at least
    WORKER_START_SECONDS of it each, at most `cores`; 1 means this process (no pool)."""
    return max(1, min(cores, int(work_seconds // WORKER_START_SECONDS)))


def map_files(
    fn: Callable[[T], R], items: Iterable[T], compute: ComputeParams, desc: str = "", work_seconds: float | None = None
) -> list[R]:
    """[fn(item) for item in items], computed where `compute` says (see the module doc). `work_seconds`:
    the caller's estimate of the whole work on one core, which decides whether a local pool pays."""
    return list(imap_files(fn, items, compute, desc, work_seconds))


def imap_files(
    fn: Callable[[T], R], items: Iterable[T], compute: ComputeParams, desc: str = "", work_seconds: float | None = None
) -> Iterator[R]:
    """map_files, yielding each result in item order as soon as it and those before it are ready: a
    caller that writes results away as they come (preprocess, into a shard) holds a few chunks of
    them in memory, not all, and one pool serves every item (a pool per batch would pay its start-up
    again for every batch)."""
    items = list(items)
    address = scheduler_address(compute)
    if address:
        yield from _map_dask(fn, items, address, desc)
        return
    if work_seconds is None:
        n_workers = min(workers(compute), max(1, len(items) // MIN_PARALLEL))
    else:
        n_workers = min(pool_size(work_seconds, workers(compute)), len(items))
    if n_workers <= 1:
        with _bar(len(items), desc) as bar:
            for item in items:
                yield _run_chunk(fn, [item], desc, bar.update)[0]
        return
    yield from _map_local(fn, items, n_workers, desc)


def _run_chunk(
    fn: Callable[[T], R], chunk: Sequence[T], desc: str, done: Callable[[int], Any] | None = None
) -> list[R]:
    out = []
    for item in chunk:
        try:
            out.append(fn(item))
        except Exception as exc:  # noqa: BLE001 - re-raised, naming the item
            # Message only (no attributes): it must pickle back from a worker process.
            shown = _show(item[0] if isinstance(item, tuple) and item else item)  # a tuple leads with its path
            where = f"{desc or 'map_files'}: " + (
                str(exc) if shown in str(exc) else f"{shown}: {type(exc).__name__}: {exc}"
            )
            raise ItemFailed(where if isinstance(exc, EXPECTED) else f"{where}\n{traceback.format_exc()}") from exc
        if done is not None:
            done(1)
    return out


def _show(item: Any, limit: int = 300) -> str:
    text = str(item)
    return text if len(text) <= limit else text[:limit] + "..."


def _chunks(items: Sequence[T], n_workers: int) -> list[Sequence[T]]:
    size = min(MAX_CHUNK, max(1, -(-len(items) // (n_workers * CHUNKS_PER_WORKER))))
    return [items[i : i + size] for i in range(0, len(items), size)]


def _bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="file", disable=not desc)


def _in_order(
    pending: dict[Any, int],
    chunks: list[Sequence],
    completed: Iterable,
    desc: str,
    lost: Callable[[BaseException, Sequence], str],
) -> Iterator:
    """The results of every chunk's future, in chunk order, each chunk as soon as those before it are
    in; the first failure (as they complete) raised as ItemFailed, or as a StageError that `lost`
    words (a dead worker, a broken cluster)."""
    parts: dict[int, list] = {}
    following = 0
    with _bar(sum(map(len, chunks)), desc) as bar:
        for future in completed:
            i = pending.pop(future)  # a future keeps its result: dropped here, it is held only until yielded
            try:
                parts[i] = future.result()
            except ItemFailed:
                raise
            except Exception as exc:  # noqa: BLE001 - said with the chunk it lost
                raise StageError(lost(exc, chunks[i])) from exc
            bar.update(len(chunks[i]))
            while following in parts:
                yield from parts.pop(following)
                following += 1


def _span(chunk: Sequence) -> str:
    return _show(chunk[0], 150) + (f" and {len(chunk) - 1} more" if len(chunk) > 1 else "")


# --------------------------------------------------------------------------- local processes


def _map_local(fn: Callable[[T], R], items: list[T], n_workers: int, desc: str) -> Iterator[R]:
    # spawn: each worker is this process's child and watches it (_bind_to_parent). A forkserver's
    # workers are the fork server's children: they kept running after a kill -9 of the stage. And
    # not fork: a forked child of a process with threads (Prefect's, torch's) can inherit a lock
    # held by another thread and hang.
    pool = cf.ProcessPoolExecutor(
        n_workers, mp_context=multiprocessing.get_context("spawn"), initializer=_bind_to_parent, initargs=(os.getpid(),)
    )
    chunks = _chunks(items, n_workers)
    try:
        pending = {pool.submit(_run_chunk, fn, chunk, desc): i for i, chunk in enumerate(chunks)}
        yield from _in_order(pending, chunks, cf.as_completed(pending), desc, _local_loss)
    except BaseException:  # an error, Ctrl-C, a caller that stops early (GeneratorExit)
        _kill(pool)  # the other chunks are not worth waiting for
        raise
    pool.shutdown(wait=True)


def _local_loss(exc: BaseException, chunk: Sequence) -> str:
    if isinstance(exc, cf.process.BrokenProcessPool):
        return (
            f"a local worker process died (killed, or out of memory?) while the files from {_span(chunk)} "
            "were not finished; run again, or set compute.workers to fewer processes (1: none)"
        )
    return f"a local worker process failed on the files from {_span(chunk)}: {type(exc).__name__}: {exc}"


def _kill(pool: cf.ProcessPoolExecutor) -> None:
    # ProcessPoolExecutor offers no kill before Python 3.14 (terminate_workers): its process table.
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        p.kill()
    for p in procs:
        p.join()


def _bind_to_parent(parent: int) -> None:
    """In each pool worker: Ctrl-C is the parent's to handle (it kills the pool), and the worker ends
    when the parent is gone however it died (a kill -9 leaves no one to shut the pool down)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(parent,), name="medtune-watch-parent", daemon=True).start()


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


# --------------------------------------------------------------------------- Dask


def _map_dask(fn: Callable[[T], R], items: list[T], address: str, desc: str) -> Iterator[R]:
    from distributed import Client, as_completed  # imported only when a cluster is configured (about 1 s)

    _refuse_relative_paths(fn, items, desc)
    try:
        client = Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
    except (OSError, ValueError, TypeError) as exc:
        raise StageError(
            f"Dask scheduler {address} (from {_address_source()}) did not answer: {exc}. Start it "
            f"(`dask scheduler`, then `dask worker {address}` on each machine), or unset "
            f"compute.dask_scheduler and {DASK_ENV} to use this machine's cores."
        ) from None
    futures: list = []
    with client:  # closed on the way out, whatever happens
        try:
            n_workers = _check_workers(client, fn, address)
            chunks = _chunks(items, n_workers)
            log.info(
                "%s: %d file(s) in %d chunk(s) on the Dask cluster at %s (%d threads)",
                desc or "map",
                len(items),
                len(chunks),
                address,
                n_workers,
            )
            # pure=False: two chunks with equal contents are still two pieces of work to return.
            futures = client.map(_run_chunk, [fn] * len(chunks), chunks, [desc] * len(chunks), pure=False)
            pending = dict(zip(futures, range(len(chunks))))
            yield from _in_order(
                pending,
                chunks,
                as_completed(futures, loop=client.loop),
                desc,
                lambda exc, chunk: (
                    f"the Dask cluster at {address} lost the files from {_span(chunk)}: {type(exc).__name__}: {exc}"
                ),
            )
        except BaseException:
            if futures:
                client.cancel(futures)
            raise


def _fn_module(fn: Callable) -> str:
    while hasattr(fn, "func"):  # functools.partial
        fn = fn.func
    return fn.__module__


def _check_workers(client, fn: Callable, address: str) -> int:
    """Threads on the cluster; StageError when there are none, or when a worker cannot import fn's
    module: a task it cannot unpickle breaks the worker's connection and the map would wait forever."""
    threads = sum(w["nthreads"] for w in client.scheduler_info()["workers"].values())
    if not threads:
        raise StageError(f"the Dask scheduler at {address} has no workers; start some with `dask worker {address}`.")
    module = _fn_module(fn)
    try:
        # exec, a builtin, unpickles on any worker (a function of ours would need the very module in question).
        client.run(exec, f"import {module}", {})
    except ImportError as exc:
        raise StageError(
            f"a Dask worker of {address} cannot import {module} ({exc}): the workers need the same "
            "medtune installed (pip install of this project in their environment)."
        ) from None
    return threads


def _refuse_relative_paths(fn: Callable, items: list, desc: str) -> None:
    """A Dask worker resolves a relative path against its own working directory, not this one's."""
    args = [*getattr(fn, "args", ()), *getattr(fn, "keywords", {}).values()]
    for value in args + items[:1000]:
        for part in value if isinstance(value, (tuple, list)) else (value,):
            if (
                isinstance(part, (str, PurePath))
                and os.sep in str(part)
                and not os.path.isabs(part)
                and os.path.exists(part)
            ):
                raise StageError(
                    f"{desc or 'map_files'}: relative path {part!s} sent to Dask workers, which resolve "
                    f"it against their own working directory, not {os.getcwd()}. Pass absolute "
                    "paths (Path.resolve()); workers must see the files at the same path."
                )
