"""What the training part's runs are: one per train.recompute mode and kernel path (and the packed and
bf16-parameter runs beside the Triton run without recompute), each with its config's memory plan and
FLOPs per token, its run directory, command and profiled steps."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from bench.gpu.commands import REPO, load_bench


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
    fp8: str = ""
    """train.fp8's recipe ('' for none): the big matmuls in FP8 (kernels/fp8)."""

    @property
    def name(self) -> str:
        return (f"recompute={self.recompute} {self.backend}" + (" packed" if self.packed else "")
                + (" bf16-params" if self.bf16_params else "") + (f" fp8={self.fp8}" if self.fp8 else ""))

    def twin_of(self, other: TrainRun) -> bool:
        """Runs whose loss curves compare: the same data semantics, parameter dtype and matmul precision."""
        return self is not other and (self.packed, self.bf16_params, self.fp8) == (other.packed, other.bf16_params,
                                                                                  other.fp8)


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
            for recipe in args.fp8 if recompute == "none" and backend == "triton" else []:
                runs.append(TrainRun(recompute, backend, steps, [*overrides, f"train.fp8={recipe}"], fp8=recipe))
    return runs


def plain_twin(run: TrainRun, runs: list[TrainRun]) -> TrainRun | None:
    """The measured run of the same recompute and kernels on unpacked rows with fp32 parameters in bf16
    matmuls: what a packed, bf16-parameter or FP8 run is compared with."""
    return next((r for r in runs if not r.packed and not r.bf16_params and not r.fp8 and r.recompute == run.recompute
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


def run_dir_name(run: TrainRun) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", run.name)


def train_command_for(args, run: TrainRun, run_dir: Path) -> list[str]:
    return load_bench("train_gpu").train_command(args.config, run.steps, run_dir, run.overrides, save=False)


def profile_of(args, run: TrainRun, out: Path) -> tuple[int, int, Path] | None:
    """Three steps near the end of each Triton run, profiled into <out>/profile-<run>.md
    (bench/profile_steps.py); the medians of the run's other steps are not touched."""
    if run.backend != "triton" or args.no_profile or run.steps < args.skip_steps + 4:
        return None
    return run.steps - 4, run.steps - 1, out / f"profile-{run_dir_name(run)}.md"
