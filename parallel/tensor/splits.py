"""How every parameter of a HybridLM is split over tensor-parallel ranks: the one source
of truth for building the TP model (parallel/tensor/blocks.py) and for checkpoints and
export, which need both directions:

    splits = parameter_splits(model, tp)                  # model: HybridLM (meta is fine)
    local = shard_state_dict(model.state_dict(), splits, rank, tp)
    full = gather_state_dicts([local_0, ..., local_tp-1], splits)

Parameter names are the HybridLM's; the TP model keeps them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from strata.model.attention import Attention
from strata.model.mamba2 import Mamba2Mixer
from strata.model.structured import BlockDense, BlockShuffle, LowRank


class Replicated:
    """Every rank holds the whole tensor."""

    dim = None

    def shard(self, t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        return t

    def gather(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        return pieces[0]

    def __repr__(self) -> str:
        return "Replicated()"


REPLICATED = Replicated()


@dataclass(frozen=True)
class Chunked:
    """Rank r holds chunk r of `dim`, or chunk r of each of `segments` (sizes along `dim`,
    e.g. Mamba2's in_proj rows z | x | B | C | dt) concatenated."""

    dim: int
    segments: tuple[int, ...] | None = None

    def _parts(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return t.split(list(self.segments), self.dim) if self.segments else (t,)

    def shard(self, t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        return torch.cat([p.chunk(size, self.dim)[rank] for p in self._parts(t)], self.dim).contiguous()

    def gather(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        if not self.segments:
            return torch.cat(pieces, self.dim)
        local = [s // len(pieces) for s in self.segments]
        per_rank = [p.split(local, self.dim) for p in pieces]
        return torch.cat([torch.cat([r[i] for r in per_rank], self.dim) for i in range(len(local))], self.dim)


@dataclass(frozen=True)
class Interleaved:
    """`dim` read as (dim / period, period); rank r holds chunk r of the period axis
    (BlockShuffle's second factor seen from a row-parallel first factor)."""

    dim: int
    period: int

    def shard(self, t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
        view = t.unflatten(self.dim, (-1, self.period))
        return view.chunk(size, self.dim + 1)[rank].flatten(self.dim, self.dim + 1).contiguous()

    def gather(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        views = [p.unflatten(self.dim, (-1, self.period // len(pieces))) for p in pieces]
        return torch.cat(views, self.dim + 1).flatten(self.dim, self.dim + 1)


ROWS, COLS = Chunked(0), Chunked(1)


def column_splits(linear: nn.Module) -> dict:
    """An MLP linear whose output features are split (gate / up)."""
    if isinstance(linear, nn.Linear):
        return {"weight": ROWS, "bias": ROWS}
    common = {"bias": ROWS, "guide": ROWS}
    if isinstance(linear, (LowRank, BlockDense)):
        # The narrow first factor is replicated; the region starts on its R outputs.
        first = "V" if isinstance(linear, LowRank) else "blocks"
        return {first: REPLICATED, "U": ROWS, **common}
    if isinstance(linear, BlockShuffle):
        # Rows j of every first-factor block feed exactly this rank's second-factor blocks.
        return {"blocks1": COLS, "blocks2": ROWS, **common}
    raise TypeError(f"no tensor-parallel split for {type(linear).__name__}")


def row_splits(linear: nn.Module) -> dict:
    """An MLP linear whose input features are split (down)."""
    if isinstance(linear, nn.Linear):
        return {"weight": COLS, "bias": REPLICATED}
    common = {"bias": REPLICATED, "guide": COLS}
    if isinstance(linear, LowRank):
        # h -> r row-parallel: the reduction carries r values; r -> d replicated.
        return {"V": COLS, "U": REPLICATED, **common}
    if isinstance(linear, BlockDense):
        return {"blocks": ROWS, "U": COLS, **common}
    if isinstance(linear, BlockShuffle):
        return {"blocks1": ROWS, "blocks2": Interleaved(2, linear.nblocks), **common}
    raise TypeError(f"no tensor-parallel split for {type(linear).__name__}")


def mamba_splits(mixer) -> dict:
    """Megatron's MambaMixer split: heads and groups, each of z, x, B, C, dt per rank."""
    di, bc, nh = mixer.d_inner, mixer.bc_dim, mixer.nheads
    in_rows = Chunked(0, (di, di, bc, bc, nh))
    conv_rows = Chunked(0, (di, bc, bc))
    return {"in_proj.weight": in_rows, "in_proj.bias": in_rows, "conv1d.weight": conv_rows,
            "conv1d.bias": conv_rows, "dt_bias": ROWS, "A_log": ROWS, "D": ROWS, "norm.weight": ROWS,
            "out_proj.weight": COLS, "out_proj.bias": REPLICATED}


def kv_heads_split(n_kv_heads: int, tp: int) -> bool:
    """KV heads are split when tp divides them, else replicated (each rank uses one)."""
    return n_kv_heads % tp == 0


def attention_splits(attn, tp: int) -> dict:
    kv = ROWS if kv_heads_split(attn.n_kv_heads, tp) else REPLICATED
    return {"q_proj.weight": ROWS, "q_proj.bias": ROWS, "k_proj.weight": kv, "k_proj.bias": kv,
            "v_proj.weight": kv, "v_proj.bias": kv, "o_proj.weight": COLS}


def mlp_splits(mlp) -> dict:
    out = {}
    for name in ("gate_proj", "up_proj"):
        if hasattr(mlp, name):
            out.update(_prefixed(f"{name}.", column_splits(getattr(mlp, name))))
    out.update(_prefixed("down_proj.", row_splits(mlp.down_proj)))
    return out


def parameter_splits(model: nn.Module, tp: int) -> dict:
    """{parameter name: split} for a HybridLM; parameters not named are replicated."""
    splits = {"embed.weight": ROWS, "lm_head.weight": ROWS}
    for i, block in enumerate(model.blocks):
        mixer = block.mixer
        if isinstance(mixer, Mamba2Mixer):
            rules = mamba_splits(mixer)
        elif isinstance(mixer, Attention):
            rules = attention_splits(mixer, tp)
        else:
            rules = mlp_splits(mixer)
        splits.update(_prefixed(f"blocks.{i}.mixer.", rules))
    names = {n for n, _ in model.named_parameters()}
    return {n: rule for n, rule in splits.items() if n in names}


def split_of(splits: dict, name: str):
    return splits.get(name, REPLICATED)


def _skipped(key: str) -> bool:
    return key.endswith("_extra_state")  # megatron layers' empty extra state


def shard_state_dict(full: dict, splits: dict, rank: int, size: int) -> dict:
    """Rank `rank`'s part of a full (TP=1) state dict."""
    return {k: split_of(splits, k).shard(v, rank, size) for k, v in full.items() if not _skipped(k)}


def gather_state_dicts(pieces: list[dict], splits: dict) -> dict:
    """The full state dict from every TP rank's part, in rank order (inverse of shard)."""
    return {k: split_of(splits, k).gather([p[k] for p in pieces]) for k in pieces[0] if not _skipped(k)}


def _prefixed(prefix: str, rules: dict) -> dict:
    return {prefix + k: v for k, v in rules.items()}
