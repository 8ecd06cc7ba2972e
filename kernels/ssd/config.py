"""Block sizes and launch options of the SSD kernels, chosen by a plain function (no
autotune: the interpreter cannot run it, and a fixed choice keeps runs reproducible).

`OVERRIDES[kernel]` (a dict) replaces entries of the default for that kernel; the
benchmark uses it to compare variants on a GPU within one run.
"""
from __future__ import annotations

from strata.kernels.triton_utils import interpreting, next_pow2

OVERRIDES: dict[str, dict] = {}


def blocks(kernel: str, chunk_size: int, headdim: int, dstate: int) -> dict:
    """Meta-parameters for one SSD kernel; every block is a power of two >= 16, capped by the problem."""
    L, P, N = next_pow2(chunk_size), next_pow2(headdim), next_pow2(dstate)
    if interpreting():
        # Tiles of 64 at most: large shapes exercise the multi-tile paths, small ones stay quick.
        L, P, N = min(L, 64), min(P, 64), min(N, 64)
    # GPU defaults: from a sweep on an H100 (bench/kernel_speed.py --sweep), bf16, headdim 64, d_state 128, chunk 256.
    if kernel in ("state_fwd", "state_bwd"):
        cfg = dict(BLOCK_P=min(P, 64), BLOCK_N=min(N, 128), BLOCK_K=min(L, 64), num_warps=4, num_stages=3)
    elif kernel == "bmm":
        cfg = dict(BLOCK_M=min(L, 64), BLOCK_K=min(N, 64), num_warps=4, num_stages=2)
    elif kernel == "scan_fwd":
        cfg = dict(BLOCK_M=min(L, 128), BLOCK_N=min(P, 64), BLOCK_K=min(N, 128), BLOCK_S=min(L, 32),
                   num_warps=4, num_stages=2)
    elif kernel == "dx":
        cfg = dict(BLOCK_M=min(L, 128), BLOCK_N=min(P, 64), BLOCK_K=min(N, 128), BLOCK_S=min(L, 32),
                   num_warps=8, num_stages=2)
    elif kernel == "dcb":
        cfg = dict(BLOCK_M=min(L, 64), BLOCK_K=min(P, 64), num_warps=4, num_stages=2)
    elif kernel == "dbc":
        cfg = dict(BLOCK_M=min(L, 64), BLOCK_N=min(N, 64), BLOCK_P=min(P, 64), BLOCK_S=min(L, 32),
                   num_warps=4, num_stages=2)
    else:
        raise KeyError(kernel)
    cfg.update(OVERRIDES.get(kernel, {}))
    if interpreting():
        cfg.pop("num_stages", None)
    return cfg
