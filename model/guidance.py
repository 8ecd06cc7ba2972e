"""Self-guided training (Wei et al., NeurIPS 2024, section 4) driven by the training loop.

Every structured linear S carries a dense path W (model/structured.py), and computes
o = a W x + (1 - a) S(x) + b. `a` starts at 1 and decays (cosine or linear) to 0 at step
T = guide_ratio * total steps; from T on the dense path is dropped: no compute, no
optimizer state, absent from later checkpoints. In the stochastic variant (the paper's
runs) each MLP layer skips its dense path at a step with probability 1 - a; the draw is a
hash of (seed, step, layer), so every rank agrees and a resumed run repeats it exactly.

The loop's side (launcher/train.py does this):

    guidance = SelfGuidance(model, cfg.model.mlp, total_steps, seed)
    # resuming: guidance.load_state_dict(saved) and, before the engine exists,
    if guidance.should_drop(step): guidance.drop_dense_paths()
    while step < total_steps:
        a = guidance.update(step)   # before the step's forward; log it
        ...forward, backward, optimizer step...; step += 1
        if guidance.should_drop(step): guidance.drop_dense_paths(); rebuild the optimizer
        ...save guidance.state_dict() with the checkpoint...
"""
from __future__ import annotations

import math
from dataclasses import replace

from torch import nn

from strata.model.config import MLPConfig, ModelConfig
from strata.model.counting import forward_flops_per_token
from strata.model.structured import StructuredLinear, structured_linears

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def guide_draw(seed: int, step: int, layer: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, step, layer): no RNG state to
    save, identical on every rank, and not disturbed by other consumers of torch's RNG."""
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (step & _MASK64))
    h = _splitmix64(h ^ (layer & _MASK64))
    return (h >> 11) / float(1 << 53)


def guided_steps(mlp_cfg: MLPConfig, total_steps: int) -> int:
    """T: the step at which a reaches 0 and the dense path is dropped."""
    return round(mlp_cfg.guide_ratio * total_steps) if mlp_cfg.self_guided else 0


def alpha_at(step: int, guided: int, schedule: str) -> float:
    """The mixing coefficient for the forward of optimizer step `step` (0-based)."""
    if step >= guided:
        return 0.0
    progress = step / guided
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class SelfGuidance:
    """The schedule and the per-layer draws; holds nothing that is not in state_dict()."""

    def __init__(self, model: nn.Module, mlp_cfg: MLPConfig, total_steps: int, seed: int):
        self.model = model
        self.schedule = mlp_cfg.guide_schedule
        self.stochastic = mlp_cfg.guide_stochastic
        self.seed = seed
        self.guided_steps = guided_steps(mlp_cfg, total_steps)
        self.alpha = 1.0 if self.guided_steps else 0.0

    def guided_linears(self) -> list[StructuredLinear]:
        return [m for m in structured_linears(self.model) if m.guide is not None]

    def update(self, step: int) -> float:
        """Set a and the per-layer draws for the forward(s) of optimizer step `step`; every
        micro-batch of that step sees the same draws."""
        self.alpha = alpha_at(step, self.guided_steps, self.schedule)
        for m in self.guided_linears():
            m.guide_alpha = self.alpha
            m.guide_active = not self.stochastic or guide_draw(self.seed, step, m.layer_idx) < self.alpha
        return self.alpha

    def dense_share(self) -> float:
        """The share of structured layers whose dense path the current step computes (set
        by update; 0 once the paths are dropped): what its FLOPs and MFU count."""
        linears = self.guided_linears()
        return sum(m.guide_active for m in linears) / len(linears) if linears else 0.0

    def finished(self, step: int) -> bool:
        """True from step T on: a is 0 and the dense paths may be removed."""
        return step >= self.guided_steps

    def should_drop(self, step: int) -> bool:
        """The guided phase is over and the model still holds dense paths."""
        return self.finished(step) and bool(self.guided_linears())

    def drop_dense_paths(self, model: nn.Module | None = None) -> list[nn.Parameter]:
        """Remove every W from the model and return them; the caller then rebuilds its
        optimizer (or calls remove_from_optimizer) so that no state is kept for them."""
        removed = []
        for m in structured_linears(model or self.model):
            if m.guide is not None:
                removed.append(m.guide)
                m.drop_guide()
        self.alpha = 0.0
        return removed

    def state_dict(self) -> dict:
        # Plain numbers only: the checkpoint loader never unpickles objects.
        return {"alpha": self.alpha, "guided_steps": self.guided_steps, "seed": self.seed,
                "schedule": self.schedule, "stochastic": self.stochastic}

    def load_state_dict(self, state: dict) -> None:
        """Keep the schedule the run started with, even if total_steps changed since."""
        self.alpha = float(state["alpha"])
        self.guided_steps = int(state["guided_steps"])
        self.seed = int(state["seed"])
        self.schedule = str(state["schedule"])
        self.stochastic = bool(state["stochastic"])


def remove_from_optimizer(optimizer, params: list[nn.Parameter]) -> None:
    """For a plain torch optimizer: forget `params` (their state and their slots)."""
    gone = {id(p) for p in params}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in gone]
    for p in params:
        optimizer.state.pop(p, None)


# -- the equal-FLOPs protocol -----------------------------------------------------------

def guide_step_fraction_sum(mlp_cfg: MLPConfig, guided: int) -> float:
    """Sum over the guided steps of the share of layers computing the dense path
    (1 each step, or the expected a in the stochastic variant)."""
    if not mlp_cfg.guide_stochastic:
        return float(guided)
    return sum(alpha_at(t, guided, mlp_cfg.guide_schedule) for t in range(guided))


def split_guide_flops(cfg: ModelConfig, seq_len: int, per_token=forward_flops_per_token) -> tuple[float, float]:
    """(FLOPs per token of the model without its self-guided dense paths, those of the dense
    paths), by `per_token` (model/counting.py's forward or training count)."""
    without = per_token(replace(cfg, mlp=replace(cfg.mlp, self_guided=False)), seq_len)["total"]
    return without, per_token(cfg, seq_len)["total"] - without


def equal_flops_extra_steps(cfg: ModelConfig, total_steps: int, seq_len: int) -> int:
    """Steps to add to `total_steps` so that this run (structured MLPs, guided phase of T =
    guide_ratio * total_steps steps) spends the FLOPs the same model with dense MLPs spends
    in `total_steps`: D n = S (n + E) + G sum_t p_t, with D and S the dense and structured
    model's FLOPs per token, G its dense paths' and p_t the share of layers computing them at
    step t (1, or the expected a in the stochastic variant). FLOPs from model/counting.py;
    training's 3x and the tokens per step cancel out."""
    mlp = cfg.mlp
    dense_cfg = replace(cfg, mlp=replace(mlp, structure="dense", param_fraction=0.0, rank=0, nblocks=0,
                                         self_guided=False, equal_flops=False))
    dense = forward_flops_per_token(dense_cfg, seq_len)["total"]
    structured, guide = split_guide_flops(cfg, seq_len)
    saved = (dense - structured) * total_steps
    spent = guide * guide_step_fraction_sum(mlp, guided_steps(mlp, total_steps))
    if spent > saved:
        raise ValueError(f"mlp.equal_flops: the guided phase ({guided_steps(mlp, total_steps)} steps) costs more "
                         f"than the structured MLP saves over {total_steps} steps; lower mlp.guide_ratio to at most "
                         f"{_largest_fitting_ratio(mlp, total_steps, saved, guide):.3f} or set mlp.guide_stochastic=true")
    return math.floor((saved - spent) / structured)


def _largest_fitting_ratio(mlp_cfg: MLPConfig, total_steps: int, saved: float, guide_per_token: float) -> float:
    low, high = 0, total_steps
    while low < high:  # the largest T whose guided cost fits in the savings
        mid = (low + high + 1) // 2
        if guide_per_token * guide_step_fraction_sum(mlp_cfg, mid) <= saved:
            low = mid
        else:
            high = mid - 1
    return math.floor(1000 * low / total_steps) / 1000
