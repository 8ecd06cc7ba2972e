"""Activation recompute is exact under every layout: TP2 with sequence parallelism, PP2
(DeepSpeed's pipeline engine, positions restarting mid-sequence), ZeRO-2 (gradients reduced by
hooks as they are made, some of them inside a region's backward) and ZeRO-3 over 2 ranks with
every parameter partitioned train 2 steps with the losses, first-step gradients and parameters
of the same layout without recompute (bitwise, or 1e-7 relative). The model holds every block
kind, a dense MLP and a self-guided LowRank MLP half-way through its guided phase. One 2-rank
gloo job runs every layout; the assertions read its results."""
from __future__ import annotations

import pytest
import torch

from strata.launcher.config import TrainConfig
from strata.model.config import ModelConfig
from strata.model.hybrid import Block
from tests.parallel.dist_helpers import spawned_results, write_result
from tests.parallel.train_helpers import layout_training, train_config

STEPS, WORLD = 2, 2
LAYOUTS = {  # name: (tp, pp, zero stage, sequence parallel, positions); the TP engine last (DeepSpeed
    "zero3": (1, 1, 3, False, False),       # keeps its model-parallel groups for the engines after it)
    "zero2": (1, 1, 2, False, False),
    "pp2": (1, 2, 0, False, True),
    "tp2_sp": (2, 1, 0, True, False),
}
MODES = {  # train.recompute settings; their mixtures per block are tested on one process (tests/model)
    "selective": TrainConfig(recompute="selective"),
    "full": TrainConfig(recompute="full"),
}
ZERO3_PARTITION_ALL = {"stage3_param_persistence_threshold": 0}  # else these small parameters stay whole


def recompute_config() -> ModelConfig:
    """train_config's six blocks (M*-M*-); the second MLP LowRank and self-guided."""
    cfg = train_config()
    cfg.mlp.structure, cfg.mlp.rank, cfg.mlp.self_guided = "lowrank", 16, True
    cfg.validate()
    return cfg


def max_difference(got: dict, want: dict) -> float:
    """Over every tensor: 0 when bitwise equal, else max |got - want| / max |want|."""
    assert sorted(got) == sorted(want)
    worst = 0.0
    for n in want:
        if not torch.equal(got[n], want[n]):
            worst = max(worst, ((got[n] - want[n]).abs().max() / want[n].abs().max().clamp_min(1e-30)).item())
    return worst


def recomputed_blocks(module) -> int:
    """Blocks of this rank that recompute something (a mixer's core or the whole block)."""
    return sum(b.recompute or b.mixer.recompute_core for b in module.modules() if isinstance(b, Block))


def recompute_worker(rank: int, world_size: int, out_dir: str) -> None:
    cfg = recompute_config()
    results = {}
    for name, (tp, pp, zero, sp, positions) in LAYOUTS.items():
        options = dict(sequence_parallel=sp, positions=positions, zero=ZERO3_PARTITION_ALL if zero == 3 else None)
        want = layout_training(cfg, tp, pp, zero, STEPS, **options)
        for mode, train in MODES.items():
            plan = train.block_recompute(cfg.blocks())
            run = layout_training(cfg, tp, pp, zero, STEPS, recompute=plan, **options)
            results[f"{name}/{mode}"] = {
                "recomputed": recomputed_blocks(run["module"]), "losses": run["losses"], "want": want["losses"],
                "grads": max_difference(run["grads"], want["grads"]) if want["grads"] else 0.0,
                "params": max_difference(run["params"], want["params"]),
            }
    write_result(out_dir, rank, results)


@pytest.fixture(scope="module")
def recompute_results(tmp_path_factory):
    return spawned_results(tmp_path_factory, "recompute", recompute_worker, WORLD)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_recompute_trains_like_no_recompute(recompute_results, layout, mode):
    held = [results[f"{layout}/{mode}"]["recomputed"] for results in recompute_results]
    assert (sum(held) if layout == "pp2" else min(held)) == 6, f"blocks set to recompute, per rank: {held}"
    for rank, results in enumerate(recompute_results):
        r = results[f"{layout}/{mode}"]
        assert r["losses"] == pytest.approx(r["want"], rel=1e-7, abs=0), f"rank {rank}: {r['losses']} != {r['want']}"
        assert r["grads"] <= 1e-7 and r["params"] <= 1e-7, f"rank {rank}: {r}"
