"""Layout validation: does TP x PP x DP fit this model and this world size?

Runs on the config alone, before any process group exists, so a bad layout costs one
line on stderr, not a hung job:

    check_layout(cfg.model, tp=4, pp=2, world_size=8)
    -> LayoutError: parallel layout tp=4 pp=2 dp=1 on 8 processes: mamba.ngroups=2 is not
       divisible by tp=4; nearest valid layouts: tp=2 pp=2 dp=2, tp=2 pp=4 dp=1, tp=1 pp=2 dp=4

Every rule here mirrors a split made in parallel/tensor/blocks.py (heads, groups, MLP
widths and structured factors, vocabulary) or parallel/pipeline/stages.py (blocks per stage).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from strata.model.config import ATTENTION_BLOCK, MAMBA_BLOCK, MLP_BLOCK, ModelConfig


class LayoutError(ValueError):
    """A layout that cannot run; str() is one line naming what does not divide and the
    nearest valid layouts."""


@dataclass(frozen=True)
class Layout:
    """How a job splits the model: also what a checkpoint records of the job that wrote it."""

    tp: int
    pp: int
    dp: int
    zero_stage: int = 0
    param_dtype: str = "fp32"
    """'bf16': bf16 module parameters, fp32 master weights in ZeRO's partitions (train.param_dtype);
    DeepSpeed names its optimizer files for it."""

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def __str__(self) -> str:
        return f"tp={self.tp} pp={self.pp} dp={self.dp}"

    def describe(self) -> str:
        params = "" if self.param_dtype == "fp32" else f" params={self.param_dtype}"
        return f"world={self.world_size} tp={self.tp} pp={self.pp} zero={self.zero_stage}{params}"

    def record(self) -> dict:
        """As a checkpoint's manifest stores it."""
        record = {"world_size": self.world_size, "tp": self.tp, "pp": self.pp, "zero_stage": self.zero_stage}
        return record | ({} if self.param_dtype == "fp32" else {"param_dtype": self.param_dtype})

    @classmethod
    def from_record(cls, record: dict) -> "Layout":
        tp, pp = record.get("tp", 1), record.get("pp", 1)
        return cls(tp, pp, record["world_size"] // (tp * pp), record.get("zero_stage", 0),
                   record.get("param_dtype", "fp32"))

    def reloads_as_written(self, saved: "Layout") -> bool:
        """DeepSpeed reloads its own files: same TP, PP, ZeRO stage and parameter dtype, and the
        same world size unless nothing is partitioned over data-parallel ranks (ZeRO 0)."""
        if (saved.tp, saved.pp, saved.zero_stage, saved.param_dtype) != (self.tp, self.pp, self.zero_stage,
                                                                         self.param_dtype):
            return False
        return self.zero_stage == 0 or saved.world_size == self.world_size


def _divides(what: str, value: int, tp: int) -> list[str]:
    return [] if value % tp == 0 else [f"{what}={value} is not divisible by tp={tp}"]


def attention_problems(model: ModelConfig, tp: int) -> list[str]:
    att = model.attention
    kv = att.resolved_kv_heads()
    problems = _divides("attention.n_heads", att.n_heads, tp)
    # KV heads are split when tp divides them and replicated (one per rank) when tp is a
    # multiple of them; anything in between would give a rank parts of two KV heads.
    if kv % tp and tp % kv:
        problems.append(f"attention.n_kv_heads={kv} neither divides nor is divisible by tp={tp}")
    return problems


def mamba_problems(model: ModelConfig, tp: int) -> list[str]:
    m = model.mamba
    nheads = m.nheads(model.d_model)
    return _divides("mamba heads (expand*d_model/headdim)", nheads, tp) + _divides("mamba.ngroups", m.ngroups, tp)


def structured_problems(model: ModelConfig, tp: int) -> list[str]:
    """The splits of parallel/tensor/blocks.py's structured linears (see there)."""
    mlp = model.mlp
    sizes = mlp.structured_sizes(model.d_model)
    d_ff = mlp.resolved_d_ff(model.d_model)
    if sizes.structure in ("blockdense", "blockshuffle") and sizes.nblocks % tp:
        return [f"mlp.nblocks={sizes.nblocks} is not divisible by tp={tp}"]
    if sizes.structure == "blockshuffle":
        per_block = min(model.d_model, d_ff) // sizes.nblocks
        if per_block % tp:
            return [f"blockshuffle inner width per block ({per_block}) is not divisible by tp={tp}"]
        if tp > 1 and per_block % sizes.nblocks:
            return [f"blockshuffle inner width per block ({per_block}) is not a multiple of "
                    f"mlp.nblocks={sizes.nblocks}, which its row-parallel split needs"]
    return []


def mlp_problems(model: ModelConfig, tp: int) -> list[str]:
    problems = _divides("mlp.d_ff", model.mlp.resolved_d_ff(model.d_model), tp)
    if any(block.kind == MLP_BLOCK and not block.dense_mlp for block in model.blocks()):
        problems += structured_problems(model, tp)
    return problems


def layout_problems(model: ModelConfig, tp: int, pp: int, world_size: int, zero_stage: int = 0,
                    sequence_parallel: bool = False, seq_len: int = 0, vocab_size: int = 0) -> list[str]:
    """Everything that stops (tp, pp) from running this model on world_size processes."""
    if tp < 1 or pp < 1:
        return [f"tp and pp must be >= 1, got tp={tp} pp={pp}"]
    problems = []
    if world_size % (tp * pp):
        problems.append(f"world size {world_size} is not divisible by tp*pp={tp * pp}")
    if tp > 1:
        problems += attention_problems(model, tp) if model.has(ATTENTION_BLOCK) else []
        problems += mamba_problems(model, tp) if model.has(MAMBA_BLOCK) else []
        problems += mlp_problems(model, tp) if model.has(MLP_BLOCK) else []
        if vocab_size:
            problems += _divides("vocab size", vocab_size, tp)
        if sequence_parallel and seq_len:
            problems += _divides("train.seq_len (sequence parallel)", seq_len, tp)
    if pp > model.n_blocks:
        problems.append(f"pp={pp} is more stages than the {model.n_blocks} blocks of the pattern")
    if pp > 1 and zero_stage > 1:
        problems.append(f"zero_stage={zero_stage} with pp={pp}: DeepSpeed's pipeline engine supports "
                        "ZeRO stage 0 or 1 only")
    return problems


def valid_layouts(model: ModelConfig, world_size: int, **kwargs) -> list[Layout]:
    found = []
    for tp in _divisors(world_size):
        for pp in _divisors(world_size // tp):
            if not layout_problems(model, tp, pp, world_size, **kwargs):
                found.append(Layout(tp, pp, world_size // (tp * pp)))
    return found


def nearest_layouts(model: ModelConfig, tp: int, pp: int, world_size: int, count: int = 3, **kwargs) -> list[Layout]:
    """Valid layouts on the same world size, nearest first (distance in powers of two of
    tp and pp, ties to the smaller tp)."""
    def distance(layout: Layout):
        return (abs(math.log2(layout.tp / tp)) + abs(math.log2(layout.pp / pp)), layout.tp, layout.pp)
    return sorted(valid_layouts(model, world_size, **kwargs), key=distance)[:count]


def check_layout(model: ModelConfig, tp: int, pp: int, world_size: int, zero_stage: int = 0,
                 sequence_parallel: bool = False, seq_len: int = 0, vocab_size: int = 0) -> Layout:
    """The layout, or LayoutError with one line: what does not divide, and what would."""
    kwargs = dict(zero_stage=zero_stage, sequence_parallel=sequence_parallel, seq_len=seq_len,
                  vocab_size=vocab_size)
    problems = layout_problems(model, tp, pp, world_size, **kwargs)
    if not problems:
        return Layout(tp, pp, world_size // (tp * pp))
    near = nearest_layouts(model, max(tp, 1), max(pp, 1), world_size, **kwargs)
    hint = ("nearest valid layouts: " + ", ".join(map(str, near))) if near else \
        f"no tp x pp layout fits {world_size} processes"
    dp = world_size // (tp * pp) if tp >= 1 and pp >= 1 and world_size % (tp * pp) == 0 else "?"
    raise LayoutError(f"parallel layout tp={tp} pp={pp} dp={dp} on {world_size} processes: "
                      + "; ".join(problems) + f"; {hint}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
