"""A few training steps under a parallel layout, and the one-process run they must equal.

The global batch of every step is the same micro-batches whatever the layout: data-parallel
rank r takes micro-batches r*gas .. (r+1)*gas - 1. The loss of a step is the mean over all
micro-batches (DeepSpeed's: mean over accumulation steps, averaged over DP ranks); both runs
clip the global gradient norm, so a wrong norm under TP/PP shows. The optimizer is SGD with
momentum: its update is linear in the gradient, so parameters can be compared at 1e-4
after several steps (Adam's normalised update turns float32 reduction-order noise in
near-zero gradients into differences of order lr).
"""
from __future__ import annotations

import pytest
import torch

from strata.model.config import ModelConfig
from strata.model.hybrid import HybridLM
from strata.model.structured import structured_linears
from strata.parallel.engine.parallelize import deepspeed_pipeline_section

LOSS_TOL, TENSOR_TOL = 1e-5, 1e-4
"""What a layout's run must meet against one process's (compare_to_reference): losses relative,
gradients and parameters as rel_error."""

SEQ, MICRO, GLOBAL_MICRO_BATCHES, VOCAB = 16, 2, 4, 128
LR, CLIP = 0.5, 0.5


def train_config(**changes) -> ModelConfig:
    """Six blocks of every kind; every size divisible by tp=2 (heads, groups, d_ff, vocab)."""
    cfg = ModelConfig(pattern="M*-M*-", d_model=64, vocab_size=VOCAB, max_seq_len=SEQ)
    cfg.mamba.headdim, cfg.mamba.d_state, cfg.mamba.ngroups, cfg.mamba.chunk_size = 16, 16, 2, 8
    cfg.attention.n_heads, cfg.attention.n_kv_heads = 4, 2
    cfg.mlp.d_ff = 128
    for k, v in changes.items():
        setattr(cfg, k, v)
    cfg.validate()
    return cfg


def build_model(cfg: ModelConfig) -> HybridLM:
    torch.manual_seed(0)
    model = HybridLM(cfg)
    for m in structured_linears(model):  # self-guided: half-way through the guided phase, both paths count
        m.guide_alpha = 0.3
    return model


def micro_batches(step: int, positions: bool = False) -> list[tuple]:
    """(input_ids, labels, position_ids): positions restart mid-sequence when asked (as
    data.reset_positions does at document boundaries), else None."""
    g = torch.Generator().manual_seed(100 + step)
    out = []
    for _ in range(GLOBAL_MICRO_BATCHES):
        ids = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=g)
        pos = None
        if positions:
            pos = torch.arange(SEQ).repeat(MICRO, 1)
            pos[:, SEQ // 3:] -= SEQ // 3
        out.append((ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), pos))
    return out


def optimizer(params):
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


def reference_training(cfg: ModelConfig, steps: int, positions: bool = False, fp8: list | None = None) -> dict:
    """One process, no DeepSpeed: the ground truth (FP8 per block as `fp8` says: apply_fp8's)."""
    from strata.parallel.engine.parallelize import apply_fp8

    model = apply_fp8(build_model(cfg), fp8 or [])
    opt = optimizer(model.parameters())
    losses, first_grads = [], None
    for step in range(steps):
        opt.zero_grad()
        batches = micro_batches(step, positions)
        total = 0.0
        for ids, labels, pos in batches:
            loss = model(ids, labels=labels, position_ids=pos) / len(batches)
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        losses.append(total)
    return {"losses": losses, "grads": first_grads, "params": dict(model.named_parameters())}


def deepspeed_config(gas: int, dp: int, zero_stage: int, sequence_parallel: bool, zero: dict | None = None) -> dict:
    return {"train_batch_size": MICRO * gas * dp, "train_micro_batch_size_per_gpu": MICRO,
            "gradient_accumulation_steps": gas, "gradient_clipping": CLIP,
            "zero_optimization": {"stage": zero_stage, **(zero or {})}, "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**62, "pipeline": deepspeed_pipeline_section(sequence_parallel)}


def layout_training(cfg: ModelConfig, tp: int, pp: int, zero_stage: int, steps: int,
                    sequence_parallel: bool = False, positions: bool = False, recompute: list[str] | None = None,
                    zero: dict | None = None, fp8: list | None = None) -> dict:
    """The same steps on this rank's part of a TP x PP x DP layout (DeepSpeed engine), with
    activation recompute and FP8 per block as `recompute` and `fp8` say (parallel_model's) and
    `zero`'s settings in DeepSpeed's zero_optimization section.
    Returns step losses, the first step's clipped gradients (ZeRO 0) and the final
    parameters (gathered under ZeRO-3), both keyed by HybridLM names and holding this rank's shards."""
    import deepspeed

    from strata.parallel.engine.parallelize import parallel_model
    from strata.parallel.pipeline.stages import model_parameter_name
    from strata.parallel.topology import init_topology

    topo = init_topology(tp, pp)
    model = build_model(cfg)
    module = parallel_model(model, topo, SEQ, sequence_parallel, recompute, fp8)
    if pp > 1:
        names = {p: model_parameter_name(n, len(cfg.pattern)) for n, p in module.named_parameters()}
    else:
        names = {p: n for n, p in module.named_parameters()}
    opt = optimizer(module.parameters())
    snapshots = []
    if zero_stage == 0:
        opt.register_step_pre_hook(lambda o, a, k: snapshots.append({names[p]: p.grad.clone() for p in names}))
    gas = GLOBAL_MICRO_BATCHES // topo.dp
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, mpu=topo.engine_mpu,
                                           config=deepspeed_config(gas, topo.dp, zero_stage, sequence_parallel, zero))
    losses = []
    for step in range(steps):
        mine = micro_batches(step, positions)[topo.dp_rank * gas:(topo.dp_rank + 1) * gas]
        if pp > 1:
            items = [((ids, pos), labels) if positions else (ids, labels) for ids, labels, pos in mine]
            losses.append(engine.train_batch(iter(items)).item())
            continue
        total = 0.0
        for ids, labels, pos in mine:
            loss = engine(ids, labels=labels, position_ids=pos)
            engine.backward(loss)
            engine.step()
            total += loss.item() / gas
        t = torch.tensor([total])
        torch.distributed.all_reduce(t, group=topo.get_data_parallel_group())
        losses.append(t.item() / topo.dp)
    with deepspeed.zero.GatheredParameters(list(names), enabled=zero_stage == 3):
        params = {names[p]: p.detach().clone() for p in names}
    return {"losses": losses, "grads": snapshots[0] if snapshots else None, "params": params, "topo": topo,
            "module": module}


def shard_errors(got: dict, reference: dict, model: HybridLM, topo, rel_error) -> float:
    """Largest relative error of this rank's tensors against the reference's shards."""
    from strata.parallel.tensor.splits import parameter_splits, shard_state_dict

    want = shard_state_dict({n: reference[n].detach() for n in got}, parameter_splits(model, topo.tp),
                            topo.tp_rank, topo.tp)
    return max(rel_error(got[n], want[n]) for n in got)


def compare_to_reference(run: dict, ref: dict, full: HybridLM, rel_error) -> dict:
    """A layout's losses beside one process's, and its gradient and parameter errors."""
    return {
        "losses": run["losses"], "want": ref["losses"],
        "grads": shard_errors(run["grads"], ref["grads"], full, run["topo"], rel_error) if run["grads"] else 0.0,
        "params": shard_errors(run["params"], ref["params"], full, run["topo"], rel_error),
    }


def assert_trains_like_reference(results: list[dict], name: str, steps: int) -> None:
    """compare_to_reference's numbers of run `name` on every rank: the one-process losses, first-step
    gradients and the parameters after `steps` steps, within LOSS_TOL and TENSOR_TOL."""
    for rank, rank_results in enumerate(results):
        r = rank_results[name]
        assert r["losses"] == pytest.approx(r["want"], rel=LOSS_TOL), f"rank {rank}: losses {r['losses']} != {r['want']}"
        assert r["grads"] < TENSOR_TOL, f"rank {rank}: first-step gradients off by {r['grads']:.2e}"
        assert r["params"] < TENSOR_TOL, f"rank {rank}: parameters after {steps} steps off by {r['params']:.2e}"
