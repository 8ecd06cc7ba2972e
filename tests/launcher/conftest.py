"""Shared fixtures for end-to-end runs of the real entry point on a small prepared corpus."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# A model small enough that a step takes well under a second on 2 cores, with every block kind.
TINY = [
    "model.pattern=M-*-", "model.d_model=64", "model.mamba.headdim=16", "model.mamba.d_state=16",
    "model.mamba.chunk_size=16", "model.attention.n_heads=4", "model.attention.n_kv_heads=2",
    "train.seq_len=32", "train.global_batch_size=4", "parallel.micro_batch_size=2",
    "train.warmup_steps=2", "train.eval_batches=2", "logging.log_every=1", "logging.progress=lines",
]


@pytest.fixture(scope="session")
def corpus_overrides(tmp_path_factory):
    """A small stdlib corpus with a 512-token vocabulary, prepared once per test session."""
    root = tmp_path_factory.mktemp("corpus")
    overrides = ["data.inputs=[stdlib]", "data.stdlib_max_mb=0.5", "data.vocab_size=512", "data.val_fraction=0.05",
                 f"data.prepared_dir={root / 'prepared'}", "data.workers=1"]
    proc = run_strata(["train", *TINY, *overrides, "train.max_steps=1", f"train.run_dir={root / 'warmup'}",
                       "train.eval_every=0", "checkpoint.every=0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # training prepared the corpus and said how far it was (data/progress.py), on stderr
    assert "files, 0.5/0.5 MB (100%)" in proc.stderr and " tokens, " in proc.stderr, proc.stderr[-3000:]
    return overrides


def run_strata(args, nproc: int = 1, timeout: int = 600, wait: bool = True, launcher: str = "torchrun"):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "strata.launcher.cli", *args]
    elif launcher == "deepspeed":
        assert args[0] == "train"
        port = str(free_port())
        cmd = [str(Path(sys.executable).parent / "deepspeed"), f"--num_gpus={nproc}", f"--master_port={port}",
               "launcher/train.py", *args[1:]]
    else:
        assert args[0] == "train"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--master-port=0", "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0",
               "-m", "strata.launcher.train", *args[1:]]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl, read as a strict JSON parser would: NaN or Infinity, which Python's json writes and
    reads by default but RFC 8259 does not allow, fail here."""
    def refuse(constant: str):
        raise ValueError(f"metrics.jsonl holds {constant}, which is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_grad_norms(run_dir: Path) -> dict[int, float | None]:
    """Step -> the gradient norm before clipping (null where it was not finite)."""
    return {r["step"]: r["grad_norm"] for r in metrics_records(run_dir) if r["kind"] == "train"}


def train_losses(run_dir: Path) -> dict[int, float]:
    """Step -> train loss; a step logged twice (before a kill and after the resume) keeps the last."""
    return {r["step"]: float(r["loss"]) for r in metrics_records(run_dir) if r["kind"] == "train"}
