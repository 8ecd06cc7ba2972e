"""Layout validation: does TP x CP x PP x DP fit this model and this world size?

Runs on the config alone, before any process group exists, so a bad layout costs one
line on stderr, not a hung job:

    check_layout(cfg.model, tp=4, pp=2, world_size=8)
    -> LayoutError: parallel layout tp=4 pp=2 dp=1 on 8 processes: mamba.ngroups=2 is not
       divisible by tp=4; nearest valid layouts: tp=2 pp=2 dp=2, tp=2 pp=4 dp=1, tp=1 pp=2 dp=4

Every rule here mirrors a split made in parallel/tensor/blocks.py (heads, groups, MLP
widths and structured factors, vocabulary), parallel/pipeline/stages.py (blocks per stage) or
parallel/context/ (the sequence's pieces).
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
    cp: int = 1
    """Context-parallel ranks per sequence; dp counts data-parallel ranks without them."""

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    def __str__(self) -> str:
        cp = f" cp={self.cp}" if self.cp > 1 else ""
        return f"tp={self.tp}{cp} pp={self.pp} dp={self.dp}"

    def describe(self) -> str:
        params = "" if self.param_dtype == "fp32" else f" params={self.param_dtype}"
        cp = f" cp={self.cp}" if self.cp > 1 else ""
        return f"world={self.world_size} tp={self.tp}{cp} pp={self.pp} zero={self.zero_stage}{params}"

    def record(self) -> dict:
        """As a checkpoint's manifest stores it (cp only where > 1: earlier records read as cp = 1)."""
        record = {"world_size": self.world_size, "tp": self.tp, "pp": self.pp, "zero_stage": self.zero_stage}
        record |= {} if self.cp == 1 else {"cp": self.cp}
        return record | ({} if self.param_dtype == "fp32" else {"param_dtype": self.param_dtype})

    @classmethod
    def from_record(cls, record: dict) -> "Layout":
        tp, pp, cp = record.get("tp", 1), record.get("pp", 1), record.get("cp", 1)
        return cls(tp, pp, record["world_size"] // (tp * pp * cp), record.get("zero_stage", 0),
                   record.get("param_dtype", "fp32"), cp)

    def reloads_as_written(self, saved: "Layout") -> bool:
        """DeepSpeed reloads its own files: same TP, PP, ZeRO stage and parameter dtype, and the
        same world size unless nothing is partitioned over data-parallel ranks (ZeRO 0). CP is not
        compared: it shards no parameter, and DeepSpeed partitions ZeRO's states over the CP and DP
        ranks together, so the same world size means the same partitions whatever the CP size."""
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


def context_problems(model: ModelConfig, cp: int, seq_len: int) -> list[str]:
    """What parallel/context/ needs: 2 x cp pieces of the sequence, each holding a conv's halo."""
    if cp == 1:
        return []
    problems = []
    if seq_len:
        pieces = 2 * cp
        if seq_len % pieces:
            problems.append(f"train.seq_len={seq_len} is not divisible by 2 x cp = {pieces} (context-parallel pieces)")
        elif model.has(MAMBA_BLOCK) and seq_len // pieces < model.mamba.d_conv - 1:
            problems.append(f"train.seq_len={seq_len} gives pieces of {seq_len // pieces} tokens with cp={cp}, "
                            f"fewer than the conv's {model.mamba.d_conv - 1} before each; use a smaller cp")
    return problems


def layout_problems(model: ModelConfig, tp: int, pp: int, world_size: int, zero_stage: int = 0,
                    sequence_parallel: bool = False, seq_len: int = 0, vocab_size: int = 0, cp: int = 1) -> list[str]:
    """Everything that stops (tp, cp, pp) from running this model on world_size processes."""
    if tp < 1 or pp < 1 or cp < 1:
        return [f"tp, cp and pp must be >= 1, got tp={tp} cp={cp} pp={pp}"]
    problems = []
    if world_size % (tp * cp * pp):
        product = f"tp*cp*pp={tp * cp * pp}" if cp > 1 else f"tp*pp={tp * pp}"
        problems.append(f"world size {world_size} is not divisible by {product}")
    if tp > 1:
        problems += attention_problems(model, tp) if model.has(ATTENTION_BLOCK) else []
        problems += mamba_problems(model, tp) if model.has(MAMBA_BLOCK) else []
        problems += mlp_problems(model, tp) if model.has(MLP_BLOCK) else []
        if vocab_size:
            problems += _divides("vocab size", vocab_size, tp)
        if sequence_parallel and seq_len:  # SP splits the rank's seq_len / cp tokens
            what = "train.seq_len (sequence parallel)" if cp == 1 else f"train.seq_len / cp={cp} (sequence parallel)"
            problems += _divides(what, seq_len // cp, tp)
    problems += context_problems(model, cp, seq_len)
    if pp > model.n_blocks:
        problems.append(f"pp={pp} is more stages than the {model.n_blocks} blocks of the pattern")
    if pp > 1 and zero_stage > 1:
        problems.append(f"zero_stage={zero_stage} with pp={pp}: DeepSpeed's pipeline engine supports "
                        "ZeRO stage 0 or 1 only")
    return problems


def valid_layouts(model: ModelConfig, world_size: int, cp: int = 1, **kwargs) -> list[Layout]:
    """The tp x pp layouts beside the asked cp (a user who asked for cp keeps it)."""
    found = []
    if world_size % cp:
        return found
    for tp in _divisors(world_size // cp):
        for pp in _divisors(world_size // cp // tp):
            if not layout_problems(model, tp, pp, world_size, cp=cp, **kwargs):
                found.append(Layout(tp, pp, world_size // (tp * cp * pp), cp=cp))
    return found


def nearest_layouts(model: ModelConfig, tp: int, pp: int, world_size: int, count: int = 3, **kwargs) -> list[Layout]:
    """Valid layouts on the same world size, nearest first (distance in powers of two of
    tp and pp, ties to the smaller tp)."""
    def distance(layout: Layout):
        return (abs(math.log2(layout.tp / tp)) + abs(math.log2(layout.pp / pp)), layout.tp, layout.pp)
    return sorted(valid_layouts(model, world_size, **kwargs), key=distance)[:count]


def check_layout(model: ModelConfig, tp: int, pp: int, world_size: int, zero_stage: int = 0,
                 sequence_parallel: bool = False, seq_len: int = 0, vocab_size: int = 0, cp: int = 1) -> Layout:
    """The layout, or LayoutError with one line: what does not divide, and what would."""
    kwargs = dict(zero_stage=zero_stage, sequence_parallel=sequence_parallel, seq_len=seq_len,
                  vocab_size=vocab_size, cp=cp)
    problems = layout_problems(model, tp, pp, world_size, **kwargs)
    if not problems:
        return Layout(tp, pp, world_size // (tp * cp * pp), cp=cp)
    near = nearest_layouts(model, max(tp, 1), max(pp, 1), world_size, **kwargs)
    hint = ("nearest valid layouts: " + ", ".join(map(str, near))) if near else \
        f"no tp x pp layout fits {world_size} processes" + (f" with cp={cp}" if cp > 1 else "")
    model_ranks = tp * cp * pp
    dp = world_size // model_ranks if min(tp, pp, cp) >= 1 and world_size % model_ranks == 0 else "?"
    cp_text = f" cp={cp}" if cp != 1 else ""
    raise LayoutError(f"parallel layout tp={tp}{cp_text} pp={pp} dp={dp} on {world_size} processes: "
                      + "; ".join(problems) + f"; {hint}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
