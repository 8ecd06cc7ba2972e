"""Process-group start-up from the launcher's environment.

Whether the job came from `strata train` (one process), torchrun, the deepspeed
launcher or SLURM's srun, the rank reads RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT (or SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID) and never
asks which. NCCL on GPU, gloo on CPU. Under srun with one task per GPU and no torchrun,
SLURM's variables alone are enough: MASTER_ADDR / MASTER_PORT are derived from the node list
and the job id (slurm_master).
"""
from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_environment() -> tuple[int, int, int]:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


# A job's MASTER_PORT under srun alone: SLURM_PORT_BASE + job id % SLURM_PORT_SPAN, below Linux's
# ephemeral range (32768-60999), where outgoing connections could already hold the port.
# `strata launch slurm` derives its rendezvous port the same way (launcher/launch.py).
SLURM_PORT_BASE = 15000
SLURM_PORT_SPAN = 15000


def expand_nodelist(nodelist: str) -> Iterator[str]:
    """The host names in a SLURM compressed host list, in order: `gpu[001-003,010],login1` ->
    gpu001 gpu002 gpu003 gpu010 login1 (zero padding is kept, as SLURM writes it; several
    bracket groups in one name expand as a product). Lazy, so taking the first host of a
    10,000-node list costs nothing. Parsed here rather than with `scontrol show hostnames`, so
    that a rank needs none of SLURM's programs (a container often has none)."""
    for item in _split_top_level(nodelist):
        yield from _expand_host(item, nodelist)


def _split_top_level(nodelist: str) -> list[str]:
    """Split at the commas outside brackets: `a[1,3],b` -> `a[1,3]`, `b`."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if depth not in (0, 1):
            raise ValueError(f"SLURM node list {nodelist!r}: unbalanced brackets")
        if ch == "," and depth == 0:
            items.append(nodelist[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"SLURM node list {nodelist!r}: unbalanced brackets")
    items.append(nodelist[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_host(pattern: str, nodelist: str) -> Iterator[str]:
    """One host pattern: `node[01-02]-ib` -> node01-ib node02-ib; the first bracket group is
    expanded here, the rest of the name recursively."""
    match = re.fullmatch(r"([^\[\]]*)\[([^\[\]]+)\](.*)", pattern)
    if match is None:
        if "[" in pattern or "]" in pattern:
            raise ValueError(f"SLURM node list {nodelist!r}: cannot read {pattern!r}")
        yield pattern
        return
    prefix, ranges, rest = match.groups()
    for part in ranges.split(","):
        lo, _, hi = part.strip().partition("-")
        if not lo.isdigit() or not (hi or lo).isdigit() or int(hi or lo) < int(lo):
            raise ValueError(f"SLURM node list {nodelist!r}: {part!r} is not a number or a range a-b")
        for number in range(int(lo), int(hi or lo) + 1):
            for tail in _expand_host(rest, nodelist):
                yield f"{prefix}{number:0{len(lo)}d}{tail}"


def slurm_master(env: Mapping[str, str]) -> dict[str, str]:
    """MASTER_ADDR / MASTER_PORT for a job that srun started with one task per GPU (no torchrun,
    no deepspeed launcher), from SLURM's variables alone, for whichever of the two is missing.
    The address is the first host of the step's node list, where task 0 (rank 0, which serves
    the rendezvous store) runs; the job's node list where the step's is missing. The port
    comes from the job id, so every rank derives the same one without talking to the others,
    and two jobs sharing a node do not collide. Empty outside such a job: a single process
    keeps its free port (two single-process runs in one allocation must not share one), and a
    launcher that set both variables is left alone."""
    launcher_set_ranks = "RANK" in env and "WORLD_SIZE" in env  # as rank_environment reads them
    if launcher_set_ranks or "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) <= 1:
        return {}
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    missing = {}
    if "MASTER_ADDR" not in env and nodelist:
        missing["MASTER_ADDR"] = next(expand_nodelist(nodelist))
    if "MASTER_PORT" not in env and env.get("SLURM_JOB_ID", "").isdigit():
        missing["MASTER_PORT"] = str(SLURM_PORT_BASE + int(env["SLURM_JOB_ID"]) % SLURM_PORT_SPAN)
    return missing


def init_distributed(backend: str = "auto") -> DistInfo:
    rank, world_size, local_rank = rank_environment()
    use_cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        os.environ.update(slurm_master(os.environ))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if world_size == 1:
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        elif "MASTER_PORT" not in os.environ:
            raise RuntimeError("MASTER_PORT is not set for a multi-process job; launch with torchrun, "
                               "the deepspeed launcher or srun, or set MASTER_ADDR/MASTER_PORT")
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank))
        dist.init_process_group(backend, rank=rank, world_size=world_size,
                                device_id=device if use_cuda else None)
    if not use_cuda:
        skip_deepspeed_shm_build()
    return DistInfo(rank, world_size, local_rank, device, backend)


def skip_deepspeed_shm_build() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (about a minute on
    2 cores, redone whenever its flags differ) that only its inference all-reduce uses;
    training talks to torch.distributed (gloo), so the op is marked unavailable instead."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
