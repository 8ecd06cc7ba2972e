"""TP x PP x DP composed: 8 gloo ranks train 5 steps with the losses of one process on the
same global batch (1e-4 relative), under ZeRO 0 and 1 with the pipeline engine, with and
without sequence parallelism, and TP x DP under ZeRO 2 and 3 with the plain engine; bad
layouts fail with one line before any process group exists."""
from __future__ import annotations

import pytest

from strata.parallel.layout import LayoutError, check_layout
from tests.parallel.dist_helpers import rel_error, spawned_results, write_result
from tests.parallel.train_helpers import (build_model, compare_to_reference, layout_training, reference_training,
                                          train_config)

STEPS, WORLD, TOL = 5, 8, 1e-4
RUNS = {  # name: (tp, pp, zero stage, sequence parallel)
    "tp2_pp2_dp2": (2, 2, 0, False),
    "tp2_pp2_dp2_zero1": (2, 2, 1, False),
    "tp2_pp2_dp2_zero1_sp": (2, 2, 1, True),
    "tp2_dp4_zero2": (2, 1, 2, False),
    "tp2_dp4_zero3_sp": (2, 1, 3, True),
}


def composed_worker(rank: int, world_size: int, out_dir: str) -> None:
    cfg = train_config()
    ref = reference_training(cfg, STEPS)
    results = {"want": ref["losses"]}
    for name, (tp, pp, zero, sp) in RUNS.items():
        run = layout_training(cfg, tp, pp, zero, STEPS, sequence_parallel=sp)
        full = build_model(cfg)
        results[name] = compare_to_reference(run, ref, full, rel_error)
    write_result(out_dir, rank, results)


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    return spawned_results(tmp_path_factory, "3d", composed_worker, WORLD)


@pytest.mark.parametrize("name", list(RUNS))
def test_layout_trains_like_one_process(composed, name):
    for rank, results in enumerate(composed):
        r = results[name]
        assert r["losses"] == pytest.approx(results["want"], rel=TOL), f"rank {rank}: {r['losses']} != {results['want']}"
        assert r["grads"] < TOL and r["params"] < TOL, f"rank {rank}: gradients {r['grads']:.1e}, parameters {r['params']:.1e}"


def test_sequence_parallel_gives_the_same_losses(composed):
    on, off = composed[0]["tp2_pp2_dp2_zero1_sp"]["losses"], composed[0]["tp2_pp2_dp2_zero1"]["losses"]
    assert on == pytest.approx(off, rel=1e-5)


BAD_LAYOUTS = {  # (tp, pp, world, zero): what the one line must name
    (4, 1, 8, 0): "mamba.ngroups=2 is not divisible by tp=4",
    (2, 1, 6, 0): None,  # valid: tp=2 dp=3
    (3, 1, 6, 0): "attention.n_heads=4 is not divisible by tp=3",
    (2, 2, 6, 0): "world size 6 is not divisible by tp*pp=4",
    (1, 8, 8, 0): "pp=8 is more stages than the 6 blocks",
    (1, 2, 8, 2): "supports ZeRO stage 0 or 1 only",
}


@pytest.mark.parametrize("layout", list(BAD_LAYOUTS))
def test_bad_layouts_fail_with_one_line_naming_the_problem(layout):
    tp, pp, world, zero = layout
    expected = BAD_LAYOUTS[layout]
    if expected is None:
        assert check_layout(train_config(), tp, pp, world, zero_stage=zero).dp == world // (tp * pp)
        return
    with pytest.raises(LayoutError) as err:
        check_layout(train_config(), tp, pp, world, zero_stage=zero)
    message = str(err.value)
    assert "\n" not in message and expected in message and "nearest valid layouts: tp=" in message


def test_vocabulary_and_structured_splits_are_checked():
    cfg = train_config(vocab_size=130)
    with pytest.raises(LayoutError, match="vocab size=130 is not divisible by tp=4"):
        check_layout(cfg, 4, 1, 4, vocab_size=cfg.vocab_size)
    cfg = train_config()
    cfg.mlp.structure, cfg.mlp.nblocks, cfg.mlp.dense_first_layer = "blockshuffle", 2, False
    with pytest.raises(LayoutError, match="mlp.nblocks=2 is not divisible by tp=4"):
        check_layout(cfg, 4, 1, 4)

