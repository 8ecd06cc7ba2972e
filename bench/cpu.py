"""Strata's CPU training step against transformers' NemotronH at the same shape, side by side in
one process. Prints a markdown table (docs/BENCHMARKS.md).

    python bench/cpu.py                         # configs/tiny.yaml's shape, 15 rounds
    python bench/cpu.py --repeats 30 --threads 1
    python bench/cpu.py --profile               # + where Strata's step spends its time
    python bench/cpu.py model.mamba.chunk_size=32

One step = forward + backward + gradient clipping + AdamW on one micro-batch (fp32), for both:
Strata's HybridLM on the DeepSpeed engine as `strata train` builds it (parallel/engine/build.py,
ZeRO 0), and NemotronHForCausalLM with torch's AdamW and clip_grad_norm_. NemotronH has no RoPE
and relu2 MLPs, so the shared shape is configs/tiny.yaml with attention.rope=false and
mlp.activation=relu2, the rest as configured (d_model 256, M-*-M-, micro-batch 8 x 256 tokens,
vocab 4096); the HF model is built from Strata's config through model/hf (the mapping `strata
export` uses) and given Strata's initial weights and tied head, so both compute the same first
loss (printed). More rows: Strata on tiny.yaml itself (SwiGLU, RoPE: what `strata train` runs),
and both Strata models with STRATA_KERNELS=reference (the PyTorch references instead of the CPU
paths of kernels/*/cpu.py, switched per call), which shows what the CPU paths bring.

The sides take turns, one step each (A, B, C, ... A, B, C, ...), after warm-up steps, and the
table gives each side's median; ratios are of the medians. The process uses the CPU as `strata
train` does (launcher/host.py: OpenMP threads spin 1000 rounds unless the environment says otherwise,
glibc malloc keeps freed memory), for every side alike. On a machine shared with other work, only the
ratios mean much.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

NEMOTRON_SHAPE = ["model.attention.rope=false", "model.mlp.activation=relu2"]


def one_rank_group() -> None:
    """A one-process gloo group, as `strata train` starts one (parallel/distributed.py)."""
    from strata.parallel.distributed import init_distributed

    init_distributed("gloo")


@contextlib.contextmanager
def kernels(backend: str | None):
    """STRATA_KERNELS for the duration (kernels.ops reads it at every call); None: as it was."""
    old = os.environ.get("STRATA_KERNELS")
    if backend is not None:
        os.environ["STRATA_KERNELS"] = backend
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("STRATA_KERNELS", None)
        else:
            os.environ["STRATA_KERNELS"] = old


def strata_side(cfg, seed: int, backend: str | None = None):
    """A step function of Strata's model on the DeepSpeed engine (one micro-batch per step), and
    the model's initial weights."""
    import torch

    from strata.model.hybrid import HybridLM
    from strata.parallel.engine.build import build_engine

    torch.manual_seed(seed)
    model = HybridLM(cfg.model)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    engine = build_engine(model, cfg.train.optimizer(), cfg.parallel, 1)

    def step(ids, labels):
        with kernels(backend):
            loss = engine(ids, labels=labels)
            engine.backward(loss)
            engine.step()
        return loss.item()

    step.engine = engine
    return step, initial


def hf_side(cfg, strata_state: dict):
    """The same step for transformers' NemotronH built from Strata's config (model/hf), with
    Strata's initial weights (lm_head tied to the embedding, as Strata's), torch's AdamW (the same
    groups and hyper-parameters, fused on CPU as Strata's) and clip_grad_norm_."""
    import torch
    import transformers

    from strata.model import hf
    from strata.parallel.engine.build import param_groups

    config = hf.build_hf_config(cfg.model, "nemotron_h")
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k.replace("backbone.", "model.", 1): v  # transformers' in-memory names
             for k, v in hf.to_hf_state_dict(strata_state, cfg.model, "nemotron_h").items()}
    model.load_state_dict(state, strict=True)
    if cfg.model.tie_embeddings:
        model.lm_head.weight = model.get_input_embeddings().weight
    model.train()
    t = cfg.train
    opt = torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                            fused=True)

    def step(ids, labels):
        loss = model(ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def batch(cfg, seed: int):
    """Token ids (b, l) and Strata's labels: the next token, -100 at the end. transformers takes
    labels = ids and shifts them itself: the same targets."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.model.vocab_size, (cfg.parallel.micro_batch_size, cfg.train.seq_len), generator=g)
    return ids, torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="Strata config (default configs/tiny.yaml)")
    p.add_argument("--repeats", type=int, default=15, help="timed steps per side, taken in turns")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--profile", action="store_true", help="then profile Strata's step on tiny.yaml (5 steps)")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every model, e.g. model.d_model=512")
    args = p.parse_args(argv)

    from strata.launcher import host

    host.short_omp_spinning()  # as `strata train` (launcher/cli.py): before torch loads OpenMP
    from strata.launcher.quiet import quiet_third_party

    quiet_third_party()
    import torch

    malloc_kept = host.keep_freed_memory()

    from strata.launcher.config import load_config

    if args.threads:
        torch.set_num_threads(args.threads)
    one_rank_group()
    common = ["model.vocab_size=4096", "parallel.zero_stage=0", *args.overrides]
    micro = load_config(args.config, common).parallel.micro_batch_size
    common += [f"train.global_batch_size={micro}"]  # one micro-batch per optimizer step
    shape_cfg = load_config(args.config, common + NEMOTRON_SHAPE)
    own_cfg = load_config(args.config, common)

    strata_step, initial = strata_side(shape_cfg, 0)
    hf_step = hf_side(shape_cfg, initial)
    own_step, _ = strata_side(own_cfg, 0)
    ref_step, _ = strata_side(shape_cfg, 0, backend="reference")
    own_ref_step, _ = strata_side(own_cfg, 0, backend="reference")
    ids, labels = batch(shape_cfg, 1)
    loss_s, loss_h = strata_step(ids, labels), hf_step(ids, ids)
    sides = {
        "transformers NemotronH": lambda: hf_step(ids, ids),
        "Strata, same shape": lambda: strata_step(ids, labels),
        "Strata, same shape, reference kernels": lambda: ref_step(ids, labels),
        "Strata, tiny.yaml (SwiGLU, RoPE)": lambda: own_step(ids, labels),
        "Strata, tiny.yaml, reference kernels": lambda: own_ref_step(ids, labels),
    }
    for _ in range(args.warmup):
        for fn in sides.values():
            fn()
    times = {name: [] for name in sides}
    for _ in range(args.repeats):
        for name, fn in sides.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    m = shape_cfg.model
    tokens = shape_cfg.parallel.micro_batch_size * shape_cfg.train.seq_len
    print(f"{m.pattern} d_model={m.d_model} vocab={m.vocab_size} chunk={m.mamba.chunk_size} | micro-batch "
          f"{shape_cfg.parallel.micro_batch_size} x {shape_cfg.train.seq_len} tokens, fp32, AdamW | torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, {omp_waiting()}, "
          f"malloc {'tuned' if malloc_kept else 'as glibc does'} (launcher/host.py), "
          f"{os.cpu_count()} cores ({platform.machine()}) | load average {os.getloadavg()[0]:.2f} at the end")
    print(f"first losses (same weights, same batch): Strata {loss_s:.5f}, NemotronH {loss_h:.5f}\n")
    base = statistics.median(times["transformers NemotronH"])
    print(f"| model (median of {args.repeats}, taking turns) | step (ms) | tokens/s | vs NemotronH |")
    print("| --- | --- | --- | --- |")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {1e3 * t:.1f} | {tokens / t:,.0f} | {base / t:.2f}x |")
    if args.profile:
        profile(own_step, ids, labels)
    return 0


def profile(step, ids, labels, steps: int = 5) -> None:
    """Where Strata's step spends its time: forward, backward, the engine's step (the optimizer
    apart), and the ops with the most self time."""
    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function

    engine = step.engine
    phases = {"forward": (engine, "forward"), "backward": (engine, "backward"),
              "engine step (clip, optimizer, schedule)": (engine, "step"), "optimizer": (engine.optimizer, "step")}
    originals = {}
    for label, (obj, name) in phases.items():
        fn = originals[label] = getattr(obj, name)
        setattr(obj, name, lambda *a, _fn=fn, _label=label, **k: _timed(_label, _fn, *a, **k))
    try:
        for _ in range(2):
            step(ids, labels)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                with record_function("step"):
                    step(ids, labels)
            wall = (time.perf_counter() - start) / steps
    finally:
        for label, (obj, name) in phases.items():
            setattr(obj, name, originals[label])
    events = {e.key: e for e in prof.key_averages()}
    print(f"\nStrata's step (tiny.yaml), {steps} steps under the profiler: {1e3 * wall:.1f} ms each\n")
    print("| part | ms per step | share |")
    print("| --- | --- | --- |")
    for label in [*phases, "step"]:
        ms = events[label].cpu_time_total / 1e3 / steps
        print(f"| {label if label != 'step' else 'whole step'} | {ms:.1f} | {100 * ms / (1e3 * wall):.0f}% |")
    print()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def omp_waiting() -> str:
    """How OpenMP threads wait here, as the environment says."""
    keys = [k for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ]
    return ", ".join(f"{k}={os.environ[k]}" for k in keys) or "libgomp's default wait"


def _timed(label, fn, *args, **kwargs):
    from torch.profiler import record_function

    with record_function(label):
        return fn(*args, **kwargs)


if __name__ == "__main__":
    sys.exit(main())
