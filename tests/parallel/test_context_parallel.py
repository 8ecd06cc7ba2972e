"""Context parallelism is exact: cp=2 and cp=4 give the one-process model's logits, loss and
every parameter gradient (averaged over the CP ranks, as data parallelism averages them) to 1e-10
in fp64, for Mamba2 (conv halo, SSD state passing), attention (gathered GQA K/V, RoPE at each
piece's positions) and MLP blocks, with packed documents whose boundaries fall inside a piece,
exactly at a piece boundary, inside a conv's halo, and a document spanning several pieces; with
selective and full recompute. One 4-rank gloo job runs every case (cp=2 as two CP groups side by
side); another cp=2 x tp=2, with and without sequence parallelism."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from strata.model.config import ModelConfig
from strata.model.hybrid import HybridLM
from tests.parallel.dist_helpers import rel_error, spawned_results, with_changes, write_result

TOL = 1e-10
WORLD = 4
BATCH, SEQ, VOCAB = 2, 32, 64
# Row 0: documents start at 11 (inside a piece for cp=2 and cp=4), 16 (a piece boundary for both)
# and 21 (the halo of cp=4's piece at 24 crosses it); row 1: one document from 5 spans every later piece.
RESTARTS = ((11, 16, 21), (5,))


def tiny_config(**changes) -> ModelConfig:
    """d_model 32; Mamba2 with 4 heads in 2 groups (d_conv 4: a halo of 3); 4 query heads on 2 KV heads."""
    cfg = ModelConfig(pattern="M*-M*", d_model=32, vocab_size=VOCAB, max_seq_len=SEQ)
    cfg.mamba.headdim, cfg.mamba.d_state, cfg.mamba.ngroups, cfg.mamba.chunk_size = 16, 8, 2, 4
    cfg.attention.n_heads, cfg.attention.n_kv_heads = 4, 2
    cfg.mlp.d_ff, cfg.mlp.dense_first_layer = 64, False
    return with_changes(cfg, changes)


CASES = {
    "hybrid": (dict(), False),
    "hybrid_packed": (dict(), True),
    "partial_rope_untied_packed": (dict(attention__rope_fraction=0.5, tie_embeddings=False), True),
}


RECOMPUTE = ("selective", "full")
"""Recompute modes run under CP too: the collectives then run again in the backward."""


def packed_positions() -> torch.Tensor:
    rows = []
    for restarts in RESTARTS:
        starts = (0, *restarts, SEQ)
        rows.append(torch.cat([torch.arange(b - a) for a, b in zip(starts, starts[1:])]))
    return torch.stack(rows)


def batch(packed: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels[0, :3] = -100
    labels[1, 20:23] = -100
    return ids, labels, packed_positions() if packed else None


def build_reference(cfg: ModelConfig) -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(cfg).double()


def compare_case(cfg: ModelConfig, packed: bool, ctx, recompute: str = "none") -> dict:
    """Errors of this rank's CP model (its blocks recomputed as `recompute` says) against the
    one-process model."""
    from strata.parallel.context.blocks import context_parallel
    from strata.parallel.engine.parallelize import apply_recompute

    ids, labels, positions = batch(packed)
    ref = build_reference(cfg)
    model = apply_recompute(context_parallel(copy.deepcopy(ref), ctx), [recompute] * cfg.n_blocks)
    ref_logits = ref(ids, position_ids=positions).detach()
    ref_loss = ref(ids, labels=labels, position_ids=positions)
    ref_loss.backward()

    local_positions = None if positions is None else ctx.shard(positions)
    logits = ctx.whole_sequence(model(ctx.shard(ids), position_ids=local_positions).detach())
    loss = model(ctx.shard(ids), labels=ctx.shard(labels), position_ids=local_positions)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g, group=ctx.group)
        g /= ctx.size
    want = dict(ref.named_parameters())
    assert sorted(grads) == sorted(want), "the CP model's parameters are not the model's"
    return {
        "logits": rel_error(logits, ref_logits),
        "loss": rel_error(loss.detach(), ref_loss.detach()),
        "grads": max(rel_error(grads[n], want[n].grad) for n in want),
    }


def equivalence_worker(rank: int, world_size: int, out_dir: str) -> None:
    from strata.parallel.context.pieces import CPContext

    halves = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    groups = {2: halves[rank // 2], 4: dist.group.WORLD}
    results = {}
    for cp, group in groups.items():
        ctx = CPContext.of_group(group)
        for name, (changes, packed) in CASES.items():
            results[f"{name}/cp{cp}"] = compare_case(tiny_config(**changes), packed, ctx)
        for mode in RECOMPUTE:
            results[f"hybrid_packed_{mode}/cp{cp}"] = compare_case(tiny_config(), True, ctx, mode)
    write_result(out_dir, rank, results)


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    return spawned_results(tmp_path_factory, "cp", equivalence_worker, WORLD)


@pytest.mark.parametrize("key", [f"{name}/cp{cp}" for name in [*CASES, *(f"hybrid_packed_{m}" for m in RECOMPUTE)]
                                 for cp in (2, 4)])
def test_context_parallel_matches_one_process(equivalence, key):
    for rank, results in enumerate(equivalence):
        errors = results[key]
        assert max(errors.values()) < TOL, f"rank {rank} {key}: {errors}"


def tensor_parallel_worker(rank: int, world_size: int, out_dir: str) -> None:
    """cp=2 x tp=2 (megatron's groups, ranks tp-cp), with and without sequence parallelism, against
    the same TP model on whole sequences: logits, and each rank's TP shards of the gradients averaged
    over its CP group. (The TP form itself differs from the fp64 model by ~7e-8 in a few gradients:
    tests/parallel/test_tensor_parallel.py holds it to 1e-5 in fp32.)"""
    from strata.parallel.context.blocks import context_parallel
    from strata.parallel.context.pieces import CPContext
    from strata.parallel.tensor.blocks import tensor_parallel
    from strata.parallel.tensor.mappings import TPContext
    from strata.parallel.topology import init_topology

    topo = init_topology(2, 1, cp=2)
    ctx = CPContext(topo.get_context_parallel_group(), topo.cp_rank, topo.cp)
    results = {}
    for sequence_parallel in (False, True):
        tp = TPContext.from_parallel_state(sequence_parallel)
        for name, (changes, packed) in CASES.items():
            ids, labels, positions = batch(packed)
            whole, model = (tensor_parallel(build_fp32(tiny_config(**changes)), tp).double() for _ in range(2))
            model = context_parallel(model, ctx)
            want_logits = whole(ids, position_ids=positions).detach()
            whole(ids, labels=labels, position_ids=positions).backward()
            want = dict(whole.named_parameters())
            local = None if positions is None else ctx.shard(positions)
            logits = ctx.whole_sequence(model(ctx.shard(ids), position_ids=local).detach())
            model(ctx.shard(ids), labels=ctx.shard(labels), position_ids=local).backward()
            grads = {n: p.grad for n, p in model.named_parameters()}
            for g in grads.values():
                dist.all_reduce(g, group=ctx.group)
                g /= ctx.size
            assert sorted(grads) == sorted(want)
            results[f"{name}/cp2_tp2{'_sp' if sequence_parallel else ''}"] = {
                "logits": rel_error(logits, want_logits),
                "grads": max(rel_error(grads[n], want[n].grad) for n in want)}
    write_result(out_dir, rank, results)


def build_fp32(cfg: ModelConfig) -> HybridLM:
    torch.manual_seed(0)
    return HybridLM(cfg)


@pytest.fixture(scope="module")
def with_tensor_parallelism(tmp_path_factory):
    return spawned_results(tmp_path_factory, "cp_tp", tensor_parallel_worker, WORLD)


@pytest.mark.parametrize("key", [f"{name}/cp2_tp2{sp}" for name in CASES for sp in ("", "_sp")])
def test_context_parallel_with_tensor_parallelism_matches_one_process(with_tensor_parallelism, key):
    for rank, results in enumerate(with_tensor_parallelism):
        errors = results[key]
        assert max(errors.values()) < TOL, f"rank {rank} {key}: {errors}"


def test_pieces_balance_the_causal_work():
    """Rank r holds pieces r and 2CP-1-r: every rank's queries see the same number of keys."""
    from strata.parallel.context.pieces import CPContext

    work = []
    for r in range(4):
        queries = CPContext(None, r, 4).query_positions(SEQ)
        work.append(int((queries + 1).sum()))
        assert sorted(CPContext(None, r, 4).shard(torch.arange(SEQ)[None])[0].tolist()) == sorted(queries.tolist())
    assert len(set(work)) == 1


@pytest.mark.parametrize("layout, message", [
    (dict(tp=4, pp=1, world_size=8, cp=2, seq_len=12, sequence_parallel=True),
     "train.seq_len / cp=2 (sequence parallel)=6 is not divisible by tp=4"),
    (dict(tp=1, pp=1, world_size=2, cp=2, seq_len=30), "train.seq_len=30 is not divisible by 2 x cp = 4"),
    (dict(tp=1, pp=1, world_size=8, cp=4, seq_len=16), "pieces of 2 tokens with cp=4, fewer than the conv's 3"),
    (dict(tp=1, pp=1, world_size=6, cp=4, seq_len=32), "world size 6 is not divisible by tp*cp*pp=4"),
])
def test_layouts_context_parallelism_cannot_run_fail_in_one_line(layout, message):
    from strata.parallel.layout import LayoutError, check_layout

    with pytest.raises(LayoutError) as e:
        check_layout(tiny_config(), **layout)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_layout_record_knows_cp_and_a_cp_checkpoint_reloads_with_another_cp():
    """CP shards no parameter: same TP, PP, ZeRO and world size reload DeepSpeed's files as written."""
    from strata.parallel.layout import Layout, check_layout

    checked = check_layout(tiny_config(), 1, 1, 4, seq_len=SEQ, cp=2)
    assert (checked.dp, checked.cp, checked.world_size, str(checked)) == (2, 2, 4, "tp=1 cp=2 pp=1 dp=2")
    layout = Layout(1, 1, 2, zero_stage=1, cp=2)
    assert Layout.from_record(layout.record()) == layout
    assert Layout.from_record({"world_size": 4, "tp": 1, "pp": 1}).cp == 1  # records before cp
    assert Layout(1, 1, 4, 1).reloads_as_written(layout)
    assert not Layout(1, 1, 2, 1).reloads_as_written(layout)


def test_a_sequence_that_does_not_divide_into_pieces_is_refused():
    from strata.parallel.context.pieces import CPContext

    with pytest.raises(ValueError, match="multiple of 8"):
        CPContext(None, 0, 4).piece_length(36)


TRITON_CASES = {"mamba_packed/triton": True}


def triton_worker(rank: int, world_size: int, out_dir: str) -> None:
    """The Triton SSD and conv (under the interpreter, fp32): the pieces' final states and the
    gradient into them. fp32 rounds differently over pieces than over the whole sequence (sums
    such as A_log's gradient differ by ~1e-6 relative), so both runs are measured against the
    fp64 reference: CP's error may not exceed one process's by more than rounding's share."""
    import os

    os.environ["TRITON_INTERPRET"] = "1"
    from strata.parallel.context.blocks import context_parallel
    from strata.parallel.context.pieces import CPContext

    ctx = CPContext.of_group(dist.group.WORLD)
    results = {}
    for name, packed in TRITON_CASES.items():
        ids, labels, positions = (None if t is None else t[:1, :16] for t in batch(packed))
        truth = gradients(build_reference(tiny_config(pattern="M")), "reference", ids, labels, positions)
        torch.manual_seed(0)
        one = HybridLM(tiny_config(pattern="M"))
        cp_model = context_parallel(copy.deepcopy(one), ctx)
        whole = gradients(one, "triton", ids, labels, positions)
        local = None if positions is None else ctx.shard(positions)
        pieces = gradients(cp_model, "triton", ctx.shard(ids), ctx.shard(labels), local)
        for g in pieces.values():
            dist.all_reduce(g, group=ctx.group)
            g /= ctx.size
        results[name] = {n: (rel_error(pieces[n], truth[n]), rel_error(whole[n], truth[n])) for n in truth}
    write_result(out_dir, rank, results)


def gradients(model, kernels: str, ids, labels, positions) -> dict:
    """The loss (as "loss") and every parameter's gradient, in fp64 for comparing, on these kernels."""
    import os

    os.environ["STRATA_KERNELS"] = kernels
    loss = model(ids, labels=labels, position_ids=positions)
    loss.backward()
    return {"loss": loss.detach().double(), **{n: p.grad.double() for n, p in model.named_parameters()}}


@pytest.fixture(scope="module")
def triton_equivalence(tmp_path_factory):
    pytest.importorskip("triton")
    return spawned_results(tmp_path_factory, "cp_triton", triton_worker, 2)


@pytest.mark.parametrize("key", list(TRITON_CASES))
def test_context_parallel_with_the_triton_kernels(triton_equivalence, key):
    for rank, results in enumerate(triton_equivalence):
        for name, (pieces, whole) in results[key].items():
            assert whole < 1e-5, f"rank {rank} {key} {name}: one process's fp32 error {whole}"
            assert pieces < 2 * whole + 1e-6, f"rank {rank} {key} {name}: CP {pieces} vs one process {whole}"


def test_the_plan_counts_a_ranks_pieces_the_gathered_kv_and_zero_over_cp():
    """Under cp=4 a rank's Mamba2 and MLP activations are those of seq_len / 4 tokens; attention's add
    the other ranks' K/V and SDPA's mask; ZeRO-3 partitions over dp x cp ranks."""
    from strata.model.config import ATTENTION_BLOCK, MAMBA_BLOCK, MLP_BLOCK
    from strata.parallel.layout import Layout
    from strata.parallel.plan import RunSpec, context_parallel_bytes, plan_layout

    cfg = tiny_config()
    spec = RunSpec(cfg, seq_len=SEQ, global_batch=8, micro_batch=1, zero_stage=3)
    cp4 = plan_layout(spec, Layout(1, 1, 2, 3, cp=4))
    quarter = plan_layout(RunSpec(cfg, seq_len=SEQ // 4, global_batch=8, micro_batch=1, zero_stage=3),
                          Layout(1, 1, 8, 3))
    assert cp4.layout.cp == 4 and not cp4.problems
    for kind in (MAMBA_BLOCK, MLP_BLOCK):
        assert cp4.activations_by_kind[kind] == quarter.activations_by_kind[kind]
    head_dim, blocks = cfg.attention.resolved_head_dim(cfg.d_model), cfg.pattern.count(ATTENTION_BLOCK)
    kv = 2 * (SEQ - SEQ // 4) * cfg.attention.n_heads * head_dim * spec.act_bytes
    mask = SEQ // 4 * SEQ
    extra = cp4.activations_by_kind[ATTENTION_BLOCK] - quarter.activations_by_kind[ATTENTION_BLOCK]
    assert extra == blocks * (kv + mask)
    assert cp4.terms["weights (fp32)"] == quarter.terms["weights (fp32)"]
    sent = context_parallel_bytes(cfg, 1, SEQ, 4, 4)
    m = cfg.mamba
    state = m.nheads(cfg.d_model) * (m.headdim * m.d_state + 1) * 4
    assert sent[MAMBA_BLOCK] == 3 * 2 * (state + (m.d_conv - 1) * m.conv_dim(cfg.d_model) * 4)
    assert sent[ATTENTION_BLOCK] == 3 * SEQ // 4 * 2 * cfg.attention.n_kv_heads * head_dim * 4


def test_strata_plan_finds_the_longest_sequence_a_layout_fits():
    """--longest-sequence's search: the length it reports fits, one step (1024 tokens here) more does not."""
    import dataclasses

    from strata.launcher.plan import longest_sequence
    from strata.parallel.layout import Layout
    from strata.parallel.plan import Hardware, RunSpec, plan_layout

    spec = RunSpec(tiny_config(), seq_len=1024, global_batch=8, micro_batch=1)
    layout = Layout(1, 1, 2, cp=2)
    memory = 3 * plan_layout(spec, layout).peak
    hardware = Hardware(gpu_memory=memory)
    longest = longest_sequence(plan_layout(spec, layout, hardware), memory, hardware)

    def peak(seq_len: int) -> float:
        return plan_layout(dataclasses.replace(spec, seq_len=seq_len), layout, hardware).peak

    assert longest > spec.seq_len and peak(longest) <= memory < peak(longest + 1024)
