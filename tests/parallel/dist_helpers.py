"""Multi-process tests on CPU: N ranks spawned with gloo on 127.0.0.1 and a free port.

    spawn(worker, 4, out_dir, ...)   # worker(rank, world_size, out_dir, ...) runs in each rank
    results = read_results(out_dir, 4)

A worker writes what the test asserts on with write_result (JSON, one file per rank); an
exception in any rank fails the spawn with that rank's traceback.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import warnings
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from strata.parallel.distributed import skip_deepspeed_shm_build


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, worker, world_size: int, port: int, args: tuple, timeout_s: float | None) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # several ranks share two cores
    timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timeout)
    skip_deepspeed_shm_build()  # as every training process does (parallel/distributed.py)
    try:
        worker(rank, world_size, *args)
    finally:
        from strata.parallel.topology import destroy_topology

        destroy_topology()
        dist.destroy_process_group()
    leave_process()


def leave_process() -> None:
    """End a spawned rank that finished without interpreter finalization, as launcher/train.py:run
    does: a gloo worker thread still freeing the last collective's tensors then aborts the
    process (SIGABRT, pytorch/pytorch#179291) and fails a rank that did everything right."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(worker, world_size: int, *args, timeout_s: float | None = None) -> None:
    """worker(rank, world_size, *args) on world_size gloo ranks; timeout_s bounds each collective's wait (gloo's
    default is 30 minutes), for a test whose ranks are meant to disagree."""
    mp.spawn(_entry, args=(worker, world_size, free_port(), args, timeout_s), nprocs=world_size, join=True)


def write_result(out_dir, rank: int, result) -> None:
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def read_results(out_dir, world_size: int) -> list:
    return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world_size)]


def spawned_results(tmp_path_factory, name: str, worker, world_size: int) -> list:
    """worker(rank, world_size, out_dir) on world_size gloo ranks; what each wrote, by rank
    (the body of a module-scoped fixture)."""
    out = tmp_path_factory.mktemp(name)
    spawn(worker, world_size, str(out))
    return read_results(out, world_size)


def with_changes(cfg, changes: dict):
    """A test's model config with `changes` applied: `mamba__headdim=32` sets cfg.mamba.headdim, `pattern=...`
    cfg.pattern; then validated."""
    for path, value in changes.items():
        obj, *rest = path.split("__")
        target = getattr(cfg, obj) if rest else cfg
        setattr(target, rest[0] if rest else obj, value)
    cfg.validate()
    return cfg


def rel_error(got: torch.Tensor, want: torch.Tensor, whole: torch.Tensor | None = None) -> float:
    """max |got - want| / max |want|: one number per tensor, scale-free. A shard is measured against its
    whole tensor's scale (`whole`): a shard that happens to hold only small values would otherwise turn
    fp32 rounding of its summation order into a large relative error (1.1e-5 for a Mamba2 shard at TP=4
    on this project's 2-core Xeon, where the gathered tensor's error is 1.1e-6)."""
    scale = (want if whole is None else whole).abs().max().item()
    return (got - want).abs().max().item() / (scale if scale > 0 else 1.0)
