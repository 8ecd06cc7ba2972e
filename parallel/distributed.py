"""Process-group start-up from the launcher's environment.

Whether the job came from `strata train` (one process), torchrun, the deepspeed
launcher or SLURM's srun, the rank reads RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR / MASTER_PORT (or SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID) and never
asks which. NCCL on GPU, gloo on CPU.
"""
from __future__ import annotations

import os
import socket
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


def init_distributed(backend: str = "auto") -> DistInfo:
    rank, world_size, local_rank = rank_environment()
    use_cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if world_size == 1:
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        elif "MASTER_PORT" not in os.environ:
            raise RuntimeError("MASTER_PORT is not set for a multi-process job; launch with torchrun, "
                               "the deepspeed launcher, or set MASTER_ADDR/MASTER_PORT")
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
