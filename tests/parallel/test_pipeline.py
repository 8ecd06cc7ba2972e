"""Pipeline parallelism is exact: PP=2 and PP=4 (DeepSpeed's 1F1B engine, gloo on CPU)
give the losses, clipped gradients and parameters of one process over 5 steps; the stages
are balanced by FLOPs. One 4-rank job runs every layout; the assertions read its results."""
from __future__ import annotations

import itertools

import pytest

from strata.model.config import ModelConfig
from strata.parallel.pipeline.stages import layer_costs, layer_prefix, model_parameter_name, stage_bounds
from tests.parallel.dist_helpers import rel_error, spawned_results, write_result
from tests.parallel.train_helpers import (assert_trains_like_reference, build_model, compare_to_reference,
                                          layout_training, reference_training, train_config)

STEPS, WORLD = 5, 4
RUNS = {  # name: (pp, zero stage, model changes, position ids restarting mid-sequence)
    "pp2_dp2": (2, 0, {}, False),
    "pp4": (4, 0, {}, False),
    "pp4_untied_positions": (4, 0, {"tie_embeddings": False}, True),
    "pp2_dp2_zero1": (2, 1, {}, False),
}


def pipeline_worker(rank: int, world_size: int, out_dir: str) -> None:
    results, references = {}, {}
    for name, (pp, zero, changes, positions) in RUNS.items():
        cfg = train_config(**changes)
        key = (tuple(sorted(changes.items())), positions)
        if key not in references:
            references[key] = reference_training(cfg, STEPS, positions)
        ref = references[key]
        run = layout_training(cfg, 1, pp, zero, STEPS, positions=positions)
        full = build_model(cfg)
        results[name] = compare_to_reference(run, ref, full, rel_error)
    write_result(out_dir, rank, results)


@pytest.fixture(scope="module")
def pipeline_results(tmp_path_factory):
    return spawned_results(tmp_path_factory, "pp", pipeline_worker, WORLD)


@pytest.mark.parametrize("name", list(RUNS))
def test_pipeline_matches_one_process(pipeline_results, name):
    assert_trains_like_reference(pipeline_results, name, STEPS)


def brute_force_bounds(costs: list[float], pp: int) -> float:
    """The smallest possible costliest stage over every contiguous split into pp stages."""
    best = float("inf")
    for cuts in itertools.combinations(range(1, len(costs)), pp - 1):
        edges = (0, *cuts, len(costs))
        best = min(best, max(sum(costs[a:b]) for a, b in zip(edges, edges[1:])))
    return best


@pytest.mark.parametrize("pattern", ["M*-M*-", "MMMM****----", "-*-*-M", "MM*"])
@pytest.mark.parametrize("pp", [2, 3, 4])
def test_stages_are_balanced_by_flops(pattern, pp):
    cfg = ModelConfig(pattern=pattern, d_model=256, vocab_size=4096)
    cfg.validate()
    costs = layer_costs(cfg, seq_len=2048)
    bounds = stage_bounds(cfg, 2048, pp)
    assert bounds[0] == 0 and bounds[-1] == len(costs) == len(pattern) + 3
    assert all(a < b for a, b in zip(bounds, bounds[1:])), f"an empty stage: {bounds}"
    heaviest = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
    assert heaviest == pytest.approx(brute_force_bounds(costs, pp))


def test_block_kinds_cost_differently():
    cfg = ModelConfig(pattern="M*-", d_model=512, vocab_size=4096)
    costs = layer_costs(cfg, seq_len=4096)
    assert len({costs[1], costs[2], costs[3]}) == 3
    assert costs[-1] == 2 * 512 * 4096  # the LM head


def test_pipeline_names_map_back_to_the_model():
    n = len("M*-")
    assert model_parameter_name("tied_modules.embed.embed.weight", n) == "embed.weight"
    assert model_parameter_name("0.embed.weight", n) == "embed.weight"
    assert model_parameter_name("2.mixer.q_proj.weight", n) == "blocks.1.mixer.q_proj.weight"
    assert model_parameter_name(f"{n + 1}.weight", n) == "final_norm.weight"
    assert model_parameter_name(f"{n + 2}.lm_head.weight", n) == "lm_head.weight"
    assert layer_prefix(1, n) == "blocks.0."
