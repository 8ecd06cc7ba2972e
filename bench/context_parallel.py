"""The bytes each context-parallel rank sends per layer, by block kind, against the plan's count
(parallel/plan.py context_parallel_bytes), on CPU with gloo.

    python bench/context_parallel.py                 # cp 2 and 4, a small M*- model, fp32
    python bench/context_parallel.py --cp 2 --seq-len 4096 --batch 2

For each block kind, a one-block model runs one forward and backward under CP with every collective
of parallel/context/ counted: an all-gather (forward) or reduce-scatter (backward) of a rank's part of
P bytes sends (cp - 1) x P from each rank in a ring, the volume NCCL's ring moves. The forward's count
is the plan's; the backward's reduce-scatters send as much again.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KINDS = {"M": "mamba2", "*": "attention", "-": "mlp"}


def tiny_config(letter: str, seq_len: int):
    from strata.model.config import ModelConfig

    cfg = ModelConfig(pattern=letter, d_model=128, vocab_size=256, max_seq_len=seq_len)
    cfg.mamba.headdim, cfg.mamba.d_state, cfg.mamba.ngroups, cfg.mamba.chunk_size = 32, 64, 2, 64
    cfg.attention.n_heads, cfg.attention.n_kv_heads = 8, 2
    cfg.validate()
    return cfg


class Counter:
    """Wraps the two collectives parallel/context/pieces.py calls, adding (cp - 1) x the part sent."""

    def __init__(self, size: int):
        from strata.parallel.context import pieces

        self.pieces, self.size, self.sent = pieces, size, {"forward": 0, "backward": 0}
        self.gather, self.scatter = pieces._all_gather, pieces._reduce_scatter

    def __enter__(self):
        def gather(out, t, group=None, **kwargs):
            self.sent["forward"] += (self.size - 1) * t.numel() * t.element_size()
            return self.gather(out, t, group=group, **kwargs)

        def scatter(out, t, group=None, **kwargs):
            self.sent["backward"] += (self.size - 1) * out.numel() * out.element_size()
            return self.scatter(out, t, group=group, **kwargs)

        self.pieces._all_gather, self.pieces._reduce_scatter = gather, scatter
        return self

    def __exit__(self, *exc):
        self.pieces._all_gather, self.pieces._reduce_scatter = self.gather, self.scatter


def measure(rank: int, world: int, port: int, seq_len: int, batch: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from strata.model.hybrid import HybridLM
    from strata.parallel.context.blocks import context_parallel
    from strata.parallel.context.pieces import CPContext
    from strata.parallel.plan import context_parallel_bytes

    ctx = CPContext.of_group(dist.group.WORLD)
    for letter, kind in KINDS.items():
        cfg = tiny_config(letter, seq_len)
        torch.manual_seed(0)
        model = context_parallel(HybridLM(cfg), ctx)
        ids = torch.randint(0, cfg.vocab_size, (batch, seq_len))
        with Counter(world) as counter:
            model(ctx.shard(ids), labels=ctx.shard(ids)).backward()
        planned = context_parallel_bytes(cfg, batch, seq_len, world, act_bytes=4)[letter]
        if rank == 0:
            out[kind] = (counter.sent["forward"], counter.sent["backward"], planned)
    dist.destroy_process_group()


def run(cp: int, seq_len: int, batch: int) -> dict:
    from tests.parallel.dist_helpers import free_port

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(measure, args=(cp, free_port(), seq_len, batch, out), nprocs=cp, join=True)
        return dict(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cp", type=int, nargs="+", default=[2, 4])
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args()
    print("| cp | block | sent per rank, forward | backward | plan (forward) |")
    print("|---:|---|---:|---:|---:|")
    for cp in args.cp:
        for kind, (forward, backward, planned) in run(cp, args.seq_len, args.batch).items():
            print(f"| {cp} | {kind} | {forward:,} B | {backward:,} B | {planned:,.0f} B |")


if __name__ == "__main__":
    main()
