"""The divergence guard (parallel/guard.py): a step whose gradient is not finite on any rank is
skipped by every rank, and the run then equals one that never took that step: same weights,
same AdamW state, same LR schedule."""
import pytest
import torch
from deepspeed.utils import safe_get_full_fp32_param

from strata.launcher.config import TrainConfig
from strata.model.config import ModelConfig
from strata.model.hybrid import HybridLM
from strata.parallel.config import ParallelConfig
from strata.parallel.engine.build import build_engine
from strata.parallel.guard import SpikeGuard, parameters_finite, poison_non_finite
from tests.parallel.dist_helpers import read_results, spawn, write_result

STEPS, BAD = 5, 2  # batch 2 (0-based) gets a NaN gradient on rank 1 only


def batches(rank: int):
    """The same batches in both runs: batch i of rank r from seed (i, r)."""
    for i in range(STEPS):
        g = torch.Generator().manual_seed(1000 * i + rank)
        ids = torch.randint(0, 64, (2, 17), generator=g)
        yield i, ids[:, :-1], ids[:, 1:]


def run(rank: int, world: int, out_dir: str, stage: int, inject: bool, param_dtype: str) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig(pattern="M*-", d_model=32, vocab_size=64, max_seq_len=16)
    cfg.mamba.headdim, cfg.mamba.d_state, cfg.mamba.chunk_size, cfg.attention.n_heads = 8, 8, 8, 4
    cfg.validate()
    model = HybridLM(cfg)
    engine = build_engine(model, TrainConfig(max_steps=STEPS, warmup_steps=1, lr=1e-2, global_batch_size=2 * world,
                                             seq_len=16, param_dtype=param_dtype).optimizer(),
                          ParallelConfig(zero_stage=stage, micro_batch_size=2), world)
    poisoned = [False]
    if rank == 1:
        next(engine.module.parameters()).register_hook(lambda g: g * float("nan") if poisoned[0] else g)
    lrs, skipped = [], []
    for i, x, y in batches(rank):
        if i == BAD and not inject:
            continue  # the run that never took the step
        poisoned[0] = inject and i == BAD
        lrs.append(engine.get_lr()[0])
        engine.backward(engine(x, labels=y))
        engine.step()
        skipped.append(engine.skipped_steps)
    weights = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    if param_dtype == "bf16":  # and the fp32 master weights in ZeRO's partitions
        weights |= {f"{n} (master)": safe_get_full_fp32_param(p) for n, p in engine.module.named_parameters()}
    torch.save(weights, f"{out_dir}/weights_{inject}_{rank}.pt")
    return {"lrs": lrs, "skipped": skipped, "finite": parameters_finite(engine)}


def worker(rank, world, out_dir, stage, param_dtype):
    write_result(out_dir, rank, {"skip": run(rank, world, out_dir, stage, True, param_dtype),
                                 "never": run(rank, world, out_dir, stage, False, param_dtype)})


@pytest.mark.parametrize("stage,param_dtype", [(0, "fp32"), (2, "fp32"), (1, "bf16"), (3, "bf16")])
def test_a_non_finite_gradient_on_one_rank_is_skipped_by_all(tmp_path, stage, param_dtype):
    """At ZeRO 0 through GuardedAdamW, at ZeRO 1-2 through ZeRO's own overflow check (with bf16
    parameters too: DeepSpeed's bf16 check_grad_overflow, parallel/engine/build.py bf16_params_section)."""
    spawn(worker, 2, str(tmp_path), stage, param_dtype)
    for rank, result in enumerate(read_results(tmp_path, 2)):
        skip, never = result["skip"], result["never"]
        assert skip["skipped"] == [0, 0, 1, 1, 1], "the poisoned step, and only it, is counted"
        assert skip["finite"] and never["finite"]
        # the skipped step's LR is the next step's: the schedule did not move
        assert skip["lrs"][BAD] == skip["lrs"][BAD + 1] == never["lrs"][BAD]
        got = torch.load(tmp_path / f"weights_True_{rank}.pt")
        want = torch.load(tmp_path / f"weights_False_{rank}.pt")
        for name in want:
            assert torch.equal(got[name], want[name]), f"rank {rank} {name}"


def test_a_non_finite_loss_has_a_non_finite_gradient_everywhere():
    w = torch.ones(3, requires_grad=True)
    finite = (w * 2).sum()
    kept = poison_non_finite(finite)
    kept.backward()
    assert kept.item() == finite.item() and torch.equal(w.grad, torch.full((3,), 2.0)), "a finite loss is untouched"
    w.grad = None
    # an infinite loss can have a finite gradient (here 1 per element): poisoned, it has none
    inf = (w * 1).sum() + torch.tensor(float("inf"))
    poison_non_finite(inf).backward()
    assert torch.isnan(w.grad).all()


def test_the_spike_guard_judges_against_the_window_and_skips_only_when_asked():
    guard = SpikeGuard(zscore=4.0, window=10, skip=True)
    assert not guard.is_spike(100.0), "too little history to judge"
    for loss in [3.0, 3.1, 2.9, 3.05, 2.95]:
        guard.record(loss, applied=True)
    guard.record(50.0, applied=False)  # a skipped step is not history
    assert guard.zscore_of(3.0) == pytest.approx(0.0, abs=1e-9)
    assert guard.is_spike(4.0) and not guard.is_spike(3.2)
    w = torch.ones(2, requires_grad=True)
    guard.gate((w * 4.0).sum() / 2).backward()
    assert torch.isnan(w.grad).all(), "a skipped spike is poisoned like a non-finite loss"
    logging_only = SpikeGuard(zscore=4.0, window=10, skip=False)
    logging_only.history.extend(guard.history)
    loss = (w * 4.0).sum() / 2
    assert logging_only.is_spike(4.0) and logging_only.gate(loss) is loss
    assert not SpikeGuard(zscore=0.0, window=10, skip=True).is_spike(1e9), "0 is off"
