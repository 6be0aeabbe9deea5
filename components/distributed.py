"""Data-parallel training (DDP) across the processes torchrun starts: one per GPU, or gloo on CPU.

`train.processes: N` (N > 1) makes `medtune train` start itself again under torchrun
(`python -m torch.distributed.run --standalone --nproc_per_node N`), so `dvc repro`, the Prefect
flows and a plain command scale the same way, and params.yaml records how a model was trained.
Across machines, run `torchrun --nnodes ... --no-python medtune train` yourself, with
`train.processes` set to the total number of processes. The scaling is torchrun's and DDP's; this
module only reads torchrun's environment and makes the ranks agree where their numbers could drift.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from components.common import StageError


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
    if not torch.cuda.is_available():
        return torch.device("cpu")
    if w.size == 1:
        return torch.device("cuda")
    if w.local_rank >= torch.cuda.device_count():
        raise StageError(f"torchrun process {w.local_rank} on this machine has no GPU of its own: there are "
                         f"{torch.cuda.device_count()}; expected at most one process per GPU (train.processes).")
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


def gathered(value: float, w: World, dev: torch.device) -> list[float]:
    """One value from each rank, in rank order."""
    if w.size == 1:
        return [value]
    out = [torch.zeros(1, dtype=torch.float64, device=dev) for _ in range(w.size)]
    dist.all_gather(out, torch.tensor([value], dtype=torch.float64, device=dev))
    return [float(t) for t in out]


def launch(processes: int, module: str, args: Sequence[str]) -> None:
    """Run `python -m module args` as `processes` torchrun workers on this machine; wait for them.

    Their stderr is passed through line by line (so Prefect's stage capture sees it) and the last
    `error: ` line of a failed worker becomes this StageError's message.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", module, *args]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, bufsize=1)
    error = None
    for line in proc.stderr:
        sys.stderr.write(line)
        if line.startswith("error: "):
            error = line.removeprefix("error: ").strip()
    code = proc.wait()
    if code:
        raise StageError(f"torchrun with {processes} processes failed (exit {code}): {error or 'see the log above'}")
