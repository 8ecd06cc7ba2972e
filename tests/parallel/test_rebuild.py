"""Dropping self-guided training's dense paths mid-run: the rebuilt DeepSpeed engine holds
no state for them, leaves them out of its checkpoints, and trains every other parameter
exactly as the old engine would have."""
import pytest
import torch
from deepspeed.utils import safe_get_full_fp32_param

from strata.launcher.config import TrainConfig
from strata.model.config import MLPConfig, ModelConfig
from strata.model.guidance import SelfGuidance
from strata.model.hybrid import HybridLM
from strata.parallel.checkpoint.rebuild import rebuild_engine
from strata.parallel.config import ParallelConfig
from strata.parallel.engine.build import build_engine


def train(stage: int, drop: bool, steps=8, guided_until=4, param_dtype="fp32"):
    cfg = ModelConfig(pattern="-*-", d_model=32, vocab_size=50, max_seq_len=32,
                      mlp=MLPConfig(activation="relu2", structure="lowrank", rank=4, self_guided=True,
                                    dense_first_layer=False, guide_stochastic=False))
    cfg.attention.n_heads = 4
    cfg.validate()
    tr = TrainConfig(max_steps=steps, warmup_steps=2, lr=1e-2, global_batch_size=4, seq_len=16,
                     param_dtype=param_dtype)
    par = ParallelConfig(zero_stage=stage, micro_batch_size=2)
    torch.manual_seed(0)
    model = HybridLM(cfg)
    engine = build_engine(model, tr.optimizer(), par, 1)
    guidance = SelfGuidance(model, cfg.mlp, total_steps=2 * guided_until, seed=1)
    gen = torch.Generator().manual_seed(0)
    guides, losses = [m.guide for m in guidance.guided_linears()], []
    for step in range(steps):
        if guidance.should_drop(step) and drop:
            guidance.drop_dense_paths(model)
            engine = rebuild_engine(engine, model, tr.optimizer(), par, 1)
        elif guidance.should_drop(step):  # the reference: the old engine, dense paths unused
            for m in guidance.guided_linears():
                m.guide_active = False
        else:
            guidance.update(step)
        for _ in range(engine.gradient_accumulation_steps()):
            ids = torch.randint(0, 50, (2, 16), generator=gen)
            loss = engine(ids, labels=ids)
            engine.backward(loss)
            engine.step()
        losses.append(loss.item())
    return engine, model, guides, losses


@pytest.mark.parametrize("stage,param_dtype", [(0, "fp32"), (1, "fp32"), (2, "fp32"), (1, "bf16")])
def test_rebuilt_engine_continues_exactly_without_the_dense_paths(one_rank, stage, param_dtype, tmp_path):
    """With bf16 parameters the fp32 master weights are carried over too (a new engine would
    build them from the bf16 module, rounded)."""
    ref_engine, reference, _, ref_losses = train(stage, drop=False, param_dtype=param_dtype)
    engine, model, guides, losses = train(stage, drop=True, param_dtype=param_dtype)
    assert losses == pytest.approx(ref_losses, rel=1e-6, abs=0)
    kept = {k: v for k, v in reference.state_dict().items() if "guide" not in k}
    assert kept.keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, kept[name], rtol=1e-6, atol=1e-7)
    if param_dtype == "bf16":
        ref_params = dict(reference.named_parameters())
        for name, p in model.named_parameters():
            torch.testing.assert_close(safe_get_full_fp32_param(p), safe_get_full_fp32_param(ref_params[name]),
                                       rtol=1e-6, atol=1e-7, msg=name)
    optimized = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in guides}
    assert engine.global_steps == 8 and engine.get_lr() == pytest.approx([1e-3, 1e-3])
    engine.save_checkpoint(str(tmp_path), tag="after")
    saved = torch.load(tmp_path / "after" / "mp_rank_00_model_states.pt", weights_only=False)
    assert not any("guide" in k for k in saved["module"])


def matmul_dtypes_in_engine_forward(engine, model) -> set:
    seen = set()
    hooks = [m.register_forward_hook(lambda m, i, out: seen.add(out.dtype))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    engine(torch.randint(0, 50, (2, 16)), labels=torch.randint(0, 50, (2, 16)))
    for h in hooks:
        h.remove()
    return seen


def test_the_engine_enters_bf16_autocast_itself_and_keeps_it_when_rebuilt(one_rank):
    """On GPU DeepSpeed switches off an autocast entered outside its forward (the model then ran in
    fp32: 2.4% MFU on an H100); the engine must autocast itself, and a rebuilt one as well."""
    cfg = ModelConfig(pattern="-*-", d_model=32, vocab_size=50, max_seq_len=32,
                      mlp=MLPConfig(activation="relu2", structure="lowrank", rank=4, self_guided=True,
                                    dense_first_layer=False, guide_stochastic=False))
    cfg.attention.n_heads = 4
    cfg.validate()
    tr = TrainConfig(max_steps=2, warmup_steps=1, global_batch_size=2, seq_len=16)
    par = ParallelConfig(zero_stage=1, micro_batch_size=2)
    model = HybridLM(cfg)
    assert matmul_dtypes_in_engine_forward(build_engine(model, tr.optimizer(), par, 1), model) == {torch.float32}
    engine = build_engine(model, tr.optimizer(), par, 1, autocast=torch.bfloat16)
    assert matmul_dtypes_in_engine_forward(engine, model) == {torch.bfloat16}
    SelfGuidance(model, cfg.mlp, total_steps=2, seed=1).drop_dense_paths(model)
    engine = rebuild_engine(engine, model, tr.optimizer(), par, 1)
    assert matmul_dtypes_in_engine_forward(engine, model) == {torch.bfloat16}


def test_imported_weights_are_the_masters_of_a_bf16_parameter_engine(one_rank, tmp_path):
    """A run that starts from `strata import`'s weights with bf16 parameters keeps them exactly as
    its fp32 master weights (the engine would round them from its bf16 module)."""
    from strata.parallel.checkpoint.files import write_weights_only
    from strata.parallel.checkpoint.resume import WEIGHTS, ResumePlan
    from strata.parallel.layout import Layout
    from strata.parallel.topology import init_topology

    cfg = ModelConfig(pattern="M*-", d_model=32, vocab_size=50, max_seq_len=32)
    cfg.mamba.headdim, cfg.mamba.d_state, cfg.mamba.chunk_size, cfg.attention.n_heads = 8, 8, 8, 4
    cfg.validate()
    torch.manual_seed(3)
    weights = HybridLM(cfg).state_dict()
    assert any(not torch.equal(w.bfloat16().float(), w) for w in weights.values())
    ckpt = write_weights_only(tmp_path, weights)
    plan = ResumePlan.decide(ckpt, cfg, Layout(1, 1, 1, 1, "bf16"))
    assert plan.kind == WEIGHTS
    torch.manual_seed(4)
    model = HybridLM(cfg)
    plan.prepare(model)
    tr = TrainConfig(max_steps=4, warmup_steps=1, lr=1e-2, global_batch_size=2, seq_len=16, param_dtype="bf16")
    engine = build_engine(model, tr.optimizer(), ParallelConfig(zero_stage=1, micro_batch_size=2), 1)
    assert plan.restore(engine, 0, init_topology(1, 1), tr.lr) is None
    for name, p in engine.module.named_parameters():
        assert p.dtype == torch.bfloat16
        assert torch.equal(safe_get_full_fp32_param(p), weights[name]), name


@pytest.mark.parametrize("flags", [dict(capturable=True), dict(fused=False), dict()])
def test_a_written_adamw_step_sits_where_torchs_own_load_puts_it(flags):
    """The state written into a fresh engine skips Optimizer.load_state_dict, which puts a fused or
    capturable AdamW's `step` on the parameter's device as fp32: a CPU step beside CUDA parameters (a
    resharded resume on a GPU, the fused AdamW the engine picks there) fails the step. A parameter on the
    meta device stands in for the GPU here."""
    from types import SimpleNamespace

    from strata.parallel.checkpoint.rebuild import write_optimizer_states

    def adamw():
        return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3, device="meta"))], **flags)

    saved_step = torch.tensor(7.0)  # as read from a checkpoint: on the CPU
    ours = adamw()
    (param,) = ours.param_groups[0]["params"]
    state = {"step": saved_step, "exp_avg": torch.zeros(3, device="meta"), "exp_avg_sq": torch.zeros(3, device="meta")}
    write_optimizer_states(SimpleNamespace(optimizer=ours), [param], lambda p: state, saved_step, 0)
    torchs = adamw()
    torchs.load_state_dict({"state": {0: dict(state)}, "param_groups": torchs.state_dict()["param_groups"]})
    want = torchs.state[torchs.param_groups[0]["params"][0]]["step"]
    got = ours.state[param]["step"]
    assert (got.device, got.dtype) == (want.device, want.dtype)
    assert got.device == (param.device if flags.get("capturable") else torch.device("cpu"))
