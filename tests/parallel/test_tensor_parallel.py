"""Tensor parallelism is exact: for each block kind and each MLP kind, TP=2 and TP=4 give
the logits, loss and gradients of the TP=1 model (gathered with gather_state_dicts) to
1e-5 relative, with and without sequence parallelism. One 4-rank gloo job runs every case
(TP=2 as two TP groups side by side); the per-case assertions read its results."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from strata.model.config import ModelConfig
from strata.model.hybrid import HybridLM
from strata.model.structured import structured_linears
from strata.parallel.tensor.splits import gather_state_dicts, parameter_splits, shard_state_dict
from tests.parallel.dist_helpers import rel_error, spawned_results, with_changes, write_result

TOL = 1e-5
WORLD = 4
BATCH, SEQ, VOCAB = 2, 16, 128


def tiny_config(**changes) -> ModelConfig:
    """d_model 64; Mamba2 with 8 heads in 4 groups; 8 query heads; MLP width 128."""
    cfg = ModelConfig(pattern="M*-", d_model=64, vocab_size=VOCAB, max_seq_len=SEQ)
    cfg.mamba.headdim, cfg.mamba.d_state, cfg.mamba.ngroups, cfg.mamba.chunk_size = 16, 16, 4, 8
    cfg.attention.n_heads, cfg.attention.n_kv_heads = 8, 4
    cfg.mlp.d_ff, cfg.mlp.dense_first_layer = 128, False
    return with_changes(cfg, changes)


CASES = {
    "mamba": dict(pattern="MM"),
    "mamba_biases_untied": dict(pattern="M", mamba__proj_bias=True, tie_embeddings=False),
    "attention_kv_split": dict(pattern="**"),
    "attention_kv_replicated": dict(pattern="**", attention__n_kv_heads=1, attention__qkv_bias=True),
    "attention_kv_2": dict(pattern="*", attention__n_kv_heads=2, attention__rope=False),
    "attention_partial_rope": dict(pattern="**", attention__rope_fraction=0.5, attention__rope_theta=500.0),
    "mlp_swiglu": dict(pattern="--", mlp__bias=True),
    "mlp_relu2": dict(pattern="-", mlp__activation="relu2"),
    "mlp_lowrank": dict(pattern="-", mlp__structure="lowrank", mlp__rank=24, mlp__bias=True),
    "mlp_blockdense": dict(pattern="-", mlp__structure="blockdense", mlp__rank=32, mlp__nblocks=4),
    "mlp_blockshuffle": dict(pattern="-", mlp__structure="blockshuffle", mlp__nblocks=4, mlp__bias=True),
    "mlp_lowrank_guided": dict(pattern="-", mlp__structure="lowrank", mlp__rank=24, mlp__self_guided=True),
    "mlp_blockdense_guided": dict(pattern="-", mlp__structure="blockdense", mlp__rank=32, mlp__nblocks=4,
                                  mlp__self_guided=True, mlp__activation="relu2"),
    "mlp_blockshuffle_guided": dict(pattern="-", mlp__structure="blockshuffle", mlp__nblocks=4,
                                    mlp__self_guided=True),
    "hybrid": dict(pattern="M*-M-"),
}
# Under SP the replicated parameters outside the regions (norms, row biases, LowRank's and
# BlockDense's replicated factors) see 1/tp of the tokens: these cases hold all of them.
SEQUENCE_PARALLEL_CASES = ("hybrid", "mamba_biases_untied", "attention_kv_replicated", "attention_partial_rope",
                           "mlp_lowrank_guided", "mlp_blockdense_guided", "mlp_blockshuffle_guided")


def build_reference(cfg: ModelConfig) -> HybridLM:
    torch.manual_seed(0)
    model = HybridLM(cfg)
    for m in structured_linears(model):  # a guided phase half-way: both paths count
        m.guide_alpha = 0.3
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels[0, :3] = -100
    return ids, labels


def compare_case(cfg: ModelConfig, tp: int, sequence_parallel: bool) -> dict:
    """Errors of this rank's TP model against the TP=1 model it was sharded from."""
    from strata.parallel.tensor.blocks import tensor_parallel
    from strata.parallel.tensor.mappings import TPContext

    ids, labels = batch()
    ref = build_reference(cfg)
    ref_logits = ref(ids).detach()
    ref_loss = ref(ids, labels=labels)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    splits = parameter_splits(ref, tp)

    ctx = TPContext.from_parallel_state(sequence_parallel)
    model = tensor_parallel(build_reference(cfg), ctx)
    logits = model(ids).detach()
    loss = model(ids, labels=labels)
    loss.backward()
    local_grads = {n: p.grad for n, p in model.named_parameters()}
    want_local = shard_state_dict(ref_grads, splits, ctx.rank, ctx.size)
    assert sorted(local_grads) == sorted(want_local), "TP model's parameters differ from the shards"

    pieces = [None] * ctx.size
    dist.all_gather_object(pieces, local_grads, group=ctx.group)
    gathered = gather_state_dicts(pieces, splits)
    return {
        "logits": rel_error(logits, ref_logits),
        "loss": rel_error(loss.detach(), ref_loss.detach()),
        "local_grads": max(rel_error(local_grads[n], want_local[n], ref_grads[n]) for n in want_local),
        "gathered_grads": max(rel_error(gathered[n], ref_grads[n]) for n in ref_grads),
    }


def equivalence_worker(rank: int, world_size: int, out_dir: str) -> None:
    from strata.parallel.topology import init_topology

    results = {}
    for tp in (2, 4):
        init_topology(tp, 1)
        for name, changes in CASES.items():
            results[f"{name}/tp{tp}"] = compare_case(tiny_config(**changes), tp, False)
        for name in SEQUENCE_PARALLEL_CASES:
            results[f"{name}/tp{tp}/sp"] = compare_case(tiny_config(**CASES[name]), tp, True)
    write_result(out_dir, rank, results)


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    return spawned_results(tmp_path_factory, "tp", equivalence_worker, WORLD)


KEYS = [f"{name}/tp{tp}" for name in CASES for tp in (2, 4)]
KEYS += [f"{name}/tp{tp}/sp" for name in SEQUENCE_PARALLEL_CASES for tp in (2, 4)]


@pytest.mark.parametrize("key", KEYS)
def test_tensor_parallel_matches_one_process(equivalence, key):
    for rank, results in enumerate(equivalence):
        errors = results[key]
        assert max(errors.values()) < TOL, f"rank {rank} {key}: {errors}"


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("tp", [2, 4])
def test_shard_then_gather_is_the_identity(name, tp):
    model = build_reference(tiny_config(**CASES[name]))
    full = model.state_dict()
    splits = parameter_splits(model, tp)
    pieces = [shard_state_dict(full, splits, r, tp) for r in range(tp)]
    back = gather_state_dicts(pieces, splits)
    assert sorted(back) == sorted(full)
    for k in full:
        assert torch.equal(back[k], full[k]), k
    split_names = [n for n, rule in splits.items() if rule.dim is not None]
    assert split_names, "nothing was split"
    for n in split_names:  # split parameters really are partitioned
        assert sum(p[n].numel() for p in pieces) == full[n].numel(), n

