"""Data-parallel training (DDP) across the processes torchrun starts: one per GPU, or gloo on CPU.

`train.processes: N` (N > 1) makes `medtune train` start itself again under torchrun
(`python -m torch.distributed.run --standalone --nproc_per_node N`), so `dvc repro`, the Prefect
flows and a plain command scale the same way, and params.yaml records how a model was trained.
Across machines, run `torchrun --nnodes ... --no-python medtune train` yourself, with
`train.processes` set to the total number of processes. The scaling is torchrun's and DDP's; this
module only reads torchrun's environment and makes the ranks agree where their numbers could drift.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from components.common import StageError
from components.model.models import pick_device


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """This process's place among torchrun's (RANK, LOCAL_RANK, WORLD_SIZE); a world of one without torchrun."""
    env = os.environ
    if "WORLD_SIZE" not in env:
        return World()
    return World(int(env["RANK"]), int(env.get("LOCAL_RANK", "0")), int(env["WORLD_SIZE"]))


def device(w: World) -> torch.device:
    """This rank's GPU (LOCAL_RANK) when there are GPUs, else the CPU."""
    if w.size == 1 or not torch.cuda.is_available():
        return pick_device()
    if w.local_rank >= torch.cuda.device_count():
        raise StageError(
            f"torchrun process {w.local_rank} on this machine has no GPU of its own: there are "
            f"{torch.cuda.device_count()}; expected at most one process per GPU (train.processes)."
        )
    torch.cuda.set_device(w.local_rank)
    return torch.device("cuda", w.local_rank)


@contextmanager
def process_group(w: World, dev: torch.device) -> Iterator[None]:
    """NCCL between GPUs, gloo between CPU processes; nothing for a world of one."""
    if w.size == 1:
        yield
        return
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def from_main(obj: Any, w: World) -> Any:
    """Rank 0's `obj` on every rank: decisions (early stopping) must be the same everywhere."""
    if w.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def total(values: Sequence[float], w: World, dev: torch.device) -> list[float]:
    """Element-wise sum over all ranks."""
    if w.size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.tolist()


def check_replicas(model: torch.nn.Module, w: World, dev: torch.device) -> None:
    """DDP keeps the replicas identical (averaged gradients, same optimizer); if they are not, the
    model rank 0 saves is not what was trained. One sum of the weights per rank, compared."""
    if w.size == 1:
        return
    mine = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1).to(dev)
    out = [torch.zeros_like(mine) for _ in range(w.size)]
    dist.all_gather(out, mine)
    sums = [float(t) for t in out]
    if not all(math.isclose(c, sums[0], rel_tol=1e-9, abs_tol=1e-9) for c in sums):
        raise StageError(
            f"the {w.size} training processes ended with different weights (checksums {sums}); "
            "expected identical replicas under DDP."
        )


LIFETIME = "components.lifetime"  # `python -m components.lifetime [--parent PID] MODULE ARGS`


def launch(processes: int, module: str, args: Sequence[str]) -> None:
    """Run `python -m module args` as `processes` torchrun workers on this machine; wait for them.

    Their stderr is passed through line by line (so Prefect's stage capture sees it) and the last
    `error: ` line of a failed worker becomes this StageError's message.
    """
    # Each process dies with the one that started it (Linux): torchrun with this one, each worker
    # with torchrun. The wrapper binds a process to its parent and then runs the module in place.
    # It is process plumbing like the `medtune` entry point (components/cli.py), not stage code: it
    # changes nothing train computes, so it is named here rather than imported (dvc.yaml deps).
    cmd = [
        sys.executable,
        "-m",
        LIFETIME,
        "--parent",
        str(os.getpid()),
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
        LIFETIME,
        module,
        *args,
    ]
    # Started from, and waited for in, this thread: the parent-death signal follows the starting thread.
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, bufsize=1)
    error = None
    for line in proc.stderr:
        sys.stderr.write(line)
        if line.startswith("error: "):
            error = line.removeprefix("error: ").strip()
    code = proc.wait()
    if code:
        raise StageError(f"torchrun with {processes} processes failed (exit {code}): {error or 'see the log above'}")
