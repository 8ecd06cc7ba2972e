"""Structured linears for the MLP (Wei, Moalla, Pascanu, Gulcehre, NeurIPS 2024).

Each replaces one N -> M linear with a factorised product, no nonlinearity inside:

- LowRank      y = U (V x)                          V: R x N, U: M x R       params (N + M) R
- BlockDense   y = U blockdiag(V_1..V_B) x          V_i: R/B x N/B, U: M x R  params R (M + N/B)
- BlockShuffle y = blockdiag(B2) P blockdiag(B1) x  K = min(N, M), B1_i: K/B x N/B, B2_i: M/B x K/B,
               P the stride-B shuffle (kernels/blockdiag/reference.py) params K (N + M) / B

Block-diagonal products go through kernels.ops.blockdiag_matmul (Triton on GPU).

Every structured linear can carry the dense path of self-guided training (`guide`, an
M x N parameter initialised to the product of the initial factors; model/guidance.py
drives it) and can produce its exact dense equivalent (`dense_weight`) for export, or
pre-merge it for decoding when that measures faster (`premerge_where_faster`).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from strata.kernels import ops


class StructuredLinear(nn.Module):
    """Common part: bias, the optional self-guided dense path, the pre-merged weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool, layer_idx: int):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.layer_idx = layer_idx
        """Keys the stochastic self-guided draw (model/guidance.py)."""
        self.register_parameter("bias", nn.Parameter(torch.zeros(out_features)) if bias else None)
        self.register_parameter("guide", None)
        self.guide_alpha = 1.0
        self.guide_active = True
        self.register_buffer("merged", None, persistent=False)
        self.merged_max_rows = 0

    fp8_recipe: str | None = None
    """The FP8 recipe of the dense products (factors and guide; not the block-diagonal ones), None
    for none: set from outside (parallel/engine/parallelize.py apply_fp8, from train.fp8)."""

    def product(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x @ weight^T, one of this linear's dense products: in FP8 where fp8_recipe says, else
        F.linear's as it always was (not ops.linear's oneDNN path: a structured run's numbers stay)."""
        if self.fp8_recipe is None:
            return F.linear(x, weight)
        return ops.linear(x, weight, fp8=self.fp8_recipe)

    # -- the structure, per subclass --------------------------------------------------
    def structured_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def init_factors(self, std: float) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def dense_weight(self) -> torch.Tensor:
        """The exact M x N matrix this structure computes: its forward applied to the identity."""
        eye = torch.eye(self.in_features, device=self.factor_device(), dtype=self.factor_dtype())
        return self.structured_forward(eye).t().contiguous()

    @torch.no_grad()
    def eval_weight(self) -> torch.Tensor:
        """The M x N matrix of what this linear computes in evaluation: the structure's, mixed with
        the self-guided dense path while there is one, a W + (1 - a) S (exact: both are linear)."""
        if self.guide is None:
            return self.dense_weight()
        a = self.guide_alpha
        return a * self.guide + (1.0 - a) * self.dense_weight()

    # -- shared behaviour -----------------------------------------------------------------
    def factor_device(self) -> torch.device:
        return next(p for n, p in self.named_parameters() if n not in ("bias", "guide")).device

    def factor_dtype(self) -> torch.dtype:
        return next(p for n, p in self.named_parameters() if n not in ("bias", "guide")).dtype

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        """Re-initialise the factors (LowRank uses std; the block structures are orthonormal)
        and keep the dense guide equal to their product."""
        self.init_factors(std)
        if self.bias is not None:
            self.bias.zero_()
        if self.guide is not None:
            self.guide.copy_(self.dense_weight())

    def add_guide(self) -> None:
        """Create the self-guided dense path W = the current structured product."""
        self.guide = nn.Parameter(self.dense_weight())

    def drop_guide(self) -> None:
        self.guide = None

    def follow_guidance_of(self, other: "StructuredLinear") -> None:
        """`other`'s self-guided state, not its weights: whether a dense path is left, its a and
        this step's draw. A linear rebuilt in another form (a TP shard) goes on where it was."""
        if other.guide is None:
            self.drop_guide()
        self.guide_alpha, self.guide_active = other.guide_alpha, other.guide_active

    def guided(self) -> bool:
        """Whether this forward mixes in the dense path: while it exists, unless this step's
        draw skips it; evaluation always mixes it in, so that its result depends on no draw."""
        return self.guide is not None and (self.guide_active or not self.training)

    @torch.no_grad()
    def merge(self, max_rows: float = math.inf) -> None:
        """Compute inputs of at most `max_rows` rows (tokens) through one dense matmul from
        now on; larger ones (a prompt) keep the structured path. Inference only; not saved."""
        self.merged = self.eval_weight()
        self.merged_max_rows = max_rows

    def unmerge(self) -> None:
        self.merged = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged is not None and x.numel() <= self.merged_max_rows * self.in_features:
            return F.linear(x, self.merged, self.bias)
        y = self.structured_forward(x)
        if self.guided():
            a = self.guide_alpha
            y = a * self.product(x, self.guide) + (1.0 - a) * y
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                f"guide={self.guide is not None}")


class LowRank(StructuredLinear):
    def __init__(self, in_features, out_features, rank, bias=False, layer_idx=0, std=0.02):
        super().__init__(in_features, out_features, bias, layer_idx)
        self.rank = rank
        self.V = nn.Parameter(torch.empty(rank, in_features))
        self.U = nn.Parameter(torch.empty(out_features, rank))
        self.init_factors(std)

    @torch.no_grad()
    def init_factors(self, std: float) -> None:
        # The best rank-R approximation of the dense init: keeps its spectrum's top.
        dense = torch.randn(self.out_features, self.in_features, device=self.V.device) * std
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        root = s[: self.rank].sqrt()
        self.U.copy_(u[:, : self.rank] * root)
        self.V.copy_(root[:, None] * vh[: self.rank])

    def structured_forward(self, x):
        return self.product(self.product(x, self.V), self.U)

    @torch.no_grad()
    def dense_weight(self):
        return self.U @ self.V

    def extra_repr(self):
        return f"rank={self.rank}, " + super().extra_repr()


class BlockDense(StructuredLinear):
    def __init__(self, in_features, out_features, rank, nblocks, bias=False, layer_idx=0, std=0.02):
        super().__init__(in_features, out_features, bias, layer_idx)
        if in_features % nblocks or rank % nblocks:
            raise ValueError(f"nblocks: {nblocks} must divide in_features={in_features} and rank={rank}")
        self.rank, self.nblocks = rank, nblocks
        self.blocks = nn.Parameter(torch.empty(nblocks, rank // nblocks, in_features // nblocks))
        self.U = nn.Parameter(torch.empty(out_features, rank))
        self.init_factors(std)

    @torch.no_grad()
    def init_factors(self, std: float) -> None:
        self.blocks.copy_(orthonormal_like(self.blocks))
        self.U.copy_(orthonormal_like(self.U))

    def structured_forward(self, x):
        return self.product(ops.blockdiag_matmul(x, self.blocks), self.U)

    @torch.no_grad()
    def dense_weight(self):
        return self.U @ torch.block_diag(*self.blocks.unbind(0))

    def extra_repr(self):
        return f"rank={self.rank}, nblocks={self.nblocks}, " + super().extra_repr()


class BlockShuffle(StructuredLinear):
    def __init__(self, in_features, out_features, nblocks, bias=False, layer_idx=0, std=0.02):
        super().__init__(in_features, out_features, bias, layer_idx)
        if in_features % nblocks or out_features % nblocks:
            raise ValueError(f"nblocks: {nblocks} must divide in_features={in_features} and "
                             f"out_features={out_features}")
        self.nblocks = nblocks
        inner = min(in_features, out_features)
        self.blocks1 = nn.Parameter(torch.empty(nblocks, inner // nblocks, in_features // nblocks))
        self.blocks2 = nn.Parameter(torch.empty(nblocks, out_features // nblocks, inner // nblocks))
        self.init_factors(std)

    @torch.no_grad()
    def init_factors(self, std: float) -> None:
        self.blocks1.copy_(orthonormal_like(self.blocks1))
        self.blocks2.copy_(orthonormal_like(self.blocks2))

    def structured_forward(self, x):
        # The stride-B shuffle sends output j of block i to position j*B + i, so every block
        # of the second factor sees one output of each block of the first.
        return ops.blockdiag_matmul(ops.blockdiag_matmul(x, self.blocks1, shuffle=True), self.blocks2)

    def extra_repr(self):
        return f"nblocks={self.nblocks}, " + super().extra_repr()


@torch.no_grad()
def orthonormal_like(w: torch.Tensor) -> torch.Tensor:
    """Each trailing matrix of a Gaussian draw replaced by U V^T of its own SVD (the nearest
    matrix with orthonormal rows or columns)."""
    draw = torch.randn(w.shape, device=w.device, dtype=torch.float32)
    u, _, vh = torch.linalg.svd(draw, full_matrices=False)
    return (u @ vh).to(w.dtype)


def count_params(module: nn.Module) -> int:
    """Parameters of the structure itself: bias and the self-guided dense path excluded."""
    return sum(p.numel() for n, p in module.named_parameters() if n.rsplit(".", 1)[-1] not in ("bias", "guide"))


# -- pre-merge ---------------------------------------------------------------------------

def structured_linears(model: nn.Module) -> list[StructuredLinear]:
    return [m for m in model.modules() if isinstance(m, StructuredLinear)]


@torch.no_grad()
def to_dense(model: nn.Module) -> nn.Module:
    """Replace every structured linear by an nn.Linear holding its exact dense equivalent
    (export: the result loads as a dense-MLP model computing what the model computes in
    evaluation). A self-guided dense path still there is folded in at the linear's guide_alpha:
    a W + (1 - a) S (set guide_alpha first; model/guidance.py)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, StructuredLinear):
                dense = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                  device=child.factor_device(), dtype=child.factor_dtype())
                dense.weight.copy_(child.eval_weight())
                if child.bias is not None:
                    dense.bias.copy_(child.bias)
                setattr(parent, name, dense)
    return model


def _seconds_per_call(fn, x, repeats: int) -> float:
    fn(x)  # warm-up (kernel selection, allocator)
    if x.is_cuda:
        torch.cuda.synchronize()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        if x.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def premerge_where_faster(model: nn.Module, tokens: int, repeats: int = 20) -> dict[str, tuple[float, float, bool]]:
    """For decoding `tokens` rows at a time: time each distinct structured linear shape both
    ways on the model's own device and dtype, and merge the ones where dense is faster, for
    inputs of at most `tokens` rows (a prompt keeps the structured path).
    Returns {description: (structured_s, dense_s, merged)}."""
    report, decided = {}, {}
    for m in structured_linears(model):
        if m.guide is not None:
            continue  # still training with its dense path: leave it alone
        key = m.extra_repr() + type(m).__name__
        if key not in decided:
            m.unmerge()
            x = torch.randn(tokens, m.in_features, device=m.factor_device(), dtype=m.factor_dtype())
            structured_s = _seconds_per_call(m, x, repeats)
            dense_w = m.dense_weight()
            dense_s = _seconds_per_call(lambda t: F.linear(t, dense_w, m.bias), x, repeats)
            decided[key] = dense_s < structured_s
            report[f"{type(m).__name__}({m.extra_repr()})"] = (structured_s, dense_s, decided[key])
        if decided[key]:
            m.merge(max_rows=tokens)
        else:
            m.unmerge()
    return report


def carry_guidance(source: nn.Module, target: nn.Module) -> None:
    """Each structured linear of `target` follows the self-guided state of the one of the same
    name in `source` (target rebuilt from source in another form)."""
    sources = dict(source.named_modules())
    for name, module in target.named_modules():
        if isinstance(module, StructuredLinear) and isinstance(sources.get(name), StructuredLinear):
            module.follow_guidance_of(sources[name])
