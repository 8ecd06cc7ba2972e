"""nn.Linear whose product is kernels.ops.linear: oneDNN on CPU in fp32, F.linear elsewhere, FP8
where its `fp8_recipe` says.
The same parameters, names, init and state dict as nn.Linear (it is one).

`Projections` is how a mixer builds its projections: the model's own are whole Linears; tensor
parallelism (parallel/tensor/blocks.py) passes one that splits them over its ranks, so that its
mixers are the model's own classes built with local sizes (Megatron's mixers take their linear
classes as submodules the same way)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from strata.kernels import ops


class Linear(nn.Linear):
    fp8_recipe: str | None = None
    """The FP8 recipe of this linear's product (kernels/fp8/recipe.py), None for none: set from
    outside (parallel/engine/parallelize.py apply_fp8, from train.fp8)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias, fp8=self.fp8_recipe)


class Projections:
    """The projections of one process holding the whole model (ranks = 1). A mixer asks for its
    projections by their role; a split form (parallel/tensor/blocks.py) answers with this rank's
    shards and says how many ranks share the heads."""

    ranks = 1

    def column(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        """A projection whose outputs (heads) are split over the ranks."""
        return Linear(in_features, out_features, bias=bias)

    def row(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        """A projection whose inputs are split over the ranks; its output is whole."""
        return Linear(in_features, out_features, bias=bias)

    def kv(self, in_features: int, n_kv_heads: int, head_dim: int, bias: bool) -> tuple[nn.Module, int]:
        """A k or v projection and the KV heads this rank computes."""
        return Linear(in_features, n_kv_heads * head_dim, bias=bias), n_kv_heads

    def column_of(self, build: Callable[[], nn.Module]) -> nn.Module:
        """An MLP linear (dense or structured) whose outputs are split; `build` makes the whole one."""
        return build()

    def row_of(self, build: Callable[[], nn.Module]) -> nn.Module:
        """An MLP linear whose inputs are split."""
        return build()


WHOLE = Projections()
