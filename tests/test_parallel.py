"""parallel.map_files on one process, a local process pool and a real 2-worker Dask LocalCluster on
127.0.0.1: the same results in the same order, failures that name the item, the scheduler or the
module, nothing left running; then ingest + preprocess on the cluster give the bytes of one process.
"""

from __future__ import annotations

import functools
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from components import parallel
from components.common import StageError
from components.data import demo_data
from components.params import ComputeParams, parse_params
from tests.workspace import ROOT, free_port, tree_digest


@pytest.fixture(scope="module")
def cluster():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None) as lc,
        Client(lc.scheduler_address, set_as_default=False) as client,
    ):
        yield {"address": lc.scheduler_address, "client": client}


def worker_pids(client) -> set[int]:
    client.wait_for_workers(2, timeout=60)
    return set(client.run(os.getpid).values())


# Module-level, so they pickle to the workers (which import this module from the same sys.path).
def work(salt: str, item: int) -> tuple[int, str, int]:
    return item, hashlib.sha256(f"{salt}{item}".encode()).hexdigest(), os.getpid()


def reject(bad: str, item: str) -> str:
    if item == bad:
        raise ValueError("bit depth 7; expected 8 or 16")
    return item


def divide(item: int) -> float:
    return 1 / (item - 200)


def die_on(victim: int, item: int) -> int:
    if item == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    return item


MODES = {
    "in-process": lambda c: ComputeParams(workers=1),
    "local-pool": lambda c: ComputeParams(workers=2),
    "dask": lambda c: ComputeParams(dask_scheduler=c["address"]),
}


@pytest.fixture(autouse=True)
def no_env_scheduler(monkeypatch):
    monkeypatch.delenv(parallel.DASK_ENV, raising=False)


@pytest.mark.slow
def test_same_results_in_order_wherever_computed(cluster):
    items = list(range(300))
    expected = [work("s", i)[:2] for i in items]
    where = {}
    for mode, compute in MODES.items():
        out = parallel.map_files(functools.partial(work, "s"), items, compute(cluster))
        assert [r[:2] for r in out] == expected, mode
        where[mode] = {r[2] for r in out}
    assert where["in-process"] == {os.getpid()}
    assert len(where["local-pool"]) == 2 and os.getpid() not in where["local-pool"]
    assert where["dask"] <= worker_pids(cluster["client"]) and len(where["dask"]) == 2


def test_a_pool_starts_only_when_the_work_pays_for_it():
    # An append of 200 small scans (5 kB) stays in this process, a full build of 20,000 uses every core,
    # and 200 scans of 1 MiB (about 2 s of decoding) are worth four workers where there are cores.
    assert parallel.pool_size(parallel.decode_seconds(200, 200 * 5000), 2) == 1
    assert parallel.pool_size(parallel.decode_seconds(20000, 20000 * 5000), 2) == 2
    assert parallel.pool_size(parallel.decode_seconds(200, 200 * 2**20), 32) == 4
    items, compute = list(range(300)), ComputeParams(workers=2)
    here = parallel.map_files(functools.partial(work, "w"), items, compute, work_seconds=0.9)
    assert {r[2] for r in here} == {os.getpid()}
    pooled = parallel.map_files(functools.partial(work, "w"), items, compute, work_seconds=1.0)
    assert os.getpid() not in {r[2] for r in pooled} and [r[:2] for r in pooled] == [r[:2] for r in here]


def test_imap_serves_every_item_from_one_pool_in_order_and_a_caller_that_stops_leaves_no_worker():
    items, compute = list(range(2000)), ComputeParams(workers=2)
    it = parallel.imap_files(functools.partial(work, "i"), items, compute, work_seconds=10)
    first = [next(it) for _ in range(600)]  # more chunks than one (MAX_CHUNK), consumed as they come
    assert [r[:2] for r in first] == [work("i", i)[:2] for i in range(600)]
    pool = {r[2] for r in first}
    assert len(pool) == 2 and os.getpid() not in pool
    assert {p.pid for p in psutil.Process().children()} >= pool  # the pool is alive while the caller reads
    it.close()  # a caller that stops early: the pool is killed, not left running
    assert not pool & {p.pid for p in psutil.Process().children()}
    # A whole run: every item, in order, all from the one pool of two workers.
    out = list(parallel.imap_files(functools.partial(work, "i"), items, compute, work_seconds=10))
    assert [r[:2] for r in out] == [work("i", i)[:2] for i in items] and len({r[2] for r in out}) == 2


@pytest.mark.slow
def test_env_var_overrides_params(cluster, monkeypatch):
    monkeypatch.setenv(parallel.DASK_ENV, cluster["address"])
    out = parallel.map_files(functools.partial(work, "e"), range(10), ComputeParams(workers=1))
    assert [r[0] for r in out] == list(range(10))
    assert {r[2] for r in out} <= worker_pids(cluster["client"])


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_an_error_in_fn_names_the_item(cluster, mode):
    items = [f"scans/{i:03d}.dcm" for i in range(200)]
    with pytest.raises(
        parallel.ItemFailed, match=r"^probe: scans/137\.dcm: ValueError: bit depth 7; expected 8 or 16$"
    ):
        parallel.map_files(functools.partial(reject, "scans/137.dcm"), items, MODES[mode](cluster), desc="probe")


def test_an_unexpected_error_carries_the_workers_traceback():
    with pytest.raises(
        parallel.ItemFailed,
        match=r"(?s)^hash: 200: ZeroDivisionError: division by zero\n"
        r"Traceback.*in divide\n.*1 / \(item - 200\)",
    ):
        parallel.map_files(divide, range(300), ComputeParams(workers=2), desc="hash")


def test_a_killed_local_worker_is_named_and_the_pool_is_gone():
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(StageError, match=r"a local worker process died \(killed, or out of memory\?\)"):
        parallel.map_files(functools.partial(die_on, 150), range(300), ComputeParams(workers=2))
    left = [
        p
        for p in psutil.Process().children(recursive=True)
        if p.pid not in before and "resource_tracker" not in " ".join(p.cmdline())
    ]
    assert not left, [p.cmdline() for p in left]


SLOW_MAP = """
import signal, sys, time
# As in a terminal: a test run started in the background (`cmd &` in a script) inherits SIGINT ignored,
# and Python then installs no KeyboardInterrupt handler.
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path[:0] = [{root!r}]
from components import parallel
from components.params import ComputeParams
from tests import test_parallel
if __name__ == "__main__":
    parallel.map_files(test_parallel.nap, range(4000), ComputeParams(workers=2))  # 100 s: outlasts a slow start
"""


def nap(item: int) -> int:
    time.sleep(0.05)
    return item


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_no_worker_outlives_an_interrupted_or_killed_map(tmp_path, sig):
    script = tmp_path / "slow_map.py"
    script.write_text(SLOW_MAP.format(root=str(ROOT)))
    proc = subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True)
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 60
        workers: list[psutil.Process] = []
        while len(workers) < 2 and time.monotonic() < deadline:  # until both pool workers run
            workers = [p for p in parent.children() if "resource_tracker" not in " ".join(p.cmdline())]
            time.sleep(0.2)
        assert len(workers) == 2, "the pool never started"
        time.sleep(1)
        proc.send_signal(sig)
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"pool workers still running after {sig.name} of their parent"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if sig == signal.SIGINT:
        assert "KeyboardInterrupt" in proc.stderr.read()


def test_unreachable_scheduler_names_address_and_setting(monkeypatch):
    monkeypatch.setattr(parallel, "CONNECT_TIMEOUT", "1s")
    address = f"tcp://127.0.0.1:{free_port()}"
    with pytest.raises(StageError, match=rf"Dask scheduler {address} \(from compute.dask_scheduler\) did not answer"):
        parallel.map_files(str, ["a"], ComputeParams(dask_scheduler=address))
    monkeypatch.setenv(parallel.DASK_ENV, address)
    with pytest.raises(StageError, match=rf"{address} \(from the environment variable {parallel.DASK_ENV}\)"):
        parallel.map_files(str, ["a"], ComputeParams(dask_scheduler="tcp://127.0.0.1:1"))


@pytest.mark.slow
def test_workers_that_cannot_import_fn_are_named(cluster, tmp_path, monkeypatch):
    # A module only this process can import (the workers started before it existed, elsewhere on sys.path).
    (tmp_path / "only_on_the_client.py").write_text("def echo(x):\n    return x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import only_on_the_client

    with pytest.raises(StageError, match=r"a Dask worker of .* cannot import only_on_the_client .*same medtune"):
        parallel.map_files(only_on_the_client.echo, [1, 2], ComputeParams(dask_scheduler=cluster["address"]))


@pytest.mark.slow
def test_relative_paths_are_refused_on_dask(cluster, tmp_path, monkeypatch):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "a.png").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StageError, match=r"hash: relative path raw/a\.png sent to Dask workers"):
        parallel.map_files(len, ["raw/a.png"], ComputeParams(dask_scheduler=cluster["address"]), desc="hash")


def test_flows_run_their_tasks_on_the_configured_scheduler(tmp_path, monkeypatch):
    # The selection only: a pipeline flow run on the cluster needs the stages' per-file work to send
    # absolute paths (test_relative_paths_are_refused_on_dask).
    from prefect_dask import DaskTaskRunner

    from flows.pipeline import on_cluster, pipeline, task_runner

    assert task_runner(ComputeParams()) is None
    assert task_runner(ComputeParams(dask_scheduler="tcp://10.0.0.5:8786")).address == "tcp://10.0.0.5:8786"
    params = tmp_path / "params.yaml"
    params.write_text("compute:\n  dask_scheduler: tcp://10.0.0.5:8786\n")
    monkeypatch.setenv(parallel.DASK_ENV, "tcp://10.0.0.6:8786")
    flow = on_cluster(pipeline, params)
    assert isinstance(flow.task_runner, DaskTaskRunner) and flow.task_runner.address == "tcp://10.0.0.6:8786"
    monkeypatch.delenv(parallel.DASK_ENV)
    params.write_text("compute:\n  workers: 2\n")
    assert on_cluster(pipeline, params) is pipeline


# --------------------------------------------------------------------------- the stages


def stage_outputs(raw: Path, out: Path, compute: dict) -> dict[str, bytes]:
    """ingest then preprocess of `raw` into `out`, caches inside `out` (so each run reads every scan)."""
    from components.data.ingest import ingest
    from components.data.preprocess import preprocess

    params = parse_params(
        {
            "split": {"seed": 3, "val_fraction": 0.2, "test_fraction": 0.25},
            "preprocess": {"image_size": 16},
            "compute": compute,
        }
    )
    ingest(raw, out, params, cache_dir=out / "facts")
    preprocess(out / "manifest.csv", raw, out / "prepared", params, cache_dir=out / "pixels")
    files = {f"data/{n}": (out / n).read_bytes() for n in ("manifest.csv", "manifest.json")}
    files.update({f"data/prepared/{k}": v for k, v in tree_digest(out / "prepared").items()})
    return files


@pytest.mark.slow
def test_ingest_and_preprocess_give_the_same_bytes_on_the_cluster(cluster, tmp_path, monkeypatch):
    from distributed import get_task_stream

    raw = tmp_path / "raw"  # absolute: the workers see it at the same path
    demo_data.generate(raw, patients=45, slices=3, size=24, seed=5, classes=["normal", "lesion"])
    # 135 small scans are too little work to pay for a pool's start: pretend a start is free, so the
    # local run below does use two processes.
    monkeypatch.setattr(parallel, "WORKER_START_SECONDS", 1e-4)
    one = stage_outputs(raw, tmp_path / "one", {"workers": 1})
    assert {"data/manifest.csv", "data/manifest.json", "data/prepared/index.csv", "data/prepared/meta.json"} <= set(one)
    assert stage_outputs(raw, tmp_path / "pool", {"workers": 2}) == one
    worker_pids(cluster["client"])  # both workers up
    with get_task_stream(cluster["client"]) as stream:
        on_dask = stage_outputs(raw, tmp_path / "dask", {"dask_scheduler": cluster["address"]})
    assert on_dask.keys() == one.keys()
    assert [k for k in one if on_dask[k] != one[k]] == []
    chunks = [t for t in stream.data if t["key"].startswith("_run_chunk")]
    assert chunks and {t["worker"] for t in chunks} == set(cluster["client"].scheduler_info()["workers"])


@pytest.mark.slow
def test_a_killed_dask_worker_is_named(cluster):
    # Last: it costs the cluster four worker restarts (Dask retries the task on other workers first).
    with pytest.raises(StageError, match=r"the Dask cluster at .* lost the files from \d+.*: KilledWorker"):
        parallel.map_files(functools.partial(die_on, 7), range(20), ComputeParams(dask_scheduler=cluster["address"]))
