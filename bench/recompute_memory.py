"""Activation memory per block kind under train.recompute none / selective / full: the bytes per
token that autograd keeps for the backward of one block (distinct storages of the saved tensors,
counted with torch.autograd.graph.saved_tensors_hooks; parameters excluded). Prints a markdown
table (docs/PARALLEL.md, "Activation recompute").

    python bench/recompute_memory.py                                    # configs/hybrid-1b3.yaml
    python bench/recompute_memory.py --config configs/tiny.yaml --seq-len 256

On CPU in fp32 with the PyTorch reference kernels; one block of each kind, built alone (the
model's other blocks are never allocated). Under bf16 autocast the matmul outputs are bf16 (half
these bytes) and the Triton kernels save less than the references inside a core, so 'none'
shrinks on GPU while 'selective' and 'full', which keep only tensors at the cores' edges, scale
with the dtype alone.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MODES = ("none", "selective", "full")


def block_bytes_per_token(block, d_model: int, seq_len: int, batch: int = 1) -> dict[str, float]:
    """{mode: bytes per token} of one block (a model.hybrid.Block) under each recompute mode."""
    from strata.model.memory import saved_bytes
    from strata.parallel.engine.parallelize import apply_recompute

    x = torch.randn(batch, seq_len, d_model, requires_grad=True)
    result = {}
    for mode in MODES:
        apply_recompute(block, [mode] * (block.layer_idx + 1))
        result[mode] = saved_bytes(block, x, exclude=block.parameters()) / (batch * seq_len)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/hybrid-1b3.yaml")
    p.add_argument("--seq-len", type=int, default=512)
    args = p.parse_args()
    from strata.launcher.config import load_config
    from strata.model.hybrid import Block

    cfg = load_config(args.config).model
    torch.manual_seed(0)
    print(f"{args.config}: d_model={cfg.d_model}, seq_len={args.seq_len}, fp32 on CPU (reference kernels); "
          "bytes per token kept for the backward by one block\n")
    print("| block | none | selective | full | selective / none | full / none |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    firsts = {}
    for spec in cfg.blocks():
        firsts.setdefault(spec.kind, spec)
    for kind, spec in firsts.items():
        b = block_bytes_per_token(Block(spec, cfg), cfg.d_model, args.seq_len)
        print(f"| `{kind}` | {b['none']:,.0f} | {b['selective']:,.0f} | {b['full']:,.0f} | "
              f"{b['selective'] / b['none']:.2f} | {b['full'] / b['none']:.2f} |")


if __name__ == "__main__":
    main()
