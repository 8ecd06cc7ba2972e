"""Self-guided training: the schedule, the mixed forward, the stochastic draws (identical
on every rank, exact on resume), dropping the dense path, and the equal-FLOPs protocol."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from strata.model.config import MLPConfig, ModelConfig
from strata.model.guidance import (SelfGuidance, alpha_at, equal_flops_extra_steps, guide_draw, guide_step_fraction_sum,
                                   remove_from_optimizer)
from strata.model.hybrid import HybridLM
from strata.model.structured import BlockDense, BlockShuffle, LowRank, count_params, structured_linears
from tests.parallel.dist_helpers import leave_process


def test_cosine_and_linear_schedules_go_from_one_to_zero_at_t():
    assert [alpha_at(s, 10, "cosine") for s in (0, 5, 10, 11)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert [alpha_at(s, 10, "linear") for s in (0, 3, 10)] == pytest.approx([1.0, 0.7, 0.0])
    cosine = [alpha_at(s, 10, "cosine") for s in range(11)]
    assert all(a > b for a, b in zip(cosine, cosine[1:]))


def guided(layer, stochastic=False, guided_steps=10):
    layer.add_guide()
    mlp = MLPConfig(structure="lowrank", rank=1, self_guided=True, guide_stochastic=stochastic)
    return SelfGuidance(layer, mlp, total_steps=2 * guided_steps, seed=5)


LAYERS = {"lowrank": lambda: LowRank(24, 40, 6, bias=True),
          "blockdense": lambda: BlockDense(24, 40, 8, 4, bias=True),
          "blockshuffle": lambda: BlockShuffle(24, 40, 4, bias=True)}


@pytest.mark.parametrize("kind", LAYERS)
def test_guide_starts_as_the_structured_product_and_at_alpha_one_the_layer_is_its_dense_path(kind):
    torch.manual_seed(0)
    layer = LAYERS[kind]()
    g = guided(layer)
    torch.testing.assert_close(layer.guide, layer.dense_weight(), rtol=0, atol=0)
    with torch.no_grad():
        layer.guide.add_(0.1 * torch.randn_like(layer.guide))  # training moves W away from S
        layer.bias.normal_()
    assert g.update(0) == 1.0
    x = torch.randn(5, 24)
    assert torch.equal(layer(x), F.linear(x, layer.guide, layer.bias))


@pytest.mark.parametrize("kind", LAYERS)
def test_gradients_reach_both_paths_as_the_mixture_says(kind):
    torch.manual_seed(0)
    layer = LAYERS[kind]().double()
    g = guided(layer)
    a = g.update(4)
    assert 0 < a < 1
    x, upstream = torch.randn(7, 24, dtype=torch.float64), torch.randn(7, 40, dtype=torch.float64)
    (layer(x) * upstream).sum().backward()
    torch.testing.assert_close(layer.guide.grad, a * upstream.T @ x)
    # the structured factors see (1 - a) times the gradient they would get alone
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if n not in ("guide", "bias")}
    layer.zero_grad()
    ((1 - a) * (layer.structured_forward(x) * upstream).sum()).backward()
    for name, grad in grads.items():
        assert grad.abs().sum() > 0
        torch.testing.assert_close(grad, getattr(layer, name).grad)


def test_stochastic_variant_skips_the_dense_path_with_probability_one_minus_alpha():
    draws = [guide_draw(11, step, layer) for step in range(2000) for layer in range(10)]
    assert all(0 <= d < 1 for d in draws)
    assert sum(d < 0.3 for d in draws) / len(draws) == pytest.approx(0.3, abs=0.01)
    torch.manual_seed(0)
    layer = LowRank(24, 40, 6, bias=True)
    g = guided(layer, stochastic=True)
    x = torch.randn(3, 24)
    seen = set()
    for step in range(10):
        a = g.update(step)
        expect_dense = guide_draw(5, step, layer.layer_idx) < a
        structured = layer.structured_forward(x) + layer.bias
        mixed = a * F.linear(x, layer.guide) + (1 - a) * layer.structured_forward(x) + layer.bias
        torch.testing.assert_close(layer(x), mixed if expect_dense else structured)
        seen.add(expect_dense)
    assert seen == {True, False}
    layer.eval()  # evaluation never depends on a draw
    torch.testing.assert_close(layer(x), mixed)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model_cfg(**mlp):
    defaults = dict(activation="relu2", structure="lowrank", rank=8, self_guided=True, dense_first_layer=False)
    cfg = ModelConfig(pattern="-*--", d_model=32, vocab_size=61, max_seq_len=32,
                      mlp=MLPConfig(**{**defaults, **mlp}))
    cfg.attention.n_heads = 4
    cfg.validate()
    return cfg


def _draws_on_rank(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(100 + rank)  # ranks' RNG streams differ, as their data shards do
    torch.rand(rank + 1)
    model = HybridLM(tiny_model_cfg())
    g = SelfGuidance(model, model.cfg.mlp, total_steps=40, seed=123)
    pattern = []
    for step in range(20):
        g.update(step)
        pattern.append([m.guide_active for m in structured_linears(model)])
    mine = torch.tensor(pattern, dtype=torch.int64)
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    if rank == 0:
        torch.save(torch.stack(gathered), out)
    dist.destroy_process_group()
    leave_process()


def test_stochastic_draws_agree_across_data_parallel_ranks(tmp_path):
    out = tmp_path / "draws.pt"
    mp.spawn(_draws_on_rank, args=(2, free_port(), str(out)), nprocs=2)
    per_rank = torch.load(out)
    assert torch.equal(per_rank[0], per_rank[1])
    assert 0 < per_rank[0].float().mean() < 1  # some steps skipped the dense path, some did not


class TinyRun:
    """A plain-torch training loop with self-guided training and exact checkpoints."""

    def __init__(self, seed_for_init=0, total=10):
        torch.manual_seed(seed_for_init)
        self.cfg = tiny_model_cfg(guide_ratio=0.5)
        self.model = HybridLM(self.cfg)
        self.guidance = SelfGuidance(self.model, self.cfg.mlp, total_steps=total, seed=9)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.step, self.losses, self.draws = 0, [], []

    def batch(self):
        gen = torch.Generator().manual_seed(1000 + self.step)  # data keyed by step, as our loader's cursor
        return torch.randint(0, 61, (2, 12), generator=gen)

    def drop_if_due(self):
        if self.guidance.should_drop(self.step):
            remove_from_optimizer(self.opt, self.guidance.drop_dense_paths(self.model))

    def train(self, until):
        while self.step < until:
            self.drop_if_due()
            self.guidance.update(self.step)
            self.draws.append([m.guide_active for m in self.guidance.guided_linears()])
            ids = self.batch()
            loss = self.model(ids, labels=ids)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad()
            self.losses.append(loss.item())
            self.step += 1

    def state(self):
        return {"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                "guidance": self.guidance.state_dict(), "step": self.step}

    @classmethod
    def resumed(cls, state):
        run = cls(seed_for_init=77)  # a different init: everything must come from the checkpoint
        run.guidance.load_state_dict(state["guidance"])
        run.step = state["step"]
        run.drop_if_due()  # a resume after T builds the model without the dense path
        run.opt = torch.optim.AdamW(run.model.parameters(), lr=1e-2)
        run.model.load_state_dict(state["model"])
        run.opt.load_state_dict(state["opt"])
        return run


@pytest.mark.parametrize("stop_at", [3, 7])  # before and after T = 5
def test_resume_reproduces_losses_draws_and_weights_bitwise(stop_at):
    whole = TinyRun()
    whole.train(10)
    first = TinyRun()
    first.train(stop_at)
    state = first.state()
    assert any("guide" in k for k in state["model"]) == (stop_at < 5)
    second = TinyRun.resumed(state)
    second.train(10)
    assert first.losses + second.losses == whole.losses
    assert first.draws + second.draws == whole.draws
    for (name, a), (_, b) in zip(whole.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_after_t_the_dense_weights_leave_the_model_optimizer_and_checkpoint():
    run = TinyRun()
    guides = [m.guide for m in run.guidance.guided_linears()]
    run.train(5)
    assert all(p in run.opt.state for p in guides)  # trained while guided
    run.train(6)
    in_optimizer = {id(p) for group in run.opt.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in guides}
    assert not any(p in run.opt.state for p in guides)
    assert not any("guide" in k for k in run.model.state_dict())
    assert len(run.opt.state_dict()["state"]) == len(list(run.model.parameters()))
    assert run.guidance.alpha == 0.0


# -- the equal-FLOPs protocol ------------------------------------------------------------

def test_stochastic_guided_phase_costs_the_sum_of_alpha():
    cosine = MLPConfig(structure="lowrank", rank=1, self_guided=True, guide_stochastic=True)
    assert guide_step_fraction_sum(cosine, 100) == pytest.approx(50.5)
    fixed = MLPConfig(structure="lowrank", rank=1, self_guided=True, guide_stochastic=False)
    assert guide_step_fraction_sum(fixed, 100) == 100


def flops_per_token(model, seq_len=32):
    """(dense model, structured model, dense paths) forward FLOPs per token: the rest of the
    model from model/counting.py, the MLP linears counted off the modules themselves."""
    from strata.model.counting import forward_flops_per_token
    linears = structured_linears(model)
    dense_mlp = sum(2 * m.in_features * m.out_features for m in linears)
    structured_mlp = sum(2 * count_params(m) for m in linears)
    total = forward_flops_per_token(model.cfg, seq_len)["total"]
    guides = sum(2 * m.guide.numel() for m in linears if m.guide is not None)
    rest = total - structured_mlp - guides
    return rest + dense_mlp, rest + structured_mlp, guides


@pytest.mark.parametrize("mlp", [dict(), dict(guide_stochastic=False, guide_ratio=0.2),
                                 dict(self_guided=False), dict(structure="blockshuffle", rank=0, nblocks=4)])
def test_equal_flops_extension_is_the_largest_that_fits_the_dense_budget(mlp):
    cfg = tiny_model_cfg(**mlp)
    model = HybridLM(cfg)
    extra = equal_flops_extra_steps(cfg, 1000, 32)
    dense, structured, guide = flops_per_token(model)
    guided = round(cfg.mlp.guide_ratio * 1000) if cfg.mlp.self_guided else 0
    spent_on_guides = guide * guide_step_fraction_sum(cfg.mlp, guided)
    assert extra > 0
    assert structured * (1000 + extra) + spent_on_guides <= dense * 1000
    assert dense * 1000 < structured * (1000 + extra + 1) + spent_on_guides


def test_equal_flops_refuses_a_guided_phase_that_costs_more_than_it_saves():
    cfg = tiny_model_cfg(rank=10, guide_stochastic=False, guide_ratio=0.9)  # 39% of the MLP: little saved
    with pytest.raises(ValueError, match=r"^mlp.equal_flops: .* lower mlp.guide_ratio to at most") as err:
        equal_flops_extra_steps(cfg, 1000, 32)
    largest = float(str(err.value).split("at most ")[1].split(" ")[0])
    cfg.mlp.guide_ratio = largest
    assert equal_flops_extra_steps(cfg, 1000, 32) >= 0
    cfg.mlp.guide_ratio = largest + 0.002
    with pytest.raises(ValueError):
        equal_flops_extra_steps(cfg, 1000, 32)
