"""What checksums cost a checkpoint: save and load time with and without them, and the hash's
GB/s against the write's, on one process (ZeRO 0, fp32 weights and AdamW states); and what a save
blocks the training step for with checkpoint.async against the synchronous save. Prints markdown
tables (docs/BENCHMARKS.md).

    python bench/checkpoint.py                                # configs/hybrid-200m.yaml, 189M
    python bench/checkpoint.py --config configs/tiny.yaml --repeats 3 --dir /dev/shm

Three ways to write the same checkpoint through parallel/checkpoint.save_checkpoint, taking
turns (each first once in three repeats), each after os.sync() and, where allowed (root), an
emptied page cache, so that none pays for the write-back of another: Strata's (every file hashed on a second thread while it is written, HashingWriter); the
same torch.save into a plain Python file (no checksums: what hashing adds is the difference); and
DeepSpeed's own torch engine (torch.save to a path, as before checksums existed). Loads are
timed as a resume meets them, the files cold: without checksums, load_checkpoint alone; with
them, verify() (which reads every file) and then load_checkpoint.

checkpoint.async (parallel/checkpoint/background.py), after the same os.sync() and emptied cache:
what the step blocks for (BackgroundSaves.start: the copy into host memory), the next training step
while the write runs against one without a write, and the time until the save is committed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def one_rank_group() -> None:
    """A one-process gloo group, as `strata train` starts one (parallel/distributed.py)."""
    from strata.parallel.distributed import init_distributed

    init_distributed("gloo")


def engine_for(config: str):
    import torch

    from strata.launcher.config import load_config
    from strata.model.hybrid import HybridLM
    from strata.parallel.engine.build import build_engine

    vocab = "model.vocab_size=4096" if "tiny" in config else "model.vocab_size=32768"
    cfg = load_config(config, [vocab, "parallel.micro_batch_size=1", "train.global_batch_size=1"])
    torch.manual_seed(0)
    model = HybridLM(cfg.model)
    engine = build_engine(model, cfg.train.optimizer(), cfg.parallel, 1)
    ids = torch.randint(0, cfg.model.vocab_size, (1, 33))

    def train_step():
        engine.backward(engine(ids[:, :-1], labels=ids[:, 1:]))
        engine.step()

    train_step()  # AdamW's states exist
    assert engine.global_steps == 1 and engine.skipped_steps == 0
    return engine, sum(p.numel() for p in model.parameters()), train_step


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


STRATA = "Strata (hashed while written)"


def plain_file_save(self, state_dict, path: str) -> None:
    import torch

    with open(path, "wb") as f:
        torch.save(state_dict, f)


def cold() -> None:
    """Nothing of the checkpoint left in the page cache, where the OS lets us drop it (root)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/hybrid-200m.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    import strata.parallel.checkpoint.files as ckpt

    writers = {STRATA: ckpt.StrataCheckpointEngine.save,
               "plain Python file, no checksums": plain_file_save,
               "DeepSpeed's torch engine (to a path), no checksums": TorchCheckpointEngine.save}
    one_rank_group()
    engine, n_params, train_step = engine_for(args.config)
    saves = {name: [] for name in writers}
    plain_loads, verifies, warm_loads = [], [], []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp) / "checkpoints"
        names = list(writers)
        for r in range(args.repeats):
            for name in names[r % 3:] + names[:r % 3]:  # each writer first once in three
                ckpt.StrataCheckpointEngine.save = writers[name]
                step = len(sum(saves.values(), [])) + 1
                cold()
                saves[name].append(timed(lambda: ckpt.save_checkpoint(engine, root, step, {"step": step}, keep_last=1)))
        ckpt.StrataCheckpointEngine.save = writers[STRATA]
        background = time_async_saves(engine, root, train_step, args.repeats, first_step=len(sum(saves.values(), [])) + 1)
        final = ckpt.newest_checkpoint(root)
        size = sum(f.stat().st_size for f in final.iterdir() if f.name != ckpt.MANIFEST)
        for _ in range(args.repeats):  # a resume: the files are cold; verify reads them first
            cold()
            plain_loads.append(timed(lambda: ckpt.load_checkpoint(engine, final, 0)))
            cold()
            verifies.append(timed(lambda: ckpt.verify(final)))
            warm_loads.append(timed(lambda: ckpt.load_checkpoint(engine, final, 0)))
    med = statistics.median
    gb = size / 1e9
    print(f"{args.config}: {n_params / 1e6:.0f}M parameters, checkpoint {size / 2**30:.2f} GiB "
          f"(fp32 weights + AdamW states), median of {args.repeats}, written to {args.dir or tempfile.gettempdir()}\n")
    print("| | seconds | GB/s |")
    print("| --- | --- | --- |")
    for name, times in saves.items():
        print(f"| save: {name} | {med(times):.2f} | {gb / med(times):.2f} |")
    print(f"| load without checksums (cold files) | {med(plain_loads):.2f} | {gb / med(plain_loads):.2f} |")
    print(f"| load with checksums: verify (cold files) | {med(verifies):.2f} | {gb / med(verifies):.2f} |")
    print(f"| load with checksums: then load_checkpoint | {med(warm_loads):.2f} | {gb / med(warm_loads):.2f} |")
    hashed, bare = med(saves[STRATA]), med(saves["plain Python file, no checksums"])
    with_sums = med(verifies) + med(warm_loads)
    print(f"\nchecksums add {100 * (hashed - bare) / bare:+.1f}% to a save and "
          f"{100 * (with_sums - med(plain_loads)) / med(plain_loads):+.1f}% to a load")
    print_async_table(background, hashed)


def time_async_saves(engine, root: Path, train_step, repeats: int, first_step: int) -> dict[str, list[float]]:
    """checkpoint.async's saves, each started from a cold cache: the start (what the step waits for),
    the training step taken while the write runs, a step without a write, and start to commit."""
    from strata.parallel.checkpoint.background import BackgroundSaves

    times = {"blocking": [], "step while writing": [], "step alone": [], "until committed": []}
    for r in range(repeats):
        times["step alone"].append(timed(train_step))
        saves, step = BackgroundSaves(), first_step + r
        cold()
        started = time.perf_counter()
        times["blocking"].append(timed(lambda: saves.start(engine, root, step, {"step": step}, keep_last=1)))
        times["step while writing"].append(timed(train_step))
        saves.finish()
        times["until committed"].append(time.perf_counter() - started)
    return times


def print_async_table(times: dict[str, list[float]], synchronous: float) -> None:
    med = statistics.median
    blocking, alone, during = med(times["blocking"]), med(times["step alone"]), med(times["step while writing"])
    print("\n| checkpoint.async | seconds | of the synchronous save |")
    print("| --- | --- | --- |")
    print(f"| synchronous save (Strata, above): the step waits for all of it | {synchronous:.2f} | 100% |")
    print(f"| async: the step waits for the copy into host memory | {blocking:.2f} | {100 * blocking / synchronous:.1f}% |")
    print(f"| async: the next training step, while the write runs (alone: {alone:.2f} s) | {during:.2f} | "
          f"{100 * (during - alone) / synchronous:+.1f}% (its slowdown) |")
    print(f"| async: start to commit (written, hashed, renamed in the background) | "
          f"{med(times['until committed']):.2f} | |")


if __name__ == "__main__":
    main()
