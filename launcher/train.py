"""The training entry point: one rank of a job, however it was launched.

    strata train                                   # configs/tiny.yaml on one process
    strata train --config configs/tiny.yaml train.max_steps=50
    torchrun --nproc-per-node 2 -m strata.launcher.train --config configs/tiny.yaml parallel.zero_stage=2
    deepspeed --num_gpus 8 launcher/train.py --config configs/hybrid-1b3.yaml

Started again with the same command, a run resumes from its newest complete checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`deepspeed launcher/train.py`): Python put launcher/ first on
    # sys.path, where its modules (config, errors, metrics, ...) would stand in for top-level packages of those names;
    # Strata's own modules resolve through the installed `strata` namespace
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

if __name__ == "__main__":  # torchrun, the deepspeed launcher, srun: before anything imports DeepSpeed
    from strata.launcher.quiet import quiet_third_party

    quiet_third_party()  # (`strata train` made the call in launcher/cli.py)

import torch
import torch.distributed as dist

from strata.data.corpus import open_corpus
from strata.data.errors import DataError
from strata.data.loader import TrainLoader, eval_batches
from strata.data.prepare import ensure_prepared
from strata.data.tokenizer import install_run_tokenizer
from strata.kernels.fp8.scaled import unavailable as fp8_unavailable
from strata.launcher.config import Config, ConfigError, dump_yaml, load_config
from strata.launcher.errors import (CONFIG_EXIT, FAILURE_EXIT, PREEMPTED_EXIT, Diverged, describe_os_error,
                                    exit_code_of, leave_os_errors_to_the_main_thread, report_error_once)
from strata.launcher.metrics import Reporter, hardware_metrics, peak_tflops, process_rss_bytes, show_strata_logs
from strata.launcher.plan import log_memory_plan
from strata.launcher.run_dir import check_run_dir, check_same_model, check_shared_run_dir
from strata.launcher.signals import Preempted, StopRequest
from strata.model.counting import format_counts, training_flops_per_token
from strata.model.generate import PromptTooLong, Sampling, generate
from strata.model.guidance import SelfGuidance, equal_flops_extra_steps, split_guide_flops
from strata.model.hybrid import HybridLM
from strata.model.mlp import describe_structure
from strata.parallel.checkpoint import files as ckpt
from strata.parallel.checkpoint.background import BackgroundSaves
from strata.parallel.checkpoint.rebuild import rebuild_engine, supports_rebuild
from strata.parallel.checkpoint.resume import ResumePlan
from strata.parallel.distributed import (DistInfo, a_rank_left, decided_by_rank0, init_distributed, on_every_rank,
                                         rank_environment, ranks_still_here, restart_hazard, shutdown,
                                         torchrun_restarts)
from strata.parallel.engine.build import build_engine, data_parallel_size, grad_accumulation_steps
from strata.parallel.engine.parallelize import describe_fp8, parallel_model, rank_batch
from strata.parallel.engine.steps import eval_loss, train_micro_batches
from strata.parallel.guard import SpikeGuard, parameters_finite
from strata.parallel.layout import Layout, check_layout as check_parallel_layout
from strata.parallel.topology import Topology, init_topology


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="strata train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML config (default: configs/tiny.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=50")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


@dataclass
class Run:
    cfg: Config
    dist: DistInfo
    engine: object
    loader: object
    eval_batches: list
    reporter: Reporter
    run_dir: Path
    flops_per_token: float
    """Training FLOPs per token of the model without self-guided dense paths; a step adds
    guide_flops_per_token times the share of layers that computed theirs."""
    peak_tflops: float | None
    step: int = 0
    guidance: SelfGuidance | None = None
    topo: Topology | None = None
    guide_flops_per_token: float = 0.0
    stop: StopRequest | None = None
    spikes: SpikeGuard | None = None
    skipped_in_a_row: int = 0
    last_saved: Path | None = None
    background: BackgroundSaves | None = None
    """checkpoint.async: the save being written in the background, if any."""
    tokenizer: object = None
    resolved_config: str = ""
    """The config as resolve_config left it (config.yaml): nothing may change it afterwards
    (check_config_unchanged, before every save)."""


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """bf16 where fp32 parameters compute in bf16 (bf16 parameters compute in their own dtype)."""
    autocast = cfg.train.param_dtype == "fp32" and cfg.train.computes_in_bf16(on_gpu=device.type == "cuda")
    return torch.bfloat16 if autocast else None


def autocast(cfg: Config, device: torch.device):
    """For what runs outside the engine's forward: the pipeline's stages, evaluation, samples
    (the engine's forward enters its own: parallel.engine.autocast_section)."""
    dtype = autocast_dtype(cfg, device)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def mean_loss_and_stop(losses: list[torch.Tensor], stop: bool, device: torch.device) -> tuple[float, bool]:
    """The step's micro-batch losses averaged over them and over ranks, and whether any rank was
    asked to stop: one all-reduce per step carries both, so every rank takes the same decision at
    the same step boundary. Reading it is the step's one host synchronisation."""
    loss = torch.stack(losses).to(device, torch.float64).mean()
    t = torch.stack([loss, torch.tensor(float(stop), dtype=torch.float64, device=device)])
    dist.all_reduce(t)
    return t[0].item() / dist.get_world_size(), bool(t[1].item())


def any_rank_asked_to_stop(stop: StopRequest, device: torch.device) -> bool:
    t = torch.tensor([float(stop.requested)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return bool(t.item())


def open_data(cfg: Config, info: DistInfo):
    """Rank 0 prepares the corpus while the others wait on the long-wait group (preparing a real corpus can
    take longer than parallel.timeout_s); its error, or a rank that cannot open what it prepared (a
    node-local data.prepared_dir), is one line on every rank."""
    decided_by_rank0(lambda: ensure_prepared(cfg.data))
    return on_every_rank(lambda: open_corpus(cfg.data))


def resolve_config(cfg: Config, tokenizer_vocab: int) -> int:
    """What the config leaves to the run, settled once, before anything is built: the vocabulary
    (model.vocab_size 0 follows the tokenizer) and the length (mlp.equal_flops extends
    train.max_steps). Returns the steps the config asked for: the self-guided phase is a share of
    those, not of the extension. The resolved config is what config.yaml records (equal_flops
    off), so a run restarted from it does not extend twice."""
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tokenizer_vocab
    elif cfg.model.vocab_size < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer_vocab}; set model.vocab_size={tokenizer_vocab} (or 0 to follow the tokenizer)")
    asked = cfg.train.max_steps
    if cfg.model.mlp.equal_flops:
        try:
            cfg.train.max_steps += equal_flops_extra_steps(cfg.model, asked, cfg.train.seq_len)
        except ValueError as e:
            raise ConfigError(f"model.{e}") from None
        cfg.model.mlp.equal_flops = False
    return asked


def setup(cfg: Config, info: DistInfo) -> Run:
    run_dir = Path(cfg.train.run_dir)
    on_every_rank(lambda: check_run_dir(run_dir))
    check_shared_run_dir(run_dir, info.is_main)
    topo = init_topology(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.cp)
    dp, dp_rank = topo.dp, topo.dp_rank
    corpus = open_data(cfg, info)
    asked_steps = resolve_config(cfg, corpus.tokenizer.vocab_size)
    resolved = dump_yaml(cfg)  # from here on the config is read only: check_config_unchanged
    install_run_tokenizer(corpus.tokenizer, run_dir, write=info.is_main)  # what generate/export read
    check_layout(cfg, info.world_size)  # again, now that the vocabulary is known
    torch.manual_seed(cfg.train.seed)
    model = HybridLM(cfg.model)  # on the CPU: sharded / cut into stages before it moves
    n_params = sum(p.numel() for p in model.parameters())
    newest, notes = None, []
    if cfg.checkpoint.resume:
        newest, notes = ckpt.checkpoint_to_resume(run_dir / "checkpoints", cfg.checkpoint.on_corrupt, info.is_main)
        check_same_model(newest, cfg.model)
    plan = ResumePlan.decide(newest, cfg.model, layout_of(cfg, info))
    plan.prepare(model)
    check_fp8(cfg, info.device)
    fp8 = cfg.train.block_fp8(len(cfg.model.blocks()))
    model = parallel_model(model, topo, cfg.train.seq_len, cfg.parallel.sequence_parallel,
                           cfg.train.block_recompute(cfg.model.blocks()), fp8).to(info.device)
    guidance = start_guidance(cfg, model, newest if plan.continues_training else None, asked_steps)
    engine = build_engine(model, cfg.train.optimizer(), cfg.parallel, info.world_size, mpu=topo.engine_mpu,
                          autocast=autocast_dtype(cfg, info.device))
    rss_with_engine = process_rss_bytes(info.device)
    loader = TrainLoader(corpus, cfg.data, cfg.train.seq_len, cfg.parallel.micro_batch_size,
                         dp_rank, dp, cfg.train.seed)
    step = 0
    state = plan.restore(engine, info.rank, topo, cfg.train.lr)
    if state is not None:
        loader.load_state_dict(state["data"])
        step = state["step"]
    evals = eval_batches(corpus, cfg.data, cfg.train.seq_len, cfg.parallel.micro_batch_size,
                         cfg.train.eval_batches, dp_rank, dp)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(resolved)
    reporter = Reporter(run_dir, cfg.logging, info.is_main, cfg.train.max_steps, step)
    reporter.text("config", resolved)
    for note in notes:
        reporter.log(f"strata: {note}")
    reporter.log(f"strata: {cfg.model.pattern} d_model={cfg.model.d_model} vocab={cfg.model.vocab_size} "
                 f"params={n_params / 1e6:.2f}M | world={info.world_size} dp={dp} zero={cfg.parallel.zero_stage} "
                 f"tp={topo.tp}{f' cp={topo.cp}' if topo.cp > 1 else ''} pp={topo.pp} | {plan.describe(step)}")
    reporter.log(format_counts(cfg.model, cfg.train.seq_len))
    if cfg.train.fp8 != "none":
        reporter.log(describe_fp8(fp8, model, cfg.parallel.micro_batch_size * cfg.train.seq_len))
    log_memory_plan(reporter, cfg, info.world_size, info.device, topo.pp_rank, step, rss_with_engine)  # and measured
    if describe_structure(cfg.model):
        reporter.log(describe_structure(cfg.model))
    flops, guide_flops = split_guide_flops(cfg.model, cfg.train.seq_len, training_flops_per_token)
    return Run(cfg, info, engine, loader, evals, reporter, run_dir, flops,
               peak_tflops(cfg.logging.peak_tflops, info.device), step, guidance, topo, guide_flops,
               last_saved=newest, background=BackgroundSaves() if cfg.checkpoint.async_ else None,
               tokenizer=corpus.tokenizer, resolved_config=resolved,
               spikes=SpikeGuard(cfg.train.spike_zscore, cfg.train.spike_window, cfg.train.spike_skip))


def start_guidance(cfg: Config, model, newest: Path | None, asked_steps: int) -> SelfGuidance | None:
    """Self-guided training's schedule, as the checkpoint left it; a run resumed past the
    guided phase loses its dense paths here, before the engine (and its optimizer) exist."""
    if not cfg.model.mlp.self_guided:
        return None
    if cfg.parallel.pp > 1 or not supports_rebuild(cfg.parallel.zero_stage):
        raise ConfigError(f"model.mlp.self_guided: dropping the dense paths mid-run needs parallel.zero_stage <= 2 "
                          f"and pp = 1 (got {cfg.parallel.zero_stage}, {cfg.parallel.pp}); change one or the other")
    guidance = SelfGuidance(model, cfg.model.mlp, asked_steps, cfg.train.seed)
    step = 0
    if newest is not None:
        manifest = ckpt.read_manifest(newest)
        guidance.load_state_dict(manifest.get("self_guided", guidance.state_dict()))
        step = manifest["step"]
    if guidance.should_drop(step):
        guidance.drop_dense_paths(model)
    return guidance


def end_guided_phase_if_due(run: Run) -> None:
    """Once a = 0 for good: drop the dense paths and rebuild the engine without them, before
    the next checkpoint, so that they hold no optimizer state and are saved no more."""
    if run.guidance is not None and run.guidance.should_drop(run.step):
        run.guidance.drop_dense_paths()
        run.engine = rebuild_engine(run.engine, run.engine.module, run.cfg.train.optimizer(), run.cfg.parallel,
                                    run.dist.world_size, mpu=run.topo.engine_mpu)
        run.reporter.log(f"step {run.step:6d} | self-guided training done: dense paths dropped")


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_step(run: Run) -> tuple[dict, bool]:
    """One optimizer step; returns its metrics and whether the ranks agreed to stop after it."""
    engine, cfg, device = run.engine, run.cfg, run.dist.device
    start = time.perf_counter()
    lr = engine.get_lr()[0]
    skipped_before = engine.skipped_steps
    waits = []
    losses = train_micro_batches(engine, run.topo, micro_batches(run, waits), gate=run.spikes.gate,
                                           autocast=lambda: autocast(cfg, device))
    data_wait = sum(waits)
    grad_norm = float(engine.get_global_grad_norm())  # before clipping, over every stage's parameters
    loss, stop = mean_loss_and_stop(losses, run.stop.requested, device)
    elapsed = time.perf_counter() - start
    tokens = cfg.train.global_batch_size * cfg.train.seq_len
    skipped = engine.skipped_steps > skipped_before
    run.skipped_in_a_row = run.skipped_in_a_row + 1 if skipped else 0
    spike = {"loss_spike_z": run.spikes.zscore_of(loss)} if run.spikes.is_spike(loss) else {}
    run.spikes.record(loss, applied=not skipped and not spike)
    guide_share = run.guidance.dense_share() if run.guidance is not None else 0.0
    flops_per_token = run.flops_per_token + run.guide_flops_per_token * guide_share
    hardware = hardware_metrics(tokens / elapsed / run.dist.world_size, flops_per_token, run.peak_tflops, device)
    return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "skipped_steps": engine.skipped_steps,
            "tokens_per_s": tokens / elapsed, "step_time_s": elapsed,
            "data_wait_share": data_wait / elapsed, "tokens_seen": (run.step + 1) * tokens, **hardware, **spike}, stop


def micro_batches(run: Run, waits: list):
    """The step's micro-batches, on the device, as the engine draws them (the pipeline engine
    only on its first and last stages); each one's wait for data is appended to `waits`."""
    for _ in range(run.engine.gradient_accumulation_steps()):
        batch = to_device(rank_batch(next(run.loader), run.topo), run.dist.device)
        waits.append(run.loader.last_wait_s)
        yield batch


@torch.no_grad()
def evaluate(run: Run) -> dict:
    """Mean loss over every rank's held-out batches; {} when the corpus holds none."""
    run.engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=run.dist.device)
    for batch in run.eval_batches:
        batch = to_device(rank_batch(batch, run.topo), run.dist.device)
        with autocast(run.cfg, run.dist.device):
            total[0] += eval_loss(run.engine, run.topo, batch).item()
        total[1] += 1
    run.engine.train()
    dist.all_reduce(total)
    if total[1] == 0:
        return {}
    loss = (total[0] / total[1]).item()
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def report_eval(run: Run, result: dict) -> None:
    if not result:
        run.reporter.log(f"step {run.step:6d} | no held-out data at this seq_len: eval skipped")
        return
    run.reporter.scalars(run.step, result, kind="eval")
    run.reporter.log(f"step {run.step:6d} | eval loss {result['loss']:.4f} | perplexity {result['perplexity']:.2f}")


def report_sample(run: Run) -> None:
    """A short greedy continuation of logging.sample_prompt after each evaluation, in the log and
    TensorBoard's text tab: a user sees the model learn, not only a number. Rank 0 generates
    alone, so it must hold the whole model as one process runs it (tp = cp = pp = 1, ZeRO <= 2)."""
    prompt, tokenizer = run.cfg.logging.sample_prompt, run.tokenizer
    if not prompt or not run.dist.is_main or run.topo.layout.world_size // run.topo.dp > 1 or \
            run.cfg.parallel.zero_stage == 3:
        return
    sampling = Sampling(max_new_tokens=run.cfg.logging.sample_tokens, eos_id=tokenizer.eos_id)
    try:
        with autocast(run.cfg, run.dist.device):
            out = generate(run.engine.module, tokenizer.encode(prompt), sampling, allowed_vocab=tokenizer.vocab_size)
    except PromptTooLong:
        return
    text = prompt + tokenizer.decode(out.new_tokens[0].tolist())
    run.reporter.text("sample", text, run.step)
    run.reporter.log(f"step {run.step:6d} | sample {text!r}")


def layout_of(cfg: Config, info: DistInfo) -> Layout:
    par = cfg.parallel
    return Layout(par.tp, par.pp, data_parallel_size(info.world_size, par), par.zero_stage, cfg.train.param_dtype,
                  par.cp)


def check_config_unchanged(run: Run) -> None:
    """The config was resolved once, before anything was built; a checkpoint must not record a
    run that changed it since (that would be a bug here, not a user's mistake)."""
    now = dump_yaml(run.cfg)
    if run.resolved_config and now != run.resolved_config:
        changed = [line[1:].strip() for line in difflib.unified_diff(run.resolved_config.splitlines(),
                                                                     now.splitlines(), lineterm="", n=0)
                   if line[:1] == "+" and not line.startswith("+++")]
        raise RuntimeError(f"the config changed after it was resolved ({'; '.join(changed)[:300]}); "
                           "only launcher.train.resolve_config may write it")


def save(run: Run, busy: str | None = None) -> None:
    """Collective. Only weights that are finite are ever written: a checkpoint is what a
    diverged run falls back to. With checkpoint.async the save is started, not finished (`busy`:
    what to do if one is still in flight, checkpoint.async_busy unless given)."""
    check_config_unchanged(run)
    if not parameters_finite(run.engine):
        raise Diverged(f"the weights became non-finite at step {run.step} after a step whose loss was finite "
                       f"(damaged optimizer state?); not saved. {last_good(run)}")
    state = {"step": run.step, "data": run.loader.state_dict(), "layout": layout_of(run.cfg, run.dist).record()}
    if run.guidance is not None:
        state["self_guided"] = run.guidance.state_dict()
    if run.background is None:
        run.last_saved = ckpt.save_checkpoint(run.engine, run.run_dir / "checkpoints", run.step, state,
                                              run.cfg.checkpoint.keep_last)
        return
    if run.background.in_flight is not None:
        busy = busy or run.cfg.checkpoint.async_busy
        what = "waiting for it" if busy == "wait" else "this save skipped (checkpoint.async_busy=skip)"
        run.reporter.log(f"step {run.step:6d} | checkpoint {run.background.in_flight.name} is still being written: {what}")
        if busy == "skip":
            return
        finish_background_save(run)
    run.background.start(run.engine, run.run_dir / "checkpoints", run.step, state, run.cfg.checkpoint.keep_last)


def finish_background_save(run: Run) -> None:
    """Collective: wait for the save in flight (checkpoint.async), if any, and commit it."""
    if run.background is not None and run.background.in_flight is not None:
        run.last_saved = run.background.finish()


def commit_written_save(run: Run) -> None:
    """Collective, at each step boundary while a save is in flight: commit it once every rank has
    written its files (one small all-reduce), so that a checkpoint counts as soon as it can."""
    if run.background is not None and run.background.written_everywhere(run.dist.device):
        run.last_saved = run.background.finish()


def last_good(run: Run) -> str:
    if run.last_saved is None:
        return "No checkpoint was written before: start again with a lower train.lr"
    return (f"The last good checkpoint {run.last_saved} is intact: the same command resumes from it; "
            "lower train.lr or change train.seed if it diverges again")


def check_divergence(run: Run, metrics: dict) -> None:
    """A loss spike and a skipped step are logged; too many skipped in a row stop the run
    (parallel/guard.py skips them)."""
    if "loss_spike_z" in metrics:
        run.reporter.log(f"step {run.step:6d} | loss spike: {metrics['loss']:.4f} is {metrics['loss_spike_z']:.1f} "
                         f"sigma above the last steps' mean{' (skipped)' if run.skipped_in_a_row else ''}")
    if run.skipped_in_a_row == 0:
        return
    why = "non-finite loss or gradient" + (" or loss spike" if run.cfg.train.spike_skip else "")
    run.reporter.log(f"step {run.step:6d} | {why}: step skipped "
                     f"({run.skipped_in_a_row} in a row, limit {run.cfg.train.max_skipped_steps})")
    if run.skipped_in_a_row >= run.cfg.train.max_skipped_steps:
        raise Diverged(f"training diverged: {run.skipped_in_a_row} consecutive steps (to step {run.step}) had a "
                       f"non-finite loss or gradient and were skipped. {last_good(run)}")


def stop_for_preemption(run: Run) -> None:
    """Every rank agreed to stop: save where the run stands (unless that step was skipped, or is
    saved already) and leave with the preempted code. A save in flight is finished first."""
    finish_background_save(run)
    saved_now = run.last_saved is not None and run.last_saved.name == ckpt.step_name(run.step)
    if run.skipped_in_a_row == 0 and not saved_now:
        save(run)
        finish_background_save(run)
    where = f"checkpoint {run.last_saved}" if run.last_saved is not None else "no checkpoint (none was due yet)"
    raise Preempted(f"stopped by {run.stop.signal or 'a signal on another rank'} at step {run.step}: "
                    f"{where}; run the same command again to resume")


def due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


def train(cfg: Config, info: DistInfo, stop: StopRequest) -> dict:
    run = setup(cfg, info)
    run.stop = stop
    t0, last = time.perf_counter(), cfg.train.max_steps
    result, save_pending = None, False
    with stop.deferred():  # from here a signal is acted on at the next step boundary
        while run.step < last:
            alpha = run.guidance.update(run.step) if run.guidance is not None else None
            metrics, stop_now = train_step(run)
            run.step += 1
            commit_written_save(run)
            run.reporter.step_done(run.step, metrics if alpha is None else {**metrics, "self_guided_alpha": alpha})
            check_divergence(run, metrics)
            end_guided_phase_if_due(run)
            if stop_now:
                stop_for_preemption(run)
            if due(run.step, cfg.train.eval_every, last):
                result = evaluate(run)
                report_eval(run, result)
                report_sample(run)
                if any_rank_asked_to_stop(stop, info.device):
                    stop_for_preemption(run)
            save_pending = save_pending or due(run.step, cfg.checkpoint.every, last)
            if save_pending and run.skipped_in_a_row == 0:  # never from a step that was skipped
                save(run, busy="wait" if run.step == last else None)
                save_pending = False
        finish_background_save(run)
    if result is None:  # resumed at the end: report the final model's eval loss all the same
        result = evaluate(run)
    final = f"{result['loss']:.4f}" if result else "n/a (no held-out data)"
    run.reporter.log(f"done: {run.step} steps in {time.perf_counter() - t0:.1f}s | "
                     f"final eval loss {final} (ln vocab {math.log(cfg.model.vocab_size):.3f})")
    run.reporter.close()
    run.loader.close()
    return result


def check_layout(cfg: Config, world_size: int) -> None:
    """Layout errors surface before any process group exists: one line naming what does
    not divide (heads, groups, vocabulary, blocks, world size) and the nearest valid layouts."""
    par = cfg.parallel
    try:
        check_parallel_layout(cfg.model, par.tp, par.pp, world_size, par.zero_stage, par.sequence_parallel,
                              cfg.train.seq_len, cfg.planned_vocab_size(), par.cp)
        grad_accumulation_steps(cfg.train.global_batch_size, par, data_parallel_size(world_size, par))
        if cfg.train.spike_skip and par.pp > 1:
            raise ValueError("train.spike_skip: the pipeline engine computes the loss inside its schedule; "
                             "use parallel.pp=1, or train.spike_skip=false to only log spikes")
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_fp8(cfg: Config, device: torch.device) -> None:
    """train.fp8 where its products cannot run (a PyTorch or GPU without FP8 GEMMs): one line."""
    if cfg.train.fp8 != "none":
        reason = fp8_unavailable(cfg.train.fp8, device)
        if reason:
            raise ConfigError(f"train.fp8: {cfg.train.fp8} cannot run on this {device.type}: {reason}; "
                              "use train.fp8=none")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rank, world_size, _ = rank_environment()
    is_main = rank == 0
    try:
        cfg = load_config(args.config, args.overrides)
        check_layout(cfg, world_size)
    except ConfigError as e:
        report_error_once(str(e), is_main, every_rank_has_it=True)  # the same config and world size
        return CONFIG_EXIT
    show_strata_logs(is_main)
    hazard = restart_hazard()
    if hazard and is_main:
        print(f"strata: warning: {hazard}", file=sys.stderr, flush=True)
    stop = StopRequest(cfg.train.preempt_signal)
    stop.install()
    threading.excepthook = leave_os_errors_to_the_main_thread
    try:
        info = init_distributed(cfg.parallel.backend, cfg.parallel.timeout_s, cfg.parallel.long_timeout_s)
        train(cfg, info, stop)
        return 0
    except (Preempted, Diverged, ConfigError, ckpt.CheckpointError, DataError, OSError) as e:
        stop.restore()  # a launcher stopping the other ranks now must not interrupt the report
        if isinstance(e, Preempted):
            if is_main:
                print(f"strata: {e}", file=sys.stderr, flush=True)
            return PREEMPTED_EXIT
        report_error_once(describe_os_error(e) if isinstance(e, OSError) else str(e), is_main, rank)
        return exit_code_of(e)
    except RuntimeError as e:  # a collective's error: another rank went away, or a bug (its traceback)
        if not a_rank_left(e):
            raise
        report_rank_left(cfg, stop)
        return FAILURE_EXIT
    finally:
        stop.restore()
        shutdown()


def report_rank_left(cfg: Config, stop: StopRequest) -> None:
    """A collective failed because another rank went away (kill -9, a node lost, its own error): one line,
    by the lowest rank still running, instead of gloo's or NCCL's traceback. A launcher's SIGTERM (torchrun
    stops the survivors at once) is held off for the few seconds this takes."""
    stop.ignore()
    here = ranks_still_here()
    rank, world, _ = rank_environment()
    if here is not None and rank != min(here):
        return
    if here is not None and len(here) == world:
        print(f"strata: rank {rank}: a collective waited longer than parallel.timeout_s={cfg.parallel.timeout_s} s "
              "while every rank was still running (one was slower: raise parallel.timeout_s); every rank stops. "
              f"{restart_advice()}", file=sys.stderr, flush=True)
        return
    left = "rank 0 (which held the rendezvous store)" if here is None else \
        f"rank{'s' if world - len(here) > 1 else ''} {', '.join(str(r) for r in range(world) if r not in here)}"
    newest = ckpt.newest_checkpoint(Path(cfg.train.run_dir) / "checkpoints")
    where = f"the newest checkpoint, {newest.name}" if newest is not None else "the start (no checkpoint yet)"
    print(f"strata: rank {rank}: {left} left the job (killed, or stopped by an error its own line names); "
          f"every rank stops. {restart_advice()}: the run goes on from {where}", file=sys.stderr, flush=True)


def restart_advice() -> str:
    """What happens next: torchrun --max-restarts starts the job again by itself while restarts are left."""
    done, allowed = torchrun_restarts()
    if done < allowed:
        return f"torchrun restarts it in place (restart {done + 1} of {allowed})"
    if allowed:
        return f"torchrun has used its {allowed} restart(s): run the same command again"
    return "Run the same command again (or launch with torchrun --max-restarts N to restart by itself)"


def run(argv: list[str] | None = None) -> None:
    """The process entry point (`strata train`, torchrun, the deepspeed launcher): main, then
    leave the process without finalizing the interpreter. Gloo's worker threads may still be
    releasing the last collective's tensors after the process group is destroyed; when that
    happens during finalization the thread takes the GIL from a dying interpreter and the
    rank aborts (SIGABRT, "terminate called without an active exception";
    pytorch/pytorch#179291), failing a finished job. Everything Strata writes is closed by
    then, so the rest of finalization has nothing left to do."""
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    run()
