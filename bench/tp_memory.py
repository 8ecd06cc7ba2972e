"""Peak memory per rank of a ~100M hybrid under TP=1/2/4 on CPU (gloo), against what its
parameter, gradient and AdamW state sizes predict. Prints a table (docs/PARALLEL.md).

    python bench/tp_memory.py                 # TP 1, 2, 4; seq_len 256, micro-batch 1
    python bench/tp_memory.py --tp 2 --seq-len 512

Each rank (large allocations straight from mmap, so freed memory leaves the resident set)
samples its resident set (/proc/self/statm) every millisecond. "model" is the
growth over the baseline after imports once the TP model is built and the full model it
was sharded from is freed; "step peak" the growth at the highest point of two training
steps (forward, backward, AdamW; the second has Adam's states), i.e. model + gradients +
optimizer states + activations + the optimizer's temporaries; "steady" the growth after
the steps (weights, gradients, Adam's moments). Predicted: 4 bytes per local parameter for weights, 4 for
gradients, 8 for AdamW's two moments (fp32 throughout).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

PAGE = resource.getpagesize()


def config():
    from strata.model.config import ModelConfig

    cfg = ModelConfig(pattern="M-M-M*-M-M-M*-M-", d_model=768, vocab_size=32000, max_seq_len=4096)
    cfg.mamba.headdim, cfg.mamba.d_state, cfg.mamba.ngroups, cfg.mamba.chunk_size = 64, 128, 8, 128
    cfg.attention.n_heads, cfg.attention.n_kv_heads, cfg.attention.rope = 12, 4, False
    cfg.validate()
    return cfg


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakSampler:
    def __init__(self):
        self.peak, self._stop = rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def rank_main(rank: int, tp: int, port: int, seq_len: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(tp), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
    dist.init_process_group("gloo", rank=rank, world_size=tp)
    from strata.model.hybrid import HybridLM
    from strata.parallel.tensor.blocks import tensor_parallel
    from strata.parallel.tensor.mappings import TPContext
    from strata.parallel.topology import init_topology

    init_topology(tp, 1)
    gc.collect()
    base = rss()
    torch.manual_seed(0)
    model = HybridLM(config())
    total = sum(p.numel() for p in model.parameters())
    if tp > 1:
        model = tensor_parallel(model, TPContext.from_parallel_state())
    gc.collect()
    static = rss() - base
    local = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 32000, (1, seq_len + 1), generator=torch.Generator().manual_seed(0))
    with PeakSampler() as sampler:
        for _ in range(2):
            loss = model(ids[:, :-1], labels=ids[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
    del loss
    gc.collect()
    steady = rss() - base
    Path(out, f"{tp}-{rank}.json").write_text(json.dumps(
        {"total": total, "local": local, "model": static, "steady": steady, "peak": sampler.peak - base}))
    dist.destroy_process_group()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, nargs="*", default=[1, 2, 4])
    p.add_argument("--seq-len", type=int, default=256)
    args = p.parse_args(argv)
    from strata.parallel.distributed import free_port

    # Large tensors from mmap, returned to the OS when freed: otherwise glibc's dynamic
    # threshold keeps freed activations in the heap and the resident set overstates what
    # is live. Read by each rank's allocator at start-up.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    out = tempfile.mkdtemp()
    rows = []
    for tp in args.tp:
        mp.spawn(rank_main, args=(tp, free_port(), args.seq_len, out), nprocs=tp, join=True)
        ranks = [json.loads(Path(out, f"{tp}-{r}.json").read_text()) for r in range(tp)]
        worst = max(ranks, key=lambda r: r["peak"])
        rows.append((tp, worst))
    mib = 2**20
    print(f"~{rows[0][1]['total'] / 1e6:.0f}M-parameter hybrid, seq_len {args.seq_len}, micro-batch 1, fp32, AdamW")
    print("| TP | params/rank | weights: predicted / measured | + grads + AdamW: predicted / measured after the steps "
          "| step peak (measured) | peak - steady |")
    print("|---:|---:|---:|---:|---:|---:|")
    for tp, r in rows:
        print(f"| {tp} | {r['local'] / 1e6:.1f}M | {4 * r['local'] / mib:.0f} / {r['model'] / mib:.0f} MiB | "
              f"{16 * r['local'] / mib:.0f} / {r['steady'] / mib:.0f} MiB | {r['peak'] / mib:.0f} MiB | "
              f"{(r['peak'] - r['steady']) / mib:.0f} MiB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
