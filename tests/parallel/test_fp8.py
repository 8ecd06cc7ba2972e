"""FP8 training (train.fp8) under every layout trains like one process with train.fp8: TP2 with
sequence parallelism (with full recompute), PP2 and ZeRO-3 over 2 ranks with every parameter
partitioned, to the tolerances of the fp32 layout tests (train_helpers: LOSS_TOL, TENSOR_TOL). The
model holds every block kind, its Mamba2 in_proj sized for FP8 on either TP rank, and self-guided
LowRank MLPs; the first and last blocks stay bf16 (train.fp8_keep_bf16=1). Only the TP ranks'
shared scales (kernels/fp8/scaled.py) make TP equal: test_split_products_equal_the_whole_products
holds each split's three products to float32 rounding, and shows them further off with each shard's
own scales. One 2-rank gloo job runs everything."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from strata.kernels.fp8.scaled import IN, OUT, TOKENS, fp8_linear
from strata.launcher.config import TrainConfig
from strata.model.config import ModelConfig
from strata.parallel.engine.parallelize import fp8_linears
from tests.parallel.dist_helpers import rel_error, spawned_results, write_result
from tests.parallel.train_helpers import (assert_trains_like_reference, build_model, compare_to_reference,
                                          layout_training, reference_training, train_config)

STEPS, WORLD = 2, 2
LAYOUTS = {  # name: (recipe, tp, pp, zero stage, sequence parallel, recompute); the TP engines last
    "zero3/tensorwise": ("tensorwise", 1, 1, 3, False, "none"),  # (DeepSpeed keeps its model-parallel groups)
    "pp2/rowwise": ("rowwise", 1, 2, 0, False, "none"),
    "tp2_sp/rowwise": ("rowwise", 2, 1, 0, True, "full"),
    "tp2_sp/tensorwise": ("tensorwise", 2, 1, 0, True, "none"),
}
ROUNDING_CROSSED = {"tp2_sp/tensorwise"}
"""Layouts whose parameters after STEPS are not compared: in their second step a float32 summation-order
difference (1e-7) carries one scaled value across an FP8 rounding midpoint, an FP8 step (up to 1/8 of
the value) apart, which SGD at lr 0.5 spreads to 3e-4. Losses and first-step gradients still meet the
tolerances; with each shard's own scales the first-step gradients part by about 0.2."""
ZERO3_PARTITION_ALL = {"stage3_param_persistence_threshold": 0}


def fp8_config() -> ModelConfig:
    """train_config's six blocks (M*-M*-) with 32 Mamba2 heads of 4 (in_proj 352 wide, 176 per TP
    rank: multiples of 16); the second MLP LowRank (rank 16) and self-guided."""
    cfg = train_config()
    cfg.mamba.headdim = 4
    cfg.mlp.structure, cfg.mlp.rank, cfg.mlp.self_guided, cfg.mlp.dense_first_layer = "lowrank", 16, True, False
    cfg.validate()
    return cfg


def fp8_held(module) -> int:
    """This rank's linears set to run FP8."""
    return sum(m.fp8_recipe is not None for _, m in fp8_linears(module))


def split_product_errors(rank: int, recipe: str, split: str, shared_scales: bool) -> float:
    """Largest error (relative to the largest value) of output, input and weight gradients of one
    FP8 linear split over 2 ranks as `split` says, against the whole linear's on one process."""
    g = torch.Generator().manual_seed(7)
    x, w, dy = torch.randn(32, 64, generator=g), torch.randn(48, 64, generator=g), torch.randn(32, 48, generator=g)
    x[3, 5], dy[20, 40] = 3e3, -3e3  # the maxima on one rank only, wherever a split puts them
    whole = [x.clone().requires_grad_(), w.clone().requires_grad_()]
    y_whole = fp8_linear(*whole, None, recipe)
    y_whole.backward(dy)
    dx_whole, dw_whole = whole[0].grad, whole[1].grad
    tokens, inputs, outputs = (slice(n * rank, n * (rank + 1)) for n in (16, 32, 24))
    mine = {OUT: (x, w[outputs], dy[:, outputs]), IN: (x[:, inputs], w[:, inputs], dy),
            TOKENS: (x[tokens], w, dy[tokens])}[split]
    xs, ws = (t.clone().requires_grad_() for t in mine[:2])
    y = fp8_linear(xs, ws, None, recipe, dist.group.WORLD if shared_scales else None, split)
    y.backward(mine[2])
    y, dx, dw = y.detach(), xs.grad, ws.grad
    for partial in {OUT: [dx], IN: [y], TOKENS: [dw]}[split]:  # the sums the layout's collectives make
        dist.all_reduce(partial)
    want = {OUT: (y_whole[:, outputs], dx_whole, dw_whole[outputs]),
            IN: (y_whole, dx_whole[:, inputs], dw_whole[:, inputs]),
            TOKENS: (y_whole[tokens], dx_whole[tokens], dw_whole)}[split]
    return max(rel_error(got, expected.detach()) for got, expected in zip((y, dx, dw), want))


def fp8_worker(rank: int, world_size: int, out_dir: str) -> None:
    cfg = fp8_config()
    references, results = {}, {}
    for name, (recipe, tp, pp, zero, sp, recompute) in LAYOUTS.items():
        plan = TrainConfig(fp8=recipe, fp8_keep_bf16=1).block_fp8(len(cfg.pattern))
        if recipe not in references:
            references[recipe] = reference_training(cfg, STEPS, fp8=plan)
        run = layout_training(cfg, tp, pp, zero, STEPS, sequence_parallel=sp, fp8=plan,
                              recompute=TrainConfig(recompute=recompute).block_recompute(cfg.blocks()),
                              zero=ZERO3_PARTITION_ALL if zero == 3 else None)
        results[name] = {**compare_to_reference(run, references[recipe], build_model(cfg), rel_error),
                         "fp8_linears": fp8_held(run["module"])}
    for recipe in ("tensorwise", "rowwise"):
        for split in (OUT, IN, TOKENS):
            for shared in (True, False):
                results[f"{recipe}/{split}/{shared}"] = split_product_errors(rank, recipe, split, shared)
    write_result(out_dir, rank, results)


@pytest.fixture(scope="module")
def fp8_results(tmp_path_factory):
    return spawned_results(tmp_path_factory, "fp8", fp8_worker, WORLD)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_fp8_layout_trains_like_one_process_with_fp8(fp8_results, name):
    held = [results[name]["fp8_linears"] for results in fp8_results]
    assert all(held), f"linears in FP8, per rank: {held}"
    if name in ROUNDING_CROSSED:
        for results in fp8_results:
            results[name]["params"] = 0.0
    assert_trains_like_reference(fp8_results, name, STEPS)


SPLIT_TOLERANCES = {"tensorwise": (1e-6, 1e-2), "rowwise": (1e-7, 2e-7)}
"""(at most with the group's scales, at least with each shard's own). Rowwise scales are powers of two,
so a shard's own scale changes a value's FP8 rounding only where it falls to FP8's subnormals: 3e-7 to
3e-6 here (a maximum of 3e3 among values of about 1), against 6e-8 with the group's scales."""


@pytest.mark.parametrize("split", [OUT, IN, TOKENS])
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_split_products_equal_the_whole_products(fp8_results, recipe, split):
    """Output, input and weight gradient of a linear split by output features (column), input
    features (row) or tokens (SP), against the whole one's: float32 rounding apart with the TP
    group's scales, further with each shard's own."""
    shared_at_most, own_at_least = SPLIT_TOLERANCES[recipe]
    for results in fp8_results:
        assert results[f"{recipe}/{split}/True"] < shared_at_most, results[f"{recipe}/{split}/True"]
    own = max(results[f"{recipe}/{split}/False"] for results in fp8_results)  # the rank without the maxima
    assert own > own_at_least, f"the test cannot tell the scales apart: {own:.1e}"
