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
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

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


T = TypeVar("T")
_LONG_WAIT: dist.ProcessGroup | None = None
"""Every rank, on gloo, with parallel.long_timeout_s: for the waits that are meant to be long (init_distributed)."""


def torchrun_restarts() -> tuple[int, int]:
    """(restarts done, restarts allowed) of this torchrun job (--max-restarts); (0, 0) outside torchrun."""
    env = os.environ
    return int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0), int(env.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)


def restart_hazard() -> str | None:
    """Under torchrun --max-restarts N the restarted ranks read the rendezvous store the launcher shares
    with the job (TORCHELASTIC_USE_AGENT_STORE), where the previous attempt's process-group addresses still
    stand: they connect to dead ranks and hang (pytorch/pytorch#135712, #167288; reproduced with torch 2.13
    and gloo). torchrun's own switch, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, gives every attempt a fresh
    store; it must be set where torchrun starts, so a rank can only say so."""
    if torchrun_restarts()[1] > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return ("torchrun --max-restarts shares its rendezvous store with the job, and a restarted job would hang "
                "connecting to the dead ranks' addresses (pytorch/pytorch#135712): export "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun (strata launch slurm's script does)")
    return None


def init_distributed(backend: str = "auto", timeout_s: int = 1800, long_timeout_s: int = 86400) -> DistInfo:
    """`timeout_s`: how long any collective may wait (parallel.timeout_s); `long_timeout_s`: the separate
    group for the waits meant to be long (long_wait_group)."""
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
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s),
                                device_id=device if use_cuda else None)
    global _LONG_WAIT
    if world_size > 1:  # on gloo whatever the backend: object collectives, and no NCCL watchdog over the wait
        _LONG_WAIT = dist.new_group(backend="gloo", timeout=timedelta(seconds=long_timeout_s))
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
    global _LONG_WAIT
    _LONG_WAIT = None
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------
# Decisions every rank shares
# ----------------------------------------------------------------------------------------
# What decides which collectives run next (which checkpoint to resume, whether the corpus is ready,
# whether the run directory is shared) is decided once and shared, and an error on one rank is an error
# on every rank: a rank that went its own way would enter other collectives than the rest, a hang until
# the watchdog (NCCL, 10 minutes by default) or a collective paired with the wrong one.

def long_wait_group() -> dist.ProcessGroup | None:
    """The gloo group whose timeout is parallel.long_timeout_s (None in a single process)."""
    return _LONG_WAIT if dist.is_initialized() and dist.get_world_size() > 1 else None


def on_every_rank(action: Callable[[], T]) -> T:
    """Collective (on the long-wait group): this rank's action(), once every rank has run its own. When it
    raised anywhere, it raises everywhere: the rank's own exception where it failed, elsewhere one of the same
    type whose message names the first rank that failed ("rank 3: ..."), so each rank ends with one line
    and the same exit code."""
    try:
        result, failure = action(), None
    except Exception as e:  # anything: one rank left out of the next collective would hang the others
        result, failure = None, e
    group = long_wait_group()
    if group is None:
        if failure is not None:
            raise failure
        return result
    outcomes = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, None if failure is None else (type(failure), str(failure)), group=group)
    if failure is not None:
        raise failure
    failed = next(((rank, outcome) for rank, outcome in enumerate(outcomes) if outcome is not None), None)
    if failed is not None:
        raise _as_raised_by(*failed)
    return result


def _as_raised_by(rank: int, outcome: tuple[type, str]) -> Exception:
    kind, message = outcome
    try:
        return kind(f"rank {rank}: {message}")
    except Exception:  # a type that takes other arguments
        return RuntimeError(f"rank {rank}: {kind.__name__}: {message}")


def decided_by_rank0(decide: Callable[[], T]) -> T:
    """Collective: rank 0's decide() (picklable) on every rank; the other ranks wait for it on the
    long-wait group however long it takes, and rank 0's error is every rank's (on_every_rank)."""
    group = long_wait_group()
    if group is None:  # one process: it is rank 0
        return decide()
    value = on_every_rank(decide if dist.get_rank() == 0 else (lambda: None))
    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


# ----------------------------------------------------------------------------------------
# A rank that left
# ----------------------------------------------------------------------------------------

PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
             "remote process exited", "ProcessGroupNCCL's watchdog", "Timed out waiting", "timed out")


def a_rank_left(e: BaseException) -> bool:
    """Whether a collective failed because another rank of the job went away (killed, or ended by its own
    error: gloo says "Connection closed by peer", NCCL aborts its communicator) or did not come within
    parallel.timeout_s."""
    gone = isinstance(e, (dist.DistNetworkError, dist.DistBackendError))
    return gone or (isinstance(e, RuntimeError) and any(sign in str(e) for sign in PEER_GONE))


def ranks_still_here(grace_s: float = 3.0) -> list[int] | None:
    """After a_rank_left: the ranks that say, through the rendezvous store (torchrun's agent holds it, and
    outlives its workers), that they are still running, `grace_s` after this one said so; None when the
    store is gone too (it lived in rank 0, which left). No collective: the process group is broken."""
    if not dist.is_initialized():
        return None
    try:
        store = dist.distributed_c10d._get_default_store()
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        key = lambda rank: f"strata/here/{attempt}/{rank}"  # noqa: E731
        store.set(key(dist.get_rank()), "1")
        world = dist.get_world_size()
        deadline = time.monotonic() + grace_s
        while True:
            here = [rank for rank in range(world) if store.check([key(rank)])]
            if len(here) == world or time.monotonic() > deadline:
                return here
            time.sleep(0.1)
    except Exception:  # the store's host is gone: nothing can be learnt
        return None
