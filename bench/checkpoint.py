"""What checksums cost a checkpoint: save and load time with and without verification, and
the hash's GB/s against the write's, on one process (ZeRO 0, fp32 weights and AdamW states).
Prints a markdown table (docs/BENCHMARKS.md).

    python bench/checkpoint.py                                # configs/hybrid-200m.yaml, 189M
    python bench/checkpoint.py --config configs/tiny.yaml --repeats 3

Each repeat saves with parallel/checkpoint.save_checkpoint (DeepSpeed's files, then every
file's size and CRC32 into the manifest) and loads with parallel/checkpoint.load_checkpoint
after verify(); the checksum pass is timed on its own inside both, so the rows give the time
with and without it. Files are read back right after writing, as a save does, so the hash
reads from the page cache; the load reads what was just written too.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def one_rank_group() -> None:
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    from parallel.distributed import skip_deepspeed_shm_build

    skip_deepspeed_shm_build()


def engine_for(config: str):
    import torch

    from launcher.config import load_config
    from model.hybrid import HybridLM
    from parallel.engine import build_engine

    vocab = "model.vocab_size=4096" if "tiny" in config else "model.vocab_size=32768"
    cfg = load_config(config, [vocab, "parallel.micro_batch_size=1", "train.global_batch_size=1"])
    torch.manual_seed(0)
    model = HybridLM(cfg.model)
    engine = build_engine(model, cfg.train, cfg.parallel, 1)
    ids = torch.randint(0, cfg.model.vocab_size, (1, 33))
    engine.backward(engine(ids[:, :-1], labels=ids[:, 1:]))  # one step: AdamW's states exist
    engine.step()
    assert engine.global_steps == 1 and engine.skipped_steps == 0
    return engine, sum(p.numel() for p in model.parameters())


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/hybrid-200m.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()

    import parallel.checkpoint as ckpt

    one_rank_group()
    engine, n_params = engine_for(args.config)
    digest_times = []
    real_digest = ckpt.digest_files

    def timed_digest(directory, names):
        start = time.perf_counter()
        out = real_digest(directory, names)
        digest_times.append(time.perf_counter() - start)
        return out

    ckpt.digest_files = timed_digest
    saves, verifies, loads, sizes = [], [], [], []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp) / "checkpoints"
        for step in range(1, args.repeats + 1):
            saves.append(timed(lambda: ckpt.save_checkpoint(engine, root, step, {"step": step}, keep_last=1)))
            final = root / ckpt.step_name(step)
            sizes.append(sum(f.stat().st_size for f in final.iterdir() if f.name != ckpt.MANIFEST))
            verifies.append(timed(lambda: ckpt.verify(final)))
            loads.append(timed(lambda: ckpt.load_checkpoint(engine, final, 0)))
    med = statistics.median
    size, digest, save, verify, load = med(sizes), med(digest_times), med(saves), med(verifies), med(loads)
    gb = size / 1e9
    print(f"{args.config}: {n_params / 1e6:.0f}M parameters, checkpoint {size / 2**30:.2f} GiB "
          f"(fp32 weights + AdamW states), median of {args.repeats}\n")
    print("| | without verification | with verification | checksums' share |")
    print("| --- | --- | --- | --- |")
    print(f"| save (s) | {save - digest:.2f} | {save:.2f} | {100 * digest / save:.1f}% |")
    print(f"| load (s) | {load:.2f} | {load + verify:.2f} | {100 * verify / (load + verify):.1f}% |")
    print(f"\nwrite {gb / (save - digest):.2f} GB/s | CRC32 in save {gb / digest:.2f} GB/s | "
          f"CRC32 in verify {gb / verify:.2f} GB/s")


if __name__ == "__main__":
    main()
