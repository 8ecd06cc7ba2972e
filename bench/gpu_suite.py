"""The GPU suite: one call of under 8 minutes on one H100 or H200, one markdown table.

    python3 bench/gpu_suite.py                 # on the GPU machine, from the repo root, the wheels in .whl
    python3 bench/gpu_suite.py --dry-run       # anywhere, on CPU: checks every step, prints commands and budget
    python3 bench/gpu_suite.py --parts train --steps 30 train.recompute_kinds.M=full   # a part again, shorter

The GPU machine has PyTorch and Triton and nothing else (no network): `../shared/gpu/wheels.sh .whl`
builds, on a machine with one, every wheel the suite needs (DeepSpeed, megatron-core and what they
lack, and the peers fla-core and liger-kernel, plus mamba_ssm's sources). The suite then runs, each
part in its own process, logs under --work:

  setup    the wheels installed with `pip install --no-index --no-deps --target SITE`, and mamba_ssm's
           package copied from its sdist (its Triton SSD is pure Python; what a build with
           MAMBA_SKIP_CUDA_BUILD=TRUE installs, without running its setup.py);
  tests    STRATA_GPU_TESTS=1 pytest tests/kernels/test_gpu.py: the compiled kernels in bf16 (and fp32)
           against the references, pass/fail counts per dtype; at the same time, on other cores, the
           peers' kernels are compiled once (bench/kernels.py --warm-peers: mamba_ssm's SSD autotunes
           about 120 configurations) and the training corpus is prepared;
  peak     a bf16 8192^3 matmul and a device copy (triton.testing.do_bench): the measured peaks, MFU's
           denominator;
  kernels  bench/kernels.py --ops ssd,norm,ce: Strata's SSD, RMSNorm (plain, gated) and fused linear
           cross-entropy beside the PyTorch reference, mamba_ssm (SSD, gated norm), fla
           (chunk_simple_gla) and Liger (fused linear CE, RMSNorm), at the 1.3B hybrid's shapes;
  train    --config (configs/hybrid-1b3.yaml) end to end through `strata train` (bench/train_gpu.py,
           without the final checkpoint) for --steps (--ref-steps) at its seq 4096 in bf16, micro-batches
           of --micro-batch sequences (--ref-micro-batch, accumulated to the same global batch), for each
           train.recompute in --recompute and each kernel path in --backends: tokens/s, TFLOP/s, MFU
           against the measured peak, peak memory against the plan's prediction (planned_peak_gib), and
           the largest relative difference of the reference and Triton loss curves; the Triton run
           without recompute once more on packed documents (data.doc_boundaries=true, the seq_idx
           kernels; --no-packed leaves it out): what keeping documents apart costs in tokens/s.
           Three steps near the end of each Triton run are profiled (bench/profile_steps.py) into
           $OUT/profile-<run>.md: how busy the device was, by group and kernel, and the host's ops
           (--no-profile: none).

Every part runs under one deadline (--budget): a part that would start too late is a row that says so,
and a training run stopped by the deadline reports the steps it made. The table is printed last and
written, with the machine, date and command, to $OUT (or --out) as gpu_suite.md, beside gpu_suite.json
(every number) and gpu_suite.log (every part's output).
"""
from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WHEELS_SH = REPO.parent / "shared" / "gpu" / "wheels.sh"
PARTS = ("setup", "tests", "peak", "kernels", "train")

# What ../shared/gpu/wheels.sh leaves in the wheel folder (name, version): the dry run checks this list
# against the script and the folder.
WHEELS = [("megatron_core", "0.16.1"), ("hjson", "3.1.0"), ("pydantic", "2.14.4"), ("pydantic_core", "2.50.5"),
          ("annotated_types", None), ("typing_inspection", None), ("zstandard", None),
          ("liger_kernel", "0.8.5"), ("fla_core", "0.6.0"), ("deepspeed", "0.19.8")]
MAMBA_SDIST = ("mamba_ssm", "2.3.2.post1")

# Seconds each part took on one H100 on 2026-11-26 (docs/BENCHMARKS.md, "GPU suite"; the dry run prints them).
ESTIMATE = {
    "setup": 5,             # pip install of ten wheels (--no-compile) and the mamba_ssm sources copied: 1 s
    "tests": 110,           # pytest start and about 30 Triton compilations (fp32 and bf16 variants): 109 s
    "warm mamba_ssm": 110,  # its SSD forward + backward autotunes ~120 configurations, each compiled once: 104 s
    "warm fla, liger": 60,  # fla refuses its gated kernels on Triton 3.4-3.7.0 on Hopper (its own check)
    "corpus": 20,           # a 32768-piece sentencepiece model on 2 MB, then 12 MB tokenised: 17 s
    "peak": 8,              # 6 s
    "kernels": 80,          # Strata's ops (with the fp32 error checks) and the peers from a warm cache: 72 s
    "train start": 42,      # python, torch, DeepSpeed, the model built and moved, the first step's compilations
}
ASSUMED_PEAK_TFLOPS = 740.0  # an H100's measured bf16 8192^3 matmul (2026-11-26); replaced by the measured one
# Measured on that H100 (hybrid-1b3, recompute none / selective): Triton 32% / 20%, reference (selective) 9%.
ASSUMED_MFU = {"triton": 0.45, "reference": 0.09}  # for the estimate only (H100, 2026-11-26: Triton at micro-batch 4)
RESERVE_S = 8  # kept at the end of the budget for the table
H100_GIB = 79.6  # an H100 80GB's memory as torch sees it: the dry run's budget leaves out runs the plan says do not fit


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/gpu_suite.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="check every step on CPU, print commands and budget")
    p.add_argument("--parts", default=",".join(PARTS), help=f"which of {','.join(PARTS)} to run (default: all)")
    p.add_argument("--budget", type=float, default=440, help="seconds for the whole suite (default 440)")
    p.add_argument("--config", default="configs/hybrid-1b3.yaml", help="the training part's config")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps of each Triton training run (default 30)")
    p.add_argument("--ref-steps", type=int, default=12,
                   help="optimizer steps of each reference-path run (default 12; the loss curves are "
                        "compared over the steps both made)")
    p.add_argument("--micro-batch", type=int, default=4,
                   help="sequences per micro-batch of the Triton runs (default 4: hybrid-1b3 at 45%% MFU on an "
                        "H100, 2026-11-26; the plan puts it at 64 GiB)")
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--ref-micro-batch", type=int, default=1,
                   help="sequences per micro-batch of the reference-path runs, accumulated to the same global "
                        "batch (default 1: the reference's activations are larger)")
    p.add_argument("--skip-steps", type=int, default=5, help="first steps left out of the speed medians")
    p.add_argument("--recompute", default="none,selective", help="train.recompute modes (default none,selective)")
    p.add_argument("--backends", default="triton,reference", help="kernel paths (default triton,reference)")
    p.add_argument("--no-profile", action="store_true",
                   help="do not profile three steps of each Triton run (bench/profile_steps.py, $OUT/profile-*.md)")
    p.add_argument("--no-packed", action="store_true",
                   help="leave out the run with data.doc_boundaries=true (the cost of keeping documents apart)")
    p.add_argument("--bf16-params", action="store_true",
                   help="add the Triton run without recompute with train.param_dtype=bf16 (DeepSpeed's bf16 mode): "
                        "its tokens/s and memory against fp32 parameters (about 55 s more than the 440 s budget)")
    p.add_argument("--kernel-ops", default="ssd,norm,ce", help="bench/kernels.py --ops (default ssd,norm,ce)")
    p.add_argument("--kernel-batch", type=int, default=8, help="bench/kernels.py --batch (default 8, x 4096)")
    p.add_argument("--wheels", default=".whl", help="the wheel folder ../shared/gpu/wheels.sh filled (default .whl)")
    p.add_argument("--site", default="/tmp/site", help="where the wheels are installed (default /tmp/site)")
    p.add_argument("--work", default="/tmp/gpu_suite", help="logs, corpus and run directories (default /tmp/gpu_suite)")
    p.add_argument("--out", default=os.environ.get("OUT") or "", help="where the table goes (default $OUT, else "
                                                                      "runs/gpu_suite)")
    p.add_argument("--measure-peak", metavar="JSON", help=argparse.SUPPRESS)  # the peak part's own process
    p.add_argument("overrides", nargs="*", help="config overrides for every training run")
    args = p.parse_args(argv)
    args.parts = [x for x in args.parts.split(",") if x]
    if (args.micro_batch * args.accumulation) % args.ref_micro_batch:
        p.error(f"--ref-micro-batch {args.ref_micro_batch} does not divide the global batch "
                f"{args.micro_batch * args.accumulation} (--micro-batch x --accumulation)")
    for name in args.parts:
        if name not in PARTS:
            p.error(f"--parts: {name!r} is not one of {', '.join(PARTS)}")
    return args


# ----------------------------------------------------------------------------------------
# What the runs are
# ----------------------------------------------------------------------------------------

@dataclass
class TrainRun:
    recompute: str
    backend: str
    steps: int
    overrides: list[str]
    planned_gib: float | None = None
    plan_note: str = ""
    flops_per_token: float = 0.0
    result: dict = field(default_factory=dict)
    packed: bool = False
    """data.doc_boundaries=true: rows of several documents, none seeing another (seq_idx kernels)."""
    bf16_params: bool = False
    """train.param_dtype=bf16: bf16 parameters, fp32 masters in ZeRO's partitions."""

    @property
    def name(self) -> str:
        return (f"recompute={self.recompute} {self.backend}" + (" packed" if self.packed else "")
                + (" bf16-params" if self.bf16_params else ""))

    def twin_of(self, other: "TrainRun") -> bool:
        """Runs whose loss curves compare: the same data semantics and parameter dtype."""
        return self is not other and (self.packed, self.bf16_params) == (other.packed, other.bf16_params)


def train_runs(args, corpus: str | None) -> list[TrainRun]:
    runs = []
    for recompute in args.recompute.split(","):
        for backend in args.backends.split(","):
            steps = args.steps if backend == "triton" else args.ref_steps
            micro_batch = args.micro_batch if backend == "triton" else args.ref_micro_batch
            overrides = [f"train.recompute={recompute}", f"parallel.micro_batch_size={micro_batch}",
                         f"train.global_batch_size={global_batch(args)}",
                         # the same LR at every step in runs of any length: 10 warm-up steps, then constant
                         # (WSD decays only the last step, whose update no recorded loss sees)
                         "train.warmup_steps=10", "train.schedule=wsd", "train.decay_fraction=1e-6",
                         "train.eval_batches=1",
                         "logging.sample_prompt=", "logging.tensorboard=false", "logging.log_every=10",
                         *([f"data.prepared_dir={corpus}"] if corpus else []), *args.overrides]
            runs.append(TrainRun(recompute, backend, steps, overrides))
            if not args.no_packed and recompute == "none" and backend == "triton":  # right after its twin
                runs.append(TrainRun(recompute, backend, steps, [*overrides, "data.doc_boundaries=true"], packed=True))
            if args.bf16_params and recompute == "none" and backend == "triton":
                runs.append(TrainRun(recompute, backend, steps, [*overrides, "train.param_dtype=bf16"],
                                     bf16_params=True))
    return runs


def plain_twin(run: TrainRun, runs: list[TrainRun]) -> TrainRun | None:
    """The measured run of the same recompute and kernels on unpacked rows with fp32 parameters:
    what a packed or bf16-parameter run is compared with."""
    return next((r for r in runs if not r.packed and not r.bf16_params and r.recompute == run.recompute
                 and r.backend == run.backend and r.result.get("summary")), None)


def global_batch(args) -> int:
    """Sequences per optimizer step, the same in every run (the loss curves are compared step by step)."""
    return args.micro_batch * args.accumulation


def corpus_dir(args, cfg) -> str | None:
    """Where the suite prepares the config's corpus beforehand (None: the config names its own)."""
    data = cfg.data
    if data.prepared_dir or data.mixture or list(data.inputs) != ["stdlib"] or data.tokenizer:
        return None
    return str(Path(args.work) / f"corpus-v{data.vocab_size}")


def planned_peak_gib(cfg, backend: str) -> tuple[float | None, str, float]:
    """The memory plan's predicted peak per rank, in GiB, of `cfg` on one GPU with the `backend`
    kernels (triton or reference), its FLOPs per token, and a note: launcher.plan.predicted_peak
    (cfg, world_size=1, 'cuda'), which reads STRATA_KERNELS. Where the plan is not in this tree or
    fails, (None, why, 0)."""
    try:
        from strata.launcher.plan import predicted_peak
    except ImportError as e:
        return None, f"no plan in this tree ({e})", 0.0
    before = os.environ.get("STRATA_KERNELS")
    os.environ["STRATA_KERNELS"] = backend
    try:
        plan = predicted_peak(cfg, 1, "cuda")
    except Exception as e:  # noqa: BLE001 (a plan must not stop the suite)
        return None, f"plan failed: {type(e).__name__}: {e}", 0.0
    finally:
        if before is None:
            os.environ.pop("STRATA_KERNELS", None)
        else:
            os.environ["STRATA_KERNELS"] = before
    problems = "; ".join(plan.problems)
    return plan.peak / 2**30, problems, plan.flops_per_token


def flops_per_token(cfg) -> float:
    from strata.model.counting import training_flops_per_token
    return training_flops_per_token(cfg.model, cfg.train.seq_len)["total"]


def plan_runs(args, runs: list[TrainRun]) -> None:
    """Each run's config loaded (launcher.config.load_config), its plan and FLOPs per token."""
    from strata.launcher.config import load_config
    for run in runs:
        cfg = load_config(REPO / args.config, run.overrides)
        run.planned_gib, run.plan_note, fpt = planned_peak_gib(cfg, run.backend)
        run.flops_per_token = fpt or flops_per_token(cfg)


def step_seconds(args, run: TrainRun, peak_tflops: float, measured: dict[str, float]) -> float:
    """A step's expected time: measured on this machine for this backend if a run has finished,
    else its FLOPs at an assumed share of the peak."""
    if run.backend in measured:
        return measured[run.backend]
    tokens = global_batch(args) * args.seq_len
    return tokens * run.flops_per_token / (ASSUMED_MFU.get(run.backend, 0.1) * peak_tflops * 1e12)


def run_estimate(args, run: TrainRun, peak_tflops: float, measured: dict[str, float]) -> float:
    return ESTIMATE["train start"] + run.steps * step_seconds(args, run, peak_tflops, measured)


# ----------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------

def py() -> str:
    return sys.executable or "python3"


def wheel_files(args) -> list[str]:
    return sorted(glob.glob(str(Path(args.wheels) / "*.whl")))


def commands(args, corpus: str | None, vocab: int) -> dict[str, list[str]]:
    work = Path(args.work)
    kernels = [py(), "bench/kernels.py", "--ops", args.kernel_ops, "--batch", str(args.kernel_batch)]
    cmds = {
        "setup": [py(), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade",
                  "--target", args.site, f"{args.wheels}/*.whl"],
        "tests": [py(), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "bench.gpu_suite",
                  "tests/kernels/test_gpu.py"],
        "warm mamba_ssm": [*kernels, "--warm-peers", "--only-peers", "mamba_ssm"],
        "warm fla, liger": [*kernels, "--warm-peers", "--only-peers", "fla,liger_kernel"],
        "peak": [py(), "bench/gpu_suite.py", "--measure-peak", str(work / "peak.json")],
        "kernels": [*kernels, "--no-compile", "--json", str(work / "kernels.json"), "--peak-tflops", "PEAK",
                    "--hbm-tbs", "HBM"],
    }
    if corpus:
        cmds["corpus"] = [py(), "-m", "strata.launcher.cli", "prepare", "--input", "stdlib", "--out", corpus,
                          "--vocab-size", str(vocab), "--workers", "8"]
    return cmds


def shown(cmd: list[str], env: dict | None = None) -> str:
    pre = " ".join(f"{k}={v}" for k, v in (env or {}).items())
    return (pre + " " if pre else "") + " ".join(shlex.quote(c) if "*" not in c else c for c in cmd)


# ----------------------------------------------------------------------------------------
# Dry run
# ----------------------------------------------------------------------------------------

class Checks:
    def __init__(self):
        self.failed = 0

    def line(self, status: str, what: str) -> None:
        if status == "FAIL":
            self.failed += 1
        print(f"  {status:4s} {what}", flush=True)


def wheels_in_script() -> list[tuple[str, str | None]] | None:
    """The (name, version) pairs ../shared/gpu/wheels.sh fetches, normalised as wheel file names are."""
    if not WHEELS_SH.is_file():
        return None
    text = WHEELS_SH.read_text()
    found = []
    for m in re.finditer(r"pip (?:download|wheel)\b(.*?)(?:\n(?!\s)|$)", text, re.S):
        for token in m.group(1).replace("\\\n", " ").split():
            if token.startswith(("-", "$", '"')) or "=" in token and "==" not in token:
                continue
            name, _, version = token.partition("==")
            if re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", name):
                found.append((name.replace("-", "_").lower(), version or None))
    return found


def check_wheels(args, checks: Checks) -> None:
    script = wheels_in_script()
    expected = {n: v for n, v in WHEELS} | {MAMBA_SDIST[0]: MAMBA_SDIST[1]}
    if script is None:
        checks.line("note", f"{WHEELS_SH} not found: the wheel list is the suite's own ({len(expected)} files)")
    else:
        got = dict(script)
        if got != expected:
            missing = sorted(set(got) - set(expected)) + [f"{n}=={v}" for n, v in got.items() if n in expected and
                                                          expected[n] != v]
            extra = sorted(set(expected) - set(got))
            checks.line("FAIL", f"wheel list differs from {WHEELS_SH.name}: suite lacks {missing or '-'}, "
                                f"script lacks {extra or '-'}")
        else:
            checks.line("ok", f"wheel list = what {WHEELS_SH.name} fetches ({len(expected)} files)")
    folder = Path(args.wheels)
    if not folder.is_dir():
        checks.line("note", f"wheel folder {folder} absent: build it with `../shared/gpu/wheels.sh {args.wheels}` "
                            f"(needs the network; carry it with the device call)")
        return
    files = [p.name for p in folder.iterdir()]
    for name, version in [*WHEELS, MAMBA_SDIST]:
        pattern = f"{name}-{version or ''}"
        hits = [f for f in files if f.lower().startswith(pattern.lower()) and
                (f.endswith(".whl") or f.endswith(".tar.gz"))]
        if len(hits) == 1:
            continue
        checks.line("FAIL", f"{folder}: {len(hits)} files for {name} {version or ''} ({', '.join(hits) or 'none'}); "
                            f"run ../shared/gpu/wheels.sh {args.wheels}")
        return
    size = sum((folder / f).stat().st_size for f in files) / 2**20
    checks.line("ok", f"{folder}: all {len(WHEELS) + 1} files ({size:.0f} MiB)")


def source_of(archive: Path, path: str) -> str | None:
    """The text of `path` (a/b.py) inside a wheel or an sdist (under its top folder), or None."""
    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as z:
            return z.read(path).decode() if path in z.namelist() else None
    with tarfile.open(archive) as t:
        for member in t.getmembers():
            if member.name.split("/", 1)[-1] == path:
                return t.extractfile(member).read().decode()
    return None


def parameters(tree: ast.Module, name: str) -> list[str] | None:
    """The parameter names of function `name` or method `Class.method` defined in `tree`."""
    *outer, leaf = name.split(".")
    body = tree.body
    for cls in outer:
        node = next((n for n in body if isinstance(n, ast.ClassDef) and n.name == cls), None)
        if node is None:
            return None
        body = node.body
    fn = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == leaf), None)
    if fn is None:
        return None
    a = fn.args
    return [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)] + (["**"] if a.kwarg else [])


def load_bench(name: str):
    """bench/<name>.py as a module, loaded by path: bench/ on sys.path would let bench/kernels.py
    shadow the kernels package."""
    import importlib.util
    key = f"strata_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, REPO / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def check_peers(args, checks: Checks) -> None:
    peers = load_bench("kernels").PEERS
    folder = Path(args.wheels)
    for package, spec in peers.items():
        archive = folder / spec["dist"]
        for module, name, params in spec["calls"]:
            line = f"from {module} import {name.split('.')[0]}"
            try:
                ast.parse(line)
            except SyntaxError as e:
                checks.line("FAIL", f"{line}: {e}")
                continue
            if not archive.is_file():
                checks.line("ok", f"{line} (parses; {archive} absent, its source not checked)")
                continue
            rel = module.replace(".", "/")
            text = source_of(archive, rel + ".py") or source_of(archive, rel + "/__init__.py")
            if text is None:
                checks.line("FAIL", f"{line}: no {rel}.py in {archive.name}")
                continue
            have = parameters(ast.parse(text), name)
            if have is None:
                checks.line("FAIL", f"{line}: {name} is not defined in {rel}.py of {archive.name}")
                continue
            lacking = [p for p in params if p not in have]
            if lacking and "**" not in have:
                checks.line("FAIL", f"{module}.{name}: no parameter {', '.join(lacking)} in {archive.name}")
            else:
                checks.line("ok", f"{module}.{name}({', '.join(params)}) in {archive.name}")


def check_tree(args, checks: Checks) -> None:
    for path in ("tests/kernels/test_gpu.py", "tests/kernels/conftest.py", "bench/kernels.py", "bench/train_gpu.py",
                 "bench/profile_steps.py"):
        found = (REPO / path).is_file()
        checks.line("ok" if found else "FAIL", f"{path} {'found' if found else 'missing'}")
    conftest_path = REPO / "tests/kernels/conftest.py"
    conftest = conftest_path.read_text() if conftest_path.is_file() else ""
    checks.line("ok" if "STRATA_GPU_TESTS" in conftest else "FAIL",
                "tests/kernels/conftest.py selects the GPU tests with STRATA_GPU_TESTS=1")
    bench = (REPO / "bench/kernels.py").read_text()
    flags = ["--warm-peers", "--only-peers", "--json", "--no-compile", "--peak-tflops", "--hbm-tbs", "--batch"]
    lacking = [f for f in flags if f'"{f}"' not in bench]
    checks.line("FAIL" if lacking else "ok", f"bench/kernels.py takes {' '.join(flags)}" +
                (f" (lacks {' '.join(lacking)})" if lacking else ""))
    train = ast.parse((REPO / "launcher/train.py").read_text())
    saves = any(isinstance(n, ast.FunctionDef) and n.name == "save" for n in train.body)
    calls = any(isinstance(n, ast.Call) and getattr(n.func, "id", "") == "save" for n in ast.walk(train))
    checks.line("ok" if saves and calls else "FAIL",
                "launcher/train.py calls its module-level save(run): bench/train_gpu.py's --no-save entry replaces it")
    steps = any(isinstance(n, ast.FunctionDef) and n.name == "train_step" for n in train.body)
    profiled = "profile_steps" in load_bench("train_gpu").NO_SAVE_ENTRY
    checks.line("ok" if steps and profiled else "FAIL",
                "bench/train_gpu.py's entry profiles launcher/train.py's module-level train_step(run) when asked")
    sources = (REPO / "launcher/train.py").read_text() + (REPO / "launcher/metrics.py").read_text()
    keys = ["tokens_per_s", "tflops_per_gpu", "peak_memory_gib", "step_time_s", "mfu_percent"]
    lacking = [k for k in keys if f'"{k}"' not in sources]
    checks.line("FAIL" if lacking else "ok", "metrics.jsonl records " + ", ".join(keys) +
                (f" (lacks {', '.join(lacking)})" if lacking else ""))
    import importlib.util
    found = importlib.util.find_spec("bench.gpu_suite") is not None if str(REPO) in sys.path else True
    checks.line("ok" if found else "FAIL", "pytest loads this file as the plugin bench.gpu_suite (counts per dtype)")
    import strata.launcher.metrics  # noqa: F401  (what the peak part imports; it reaches the kernels package)
    kernels_pkg = sys.modules["kernels"].__file__ or ""
    checks.line("ok" if Path(kernels_pkg).parent == REPO / "kernels" else "FAIL",
                f"the suite's own processes import the kernels package, not bench/kernels.py ({kernels_pkg})")


def dry_run(args) -> int:
    t0 = time.time()
    checks = Checks()
    print(f"GPU suite dry run: {args.config}, budget {args.budget:.0f} s, parts {','.join(args.parts)}")
    print("files and entry points:")
    check_tree(args, checks)
    print("wheels:")
    check_wheels(args, checks)
    print("peers (import lines, and signatures in the wheels' sources where present):")
    check_peers(args, checks)
    print("training runs (launcher.config.load_config; the memory plan, launcher.plan.predicted_peak):")
    from strata.launcher.config import ConfigError, load_config
    cfg = load_config(REPO / args.config, args.overrides)
    args.seq_len = cfg.train.seq_len
    corpus = corpus_dir(args, cfg)
    runs = train_runs(args, corpus)
    try:
        plan_runs(args, runs)
    except ConfigError as e:
        checks.line("FAIL", f"{args.config} with a training run's overrides: {e}")
        return finish_dry_run(checks, t0)
    for run in runs:
        plan = "plan n/a" if run.planned_gib is None else f"plan {run.planned_gib:.1f} GiB"
        status = "FAIL" if run.planned_gib is not None and run.plan_note else "ok"
        over = "" if run.planned_gib is None or run.planned_gib <= H100_GIB else \
            f" (over the {H100_GIB} GiB of an H100: left out there, runs on an H200)"
        note = f"; {run.plan_note}" if run.plan_note else ""
        checks.line(status, f"{run.name}: {run.steps} steps x {global_batch(args)} x "
                            f"{cfg.train.seq_len} tokens, {run.flops_per_token / 1e9:.2f} GFLOP/token, "
                            f"{plan}{note}{over}")
    print("commands:")
    cmds = commands(args, corpus, cfg.data.vocab_size)
    env = {"PYTHONPATH": f"{args.site}:$PWD"}
    for name, cmd in cmds.items():
        extra = {"STRATA_GPU_TESTS": "1"} if name == "tests" else {}
        print(f"  [{name}] {shown(cmd, {**extra, **env} if name != 'setup' else {})}")
        if name == "setup":
            sdist = f"{args.wheels}/{MAMBA_SDIST[0]}-{MAMBA_SDIST[1]}.tar.gz"
            print(f"  [setup] then mamba_ssm/ of {sdist} into {args.site}")
    for run in runs:
        cmd = train_command_for(args, run, Path(args.work) / "runs" / run_dir_name(run))
        profiled = load_bench("train_gpu").profile_env(profile_of(args, run, Path("$OUT")))
        print(f"  [train {run.name}] {shown(cmd, {'STRATA_KERNELS': run.backend, **profiled, **env})}")
    print("time budget (estimates for one H100; the suite re-estimates with what it measures):")
    total = print_budget(args, runs)
    if total > args.budget:
        checks.line("FAIL", f"estimated {total:.0f} s > --budget {args.budget:.0f} s: fewer --steps / --ref-steps")
    return finish_dry_run(checks, t0)


def finish_dry_run(checks: Checks, t0: float) -> int:
    verdict = "FAILED" if checks.failed else "passed"
    print(f"dry run {verdict} ({checks.failed} failed) in {time.time() - t0:.1f} s")
    return 1 if checks.failed else 0


def print_budget(args, runs: list[TrainRun]) -> float:
    rows = []
    if "setup" in args.parts:
        rows.append(("setup", ESTIMATE["setup"]))
    side = {"tests": "tests" in args.parts, "warm peers": "kernels" in args.parts, "corpus": "train" in args.parts}
    seconds = {"tests": ESTIMATE["tests"], "corpus": ESTIMATE["corpus"],
               "warm peers": max(ESTIMATE["warm mamba_ssm"], ESTIMATE["warm fla, liger"])}
    if any(side.values()):  # as Suite.side_by_side runs them
        rows.append((" | ".join(k for k, run in side.items() if run) + ", side by side",
                     max(seconds[k] for k, run in side.items() if run)))
    if "peak" in args.parts:
        rows.append(("peak", ESTIMATE["peak"]))
    if "kernels" in args.parts:
        rows.append(("kernels", ESTIMATE["kernels"]))
    if "train" in args.parts:
        for run in runs:
            s = step_seconds(args, run, ASSUMED_PEAK_TFLOPS, {})
            if run.planned_gib is not None and run.planned_gib > H100_GIB:
                rows.append((f"train {run.name}: left out on an H100 (plan {run.planned_gib:.1f} GiB)", 0))
                continue
            rows.append((f"train {run.name}: start {ESTIMATE['train start']} s + {run.steps} x {s:.2f} s",
                         run_estimate(args, run, ASSUMED_PEAK_TFLOPS, {})))
    total = sum(t for _, t in rows)
    for name, t in rows:
        print(f"  {t:5.0f} s  {name}")
    print(f"  {total:5.0f} s  total, of a {args.budget:.0f} s budget (the device call: timeout_s "
          f"{int(args.budget) + 40}; the machine's start comes on top)")
    return total


def profile_of(args, run: TrainRun, out: Path) -> tuple[int, int, Path] | None:
    """Three steps near the end of each Triton run, profiled into <out>/profile-<run>.md
    (bench/profile_steps.py); the medians of the run's other steps are not touched."""
    if run.backend != "triton" or args.no_profile or run.steps < args.skip_steps + 4:
        return None
    return run.steps - 4, run.steps - 1, out / f"profile-{run_dir_name(run)}.md"


def run_dir_name(run: TrainRun) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", run.name)


def train_command_for(args, run: TrainRun, run_dir: Path) -> list[str]:
    return load_bench("train_gpu").train_command(args.config, run.steps, run_dir, run.overrides, save=False)


# ----------------------------------------------------------------------------------------
# The run on the GPU
# ----------------------------------------------------------------------------------------

class Suite:
    def __init__(self, args):
        self.args = args
        self.t0 = time.time()
        self.deadline = self.t0 + args.budget
        self.work = Path(args.work)
        self.out = Path(args.out or REPO / "runs" / "gpu_suite")
        self.logs = self.work / "logs"
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([args.site, str(REPO)]), "PYTHONUNBUFFERED": "1"}
        self.times: dict[str, float] = {}
        self.status: dict[str, str] = {}
        self.results: dict = {"parts": {}, "train": []}
        self.rows: list[list[str]] = []
        self.logged: list[str] = []

    # -- processes

    def left(self) -> float:
        return self.deadline - time.time() - RESERVE_S

    def say(self, text: str) -> None:
        print(f"[{time.time() - self.t0:5.0f} s] {text}", flush=True)

    def start(self, name: str, cmd: list[str], env: dict | None = None) -> tuple[subprocess.Popen, Path]:
        log = self.logs / (re.sub(r"[^A-Za-z0-9_.-]+", "-", name) + ".log")
        f = open(log, "w")
        f.write(f"$ {shown(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env={**self.env, **(env or {})}, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        proc.log_file = f  # type: ignore[attr-defined]
        return proc, log

    def wait(self, name: str, proc: subprocess.Popen, log: Path, timeout: float, started: float) -> str:
        try:
            proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            pass
        return self.finish(name, proc, log, started, timeout)

    def finish(self, name: str, proc: subprocess.Popen, log: Path, started: float, timeout: float) -> str:
        """Record a part's process that has ended, or end it (its own process group) past its time."""
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this suite started for it, nothing else
            proc.wait()
            status = f"stopped after {timeout:.0f} s"
        else:
            status = "ok" if proc.returncode == 0 else f"exit code {proc.returncode}"
        proc.log_file.close()  # type: ignore[attr-defined]
        self.times[name] = time.time() - started
        self.status[name] = status
        self.keep_log(name, log)
        if status != "ok":
            tail = log.read_text(errors="replace").splitlines()[-6:]
            self.say(f"{name}: {status}; its log ends:\n    " + "\n    ".join(tail))
        return status

    def run(self, name: str, cmd: list[str], timeout: float, env: dict | None = None) -> str:
        started = time.time()
        proc, log = self.start(name, cmd, env)
        return self.wait(name, proc, log, min(timeout, self.left()), started)

    def keep_log(self, name: str, log: Path) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "gpu_suite.log", "a") as f:
            f.write(f"\n===== {name} ({self.status.get(name, '')}, {self.times.get(name, 0):.0f} s)\n")
            f.write(log.read_text(errors="replace")[-200_000:])

    # -- parts

    def setup(self) -> None:
        args = self.args
        started = time.time()
        files = wheel_files(args)
        marker = Path(args.site) / ".gpu_suite_wheels"
        listing = "\n".join(Path(f).name for f in files)
        sdist = Path(args.wheels) / f"{MAMBA_SDIST[0]}-{MAMBA_SDIST[1]}.tar.gz"
        if not files:
            self.status["setup"] = (f"no wheels in {args.wheels}: run ../shared/gpu/wheels.sh {args.wheels} "
                                    "where pip works")
        elif marker.is_file() and marker.read_text() == listing:
            self.status["setup"] = "ok (installed before)"
        else:
            cmd = commands(args, None, 0)["setup"][:-1] + files
            status = self.run("setup", cmd, ESTIMATE["setup"] * 6)
            if status == "ok" and sdist.is_file():
                with tarfile.open(sdist) as t:
                    top = f"{MAMBA_SDIST[0]}-{MAMBA_SDIST[1]}/mamba_ssm/"
                    members = [m for m in t.getmembers() if m.name.startswith(top)]
                    for m in members:
                        m.name = m.name[len(top) - len("mamba_ssm/"):]
                    shutil.rmtree(Path(args.site) / "mamba_ssm", ignore_errors=True)
                    t.extractall(args.site, members=members, filter="data")
                marker.write_text(listing)
            elif status == "ok":
                self.status["setup"] = f"ok, but no {sdist.name}: mamba_ssm rows will say not installed"
        self.times["setup"] = time.time() - started
        self.say(f"setup: {self.status['setup']} ({len(files)} wheels)")
        self.row("setup", f"{len(files)} wheels + mamba_ssm sources", "pip --target " + args.site,
                 f"{self.times['setup']:.0f} s", note=self.status["setup"])

    def side_by_side(self, cfg, corpus: str | None) -> None:
        """The tests, the peers' compilations and the corpus at once: none of them is timed."""
        args = self.args
        cmds = commands(args, corpus, cfg.data.vocab_size)
        jobs = {}
        started = time.time()
        wanted = (["tests"] if "tests" in args.parts else []) + \
                 (["warm mamba_ssm", "warm fla, liger"] if "kernels" in args.parts else []) + \
                 (["corpus"] if corpus and "train" in args.parts and not (Path(corpus) / "manifest.json").is_file()
                  else [])
        if not wanted:
            return
        limits = {name: min(3 * ESTIMATE[name] if name in ("tests", "corpus") else 1.5 * ESTIMATE[name],
                            self.left()) for name in wanted}
        for name in wanted:
            env = {"STRATA_GPU_TESTS": "1", "STRATA_GPU_SUITE_TESTS_JSON": str(self.work / "tests.json")} \
                if name == "tests" else {}
            jobs[name] = self.start(name, cmds[name], env)
        self.say(f"side by side: {', '.join(wanted)}")
        running = dict(jobs)
        while running:
            time.sleep(0.5)
            for name, (proc, log) in list(running.items()):
                if proc.poll() is not None or time.time() - started > limits[name]:
                    self.finish(name, proc, log, started, limits[name])
                    self.say(f"{name}: {self.status[name]} in {self.times[name]:.0f} s")
                    del running[name]
        if "tests" in jobs:
            self.test_rows()

    def test_rows(self) -> None:
        path = self.work / "tests.json"
        wall = f"{self.times['tests']:.0f} s (whole file)"
        if not path.is_file():
            self.row("tests", "tests/kernels/test_gpu.py", "pytest", wall, goal="all pass: no result",
                     note=f"{self.status['tests']}; see gpu_suite.log")
            return
        data = json.loads(path.read_text())
        self.results["parts"]["tests"] = data
        for label in ("bf16", "fp32"):
            ids = [k for k, v in data["labels"].items() if v == label]
            counts = {o: sum(1 for k in ids if data["outcomes"].get(k) == o) for o in ("passed", "failed", "skipped")}
            missing = sum(1 for k in ids if k not in data["outcomes"])
            failed = counts["failed"] + missing
            text = f"{counts['passed']} passed, {failed} failed" + (f", {counts['skipped']} skipped"
                                                                     if counts["skipped"] else "")
            self.row("tests", f"tests/kernels/test_gpu.py, {label}", "compiled Triton on CUDA",
                     wall if label == "bf16" else "", note=text,
                     goal="all pass: " + ("met" if not failed and counts["passed"] else f"missed ({failed} failed)"))

    def peak(self) -> dict:
        cmd = commands(self.args, None, 0)["peak"]
        status = self.run("peak", cmd, ESTIMATE["peak"] * 5)
        path = self.work / "peak.json"
        if status != "ok" or not path.is_file():
            self.row("peak", "bf16 matmul 8192^3", "torch.matmul", "", note=f"{status}; the assumed "
                     f"{ASSUMED_PEAK_TFLOPS:.0f} TFLOP/s stands in")
            return {}
        peak = json.loads(path.read_text())
        self.results["parts"]["peak"] = peak
        self.say(f"peak: {peak['tflops']:.0f} TFLOP/s bf16, {peak['hbm_tbs']:.2f} TB/s, {peak['device']}")
        sheet = peak.get("datasheet_tflops")
        self.row("peak", "bf16 matmul 8192^3 (random data)", "torch.matmul", f"{peak['ms']:.3f} ms",
                 f"{peak['tflops']:.0f} TFLOP/s",
                 f"{100 * peak['tflops'] / sheet:.0f}% of {sheet:.0f}" if sheet else "",
                 note="MFU's denominator below")
        self.row("peak", f"device copy of {peak['copy_gib']:.0f} GiB", "Tensor.copy_", f"{peak['copy_ms']:.3f} ms",
                 f"{peak['hbm_tbs']:.2f} TB/s", note="read + written; % HBM below")
        return peak

    def kernels(self, peak: dict) -> None:
        args = self.args
        cmd = commands(args, None, 0)["kernels"]
        cmd[cmd.index("PEAK")] = f"{peak.get('tflops', ASSUMED_PEAK_TFLOPS):.0f}"
        cmd[cmd.index("HBM")] = f"{peak.get('hbm_tbs', 3.0):.2f}"
        status = self.run("kernels", cmd, ESTIMATE["kernels"] * 3)
        path = self.work / "kernels.json"
        if not path.is_file():
            self.row("kernels", args.kernel_ops, "bench/kernels.py", "", note=f"{status}; no rows")
            return
        data = json.loads(path.read_text())
        self.results["parts"]["kernels"] = data
        sh = data["shapes"]
        self.say(f"kernels: {status}, {len(data['rows'])} rows")
        for r in data["rows"]:
            self.kernel_row(r, data, sh)
        if status != "ok":
            self.row("kernels", "(the rest)", "", "", note=f"bench/kernels.py {status}")

    def kernel_row(self, r: dict, data: dict, sh: dict) -> None:
        rows = data["rows"]
        impl = {"triton": "Strata (Triton)", "reference": "PyTorch reference"}.get(r["impl"], r["impl"])
        if r["impl"].startswith("triton, "):  # a variant of Strata's kernel, e.g. the CE at Liger's chunk rows
            impl = "Strata (Triton), " + r["impl"].removeprefix("triton, ")
        ms = r["ms"]
        time_ = "" if ms != ms else f"{ms:.3f} ms"
        through = ", ".join(x for x in ("" if r["gbs"] is None or ms != ms else f"{r['gbs']:.0f} GB/s",
                                        "" if r["tflops"] is None or ms != ms else f"{r['tflops']:.1f} TFLOP/s") if x)
        share = ", ".join(x for x in ("" if r["gbs"] is None or ms != ms else
                                      f"{100 * r['gbs'] / (data['hbm_tbs'] * 1e3):.0f}% HBM",
                                      "" if r["tflops"] is None or ms != ms else
                                      f"{100 * r['tflops'] / data['peak_tflops']:.0f}% matmul") if x)
        memory = f"{r['mem_mib']:.0f} MiB" if r.get("mem_mib") is not None else ""
        vs = f"{r['speedup']:.2f}x the reference" if r.get("speedup") else ""
        note_parts = [x for x in r["note"].split("; ") if x and not x.startswith("peak mem")]
        vs_strata = [x for x in note_parts if x.startswith("Strata ")]
        note_parts = [x for x in note_parts if not x.startswith("Strata ")]
        if vs_strata:
            vs = vs_strata[0]
        if r["err"] is not None:
            note_parts.insert(0, f"bf16 err {r['err']:.1e}")
        goal = ""
        if r["impl"] == "triton" and r["op"] == "ssd" and r["mode"] == "fwd+bwd":
            goal = faster_than(ms, find(rows, "ssd", "fwd+bwd", "mamba_ssm"), "mamba_ssm")
        if r["impl"].startswith("triton") and r["op"] == "linear CE":
            liger = next((x for x in rows if x["op"] == "linear CE" and x["impl"].startswith("liger")), None)
            goal = faster_than(ms, liger["ms"] if liger else None, "Liger", at_least=True)
            if liger and liger.get("mem_mib") is not None and r.get("mem_mib") is not None:
                m, lm = r["mem_mib"], liger["mem_mib"]
                goal += "; memory <= Liger's: " + ("met" if m <= lm else f"missed by {100 * (m / lm - 1):.0f}%")
        shape = (f"b{sh['batch']} x {sh['seqlen']}, {sh['nheads']} heads x {sh['headdim']}, state {sh['dstate']}"
                 if r["op"] == "ssd" else f"{sh['batch'] * sh['seqlen']} rows x "
                 f"{sh['d_model'] * (2 if 'gated' in r['op'] else 1)}" if "norm" in r["op"] else
                 f"{sh['batch'] * sh['seqlen']} x {sh['d_model']}, V {sh['vocab']}" if r["op"] == "linear CE" else "")
        case = r["op"] if r["mode"] == "-" else f"{r['op']} {r['mode']}"
        self.row("kernels", case + (f" ({shape})" if shape and impl.startswith("PyTorch") else ""),
                 impl, time_, through, share, memory, vs, goal, "; ".join(note_parts))

    def train(self, peak: dict, runs: list[TrainRun]) -> None:
        args = self.args
        bench = load_bench("train_gpu")
        max_relative_difference, run_with_status, summary = (bench.max_relative_difference, bench.run_with_status,
                                                             bench.summary)
        peak_tflops = peak.get("tflops", ASSUMED_PEAK_TFLOPS)
        total_gib = peak.get("memory_gib")
        measured: dict[str, float] = {}
        log_dir = self.logs
        for run in runs:
            started = time.time()
            name = f"train {run.name}"
            need = ESTIMATE["train start"] + 10 * step_seconds(args, run, peak_tflops, measured)
            if run.planned_gib is not None and total_gib and run.planned_gib > total_gib:
                run.result = {"status": f"not run: the plan predicts {run.planned_gib:.1f} GiB > the GPU's "
                                        f"{total_gib:.1f} GiB"}
            elif self.left() < need:
                run.result = {"status": f"not run: {max(0, self.left()):.0f} s left of the budget, needs ~{need:.0f}"}
            else:
                run_dir = self.work / "runs" / run_dir_name(run)
                shutil.rmtree(run_dir, ignore_errors=True)
                log = log_dir / (re.sub(r"[^A-Za-z0-9_.-]+", "-", name) + ".log")
                profile = self.profile_of(run)
                with open(log, "w") as f:
                    records, status = run_with_status(args.config, run.steps, run.backend, run_dir, run.overrides,
                                                      save=False, timeout=self.left(), log=f, profile=profile)
                shutil.rmtree(run_dir, ignore_errors=True)
                self.times[name] = time.time() - started
                self.status[name] = status
                self.keep_log(name, log)
                run.result = {"status": status, "records": records, "wall_s": self.times[name]}
                if profile is not None and profile[2].is_file():
                    run.result["profile"] = profile_summary(profile[2].read_text())
                if records:
                    s = summary(records, min(args.skip_steps, max(0, len(records) - 1)))
                    run.result["summary"] = s
                    measured.setdefault(run.backend, s["step s"])
                if status != "ok":
                    tail = log.read_text(errors="replace").splitlines()[-6:]
                    self.say(f"{name}: {status}; its log ends:\n    " + "\n    ".join(tail))
            self.say(f"{name}: {run.result['status']}" +
                     (f", {run.result['summary']['tokens/s']:.0f} tok/s" if "summary" in run.result else ""))
        for run in runs:
            self.train_row(run, runs, peak_tflops, max_relative_difference)
        self.results["train"] = [{"name": r.name, "overrides": r.overrides, "planned_gib": r.planned_gib,
                                  "plan_note": r.plan_note, **r.result} for r in runs]

    def profile_of(self, run: TrainRun) -> tuple[int, int, Path] | None:
        return profile_of(self.args, run, self.out)

    def train_row(self, run: TrainRun, runs: list[TrainRun], peak_tflops: float, max_rel) -> None:
        s = run.result.get("summary")
        case = (f"{Path(self.args.config).stem} recompute={run.recompute}" + (" packed documents" if run.packed else "")
                + (" bf16 parameters" if run.bf16_params else ""))
        impl = {"triton": "Strata (Triton)", "reference": "PyTorch reference"}.get(run.backend, run.backend)
        plan = "" if run.planned_gib is None else f"plan {run.planned_gib:.1f}"
        if not s:
            self.row("train", case, impl, memory=plan, note=run.result.get("status", ""))
            return
        mfu = 100 * s["TFLOP/s"] / peak_tflops
        memory = f"{s['peak GiB']:.1f} GiB" + (f"; {plan} ({100 * (s['peak GiB'] / run.planned_gib - 1):+.0f}%)"
                                               if run.planned_gib else "; plan n/a (planned_peak_gib)")
        vs = ""
        other = next((r for r in runs if r.recompute == run.recompute and r.backend != run.backend and
                      r.twin_of(run) and r.result.get("records")), None)
        if run.backend == "triton" and other is not None:
            vs = (f"loss curves: max rel. diff {max_rel(other.result['records'], run.result['records']):.1e} "
                  f"vs {other.backend} ({min(len(other.result['records']), s['steps'])} steps)")
        goals = []
        if run.backend == "triton":
            goals.append("MFU >= 45%: " + ("met" if mfu >= 45 else f"missed by {45 - mfu:.1f} pts"))
        if run.planned_gib:
            off = 100 * (s["peak GiB"] / run.planned_gib - 1)
            goals.append("memory within 10% of plan: " + ("met" if abs(off) <= 10 else f"missed ({off:+.0f}%)"))
        sheet = f"{s['MFU %']:.1f}% of the data sheet" if s["MFU %"] == s["MFU %"] else ""
        base = next((r for r in runs if r.recompute == "none" and r.backend == run.backend and r.twin_of(run) and
                     r.result.get("records")), None)
        plain = plain_twin(run, runs) if run.packed or run.bf16_params else None
        if run.bf16_params and plain is not None:
            other = plain.result["summary"]
            vs = (f"bf16 parameters: {100 * s['tokens/s'] / other['tokens/s']:.0f}% of the tokens/s and "
                  f"{100 * s['peak GiB'] / other['peak GiB']:.0f}% of the memory of fp32 parameters")
        if run.packed and plain is not None:
            cost = 100 * (1 - s["tokens/s"] / plain.result["summary"]["tokens/s"])
            vs = f"isolation costs {cost:.1f}% of the tokens/s of unpacked rows"
            goals.append("isolation under 5%: " + ("met" if cost < 5 else f"missed by {cost - 5:.1f} pts"))
        exact = "" if base is None else \
            f"loss vs recompute=none: max rel. diff {max_rel(base.result['records'], run.result['records']):.1e}"
        status = run.result["status"]
        note = "; ".join(x for x in (f"{s['steps']} steps, run {run.result['wall_s']:.0f} s",
                                     "" if status == "ok" else status, sheet, exact,
                                     f"final loss {s['final loss']:.3f}", run.result.get("profile", "")) if x)
        self.row("train", case, impl, f"{s['step s']:.3f} s/step",
                 f"{s['tokens/s']:,.0f} tok/s, {s['TFLOP/s']:.0f} TFLOP/s", f"MFU {mfu:.1f}%", memory, vs,
                 "; ".join(goals), note)

    # -- the table

    def row(self, part, case, impl, time_="", through="", share="", memory="", vs="", goal="", note="") -> None:
        self.rows.append([part, case, impl, time_, through, share, memory, vs, goal, note])
        self.write()

    def table(self) -> str:
        head = ["part", "case", "impl", "time", "throughput", "% of peak", "memory", "vs", "goal", "note"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.rows:
            lines.append("| " + " | ".join(str(c).replace("|", "/") for c in r) + " |")
        return "\n".join(lines)

    def header(self) -> str:
        peak = self.results["parts"].get("peak", {})
        machine = peak.get("device", "unknown device")
        if peak:
            machine += (f" ({peak['memory_gib']:.0f} GiB, {peak.get('sms', '?')} SMs, driver "
                        f"{peak.get('driver', '?')}), torch {peak['torch']}, triton {peak['triton']}")
        cmd = "python3 " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO), *sys.argv[1:]])
        times = ", ".join(f"{k} {v:.0f} s" for k, v in self.times.items())
        return (f"GPU suite: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(self.t0))}; machine: {machine}\n"
                f"command: {cmd}\nwall time {time.time() - self.t0:.0f} s of a {self.args.budget:.0f} s budget: "
                f"{times}\n")

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_suite.md").write_text(self.header() + "\n" + self.table() + "\n")
        payload = {**self.results, "times": self.times, "status": self.status, "argv": sys.argv,
                   "args": {k: v for k, v in vars(self.args).items()}}
        (self.out / "gpu_suite.json").write_text(json.dumps(payload, indent=1, default=str))


def profile_summary(table: str) -> str:
    """The first lines of a bench/profile_steps.py table, for the suite's note column: how busy the
    device was, and the three largest groups."""
    lines = table.splitlines()
    if not lines or not lines[0].endswith(" ms"):  # the profiler did not start: its one line
        return "profile: " + (lines[0] if lines else "empty")
    groups = [row.strip("| ").split(" | ") for row in lines[4:7] if row.startswith("| ")]
    return f"profile: {lines[0].split(': ', 1)[-1]}; " + ", ".join(f"{g[0]} {g[2]}" for g in groups if len(g) == 3)


def faster_than(ms: float, other: float | None, who: str, at_least: bool = False) -> str:
    goal = f"{'at least as fast as' if at_least else 'faster than'} {who}"
    if other is None or other != other or ms != ms:
        return f"{goal}: no {who} time"
    if ms < other or (at_least and ms <= other):
        return f"{goal}: met ({other / ms:.2f}x)"
    return f"{goal}: missed by {100 * (ms / other - 1):.0f}% ({ms:.3f} vs {other:.3f} ms)"


def find(rows: list[dict], op: str, mode: str, impl_prefix: str) -> float | None:
    return next((r["ms"] for r in rows if r["op"] == op and r["mode"] == mode and r["impl"].startswith(impl_prefix)),
                None)


def measure_peak(path: str) -> int:
    """The peak part's own process: bf16 matmul TFLOP/s and copy TB/s by triton.testing.do_bench."""
    import torch
    import triton
    import triton.testing

    n = 8192
    pair = [torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2)]  # random, never zeros
    ms = triton.testing.do_bench(lambda: torch.matmul(*pair), warmup=100, rep=500, return_mode="median")
    pair.clear()
    src = torch.randn(2**29, device="cuda", dtype=torch.float32)  # 2 GiB
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    props = torch.cuda.get_device_properties(0)
    name = torch.cuda.get_device_name()
    from strata.launcher.metrics import PEAK_BF16_TFLOPS
    driver = ""
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    data = {"device": name, "tflops": 2 * n**3 / ms / 1e9, "ms": ms, "copy_ms": copy_ms, "copy_gib": 2.0,
            "hbm_tbs": 2 * src.numel() * 4 / copy_ms / 1e9, "memory_gib": props.total_memory / 2**30,
            "sms": props.multi_processor_count, "driver": driver, "torch": torch.__version__,
            "triton": triton.__version__,
            "datasheet_tflops": next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)}
    Path(path).write_text(json.dumps(data, indent=1))
    print(json.dumps(data))
    return 0


def run_suite(args) -> int:
    from strata.launcher.config import load_config  # like the plan, imports no package the wheels bring

    # every part's process (bench/train_gpu.py's runs too) finds the installed wheels and the repo
    os.environ["PYTHONPATH"] = os.pathsep.join([args.site, str(REPO)])
    suite = Suite(args)
    suite.logs.mkdir(parents=True, exist_ok=True)
    (suite.out / "gpu_suite.log").unlink(missing_ok=True)
    cfg = load_config(REPO / args.config, args.overrides)
    args.seq_len = cfg.train.seq_len
    corpus = corpus_dir(args, cfg)
    runs = train_runs(args, corpus)
    plan_runs(args, runs)
    suite.say(f"GPU suite, budget {args.budget:.0f} s; parts {','.join(args.parts)}; "
              f"{len(runs)} training runs of {args.config}")
    if "setup" in args.parts:
        suite.setup()
    suite.side_by_side(cfg, corpus)
    peak = suite.peak() if "peak" in args.parts else {}
    if "kernels" in args.parts:
        if suite.left() > 30:
            suite.kernels(peak)
        else:
            suite.row("kernels", args.kernel_ops, "bench/kernels.py", note="not run: the budget is spent")
    if "train" in args.parts:
        suite.train(peak, runs)
    suite.row("suite", "wall time", "", f"{time.time() - suite.t0:.0f} s", note=f"budget {args.budget:.0f} s; " +
              ", ".join(f"{k} {v:.0f} s" for k, v in suite.times.items()))
    print()
    print(suite.header())
    print(suite.table())
    print(f"\nwritten: {suite.out / 'gpu_suite.md'}, gpu_suite.json, gpu_suite.log")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # Run as a script, bench/ comes first on sys.path and bench/kernels.py would stand in for the
    # kernels package (the repo root on PYTHONPATH comes after it).
    here = Path(__file__).resolve().parent
    sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() not in (here, REPO)]
    if args.measure_peak:
        return measure_peak(args.measure_peak)
    config = REPO / args.config
    if not config.is_file():
        print(f"gpu_suite: config file {args.config} not found (relative to {REPO}); pass an existing YAML, e.g. "
              "configs/hybrid-1b3.yaml", file=sys.stderr)
        return 2
    from strata.launcher.config import ConfigError
    try:
        if args.dry_run:
            return dry_run(args)
        import torch
        if not torch.cuda.is_available():
            print("gpu_suite: no CUDA GPU here; use --dry-run to check the suite on CPU", file=sys.stderr)
            return 2
        return run_suite(args)
    except ConfigError as e:
        print(f"gpu_suite: {args.config}: {e}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------------------
# pytest plugin (the tests part runs pytest -p bench.gpu_suite): pass/fail per dtype
# ----------------------------------------------------------------------------------------

_LABELS: dict[str, str] = {}
_OUTCOMES: dict[str, str] = {}


def pytest_collection_finish(session) -> None:
    for item in session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        dtype = str(params.get("dtype", ""))
        _LABELS[item.nodeid] = "bf16" if "bfloat16" in dtype or "autocast" in item.name else "fp32"


def pytest_runtest_logreport(report) -> None:
    if report.when == "call" or report.outcome != "passed":
        if _OUTCOMES.get(report.nodeid) in (None, "passed"):
            _OUTCOMES[report.nodeid] = report.outcome


def pytest_sessionfinish(session, exitstatus) -> None:
    path = os.environ.get("STRATA_GPU_SUITE_TESTS_JSON")
    if path:
        Path(path).write_text(json.dumps({"labels": _LABELS, "outcomes": _OUTCOMES, "exitstatus": int(exitstatus)}))


if __name__ == "__main__":
    raise SystemExit(main())
