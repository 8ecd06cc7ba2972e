"""How a Strata process uses the host's cores and memory when it trains on the CPU.

    short_omp_spinning()       # launcher/cli.py, before anything imports torch
    keep_freed_memory()        # then, for `strata train` on a machine without CUDA

Both are measured on the 2-core VM in docs/BENCHMARKS.md (the embedded default's section); tokens/s
of the tiny model's training step, two threads:

| | idle cores (load ~1.4) | 2 busy processes beside it (load ~3.6) |
| --- | --- | --- |
| libgomp's default (spin 300,000 rounds) | 9,294 | 451 |
| GOMP_SPINCOUNT=1000 (what Strata sets) | 9,090 | 3,555 |
| OMP_WAIT_POLICY=PASSIVE (no spinning) | 8,312 | 3,223 |
| one thread | - | 4,013 |

- OpenMP's waiting threads. Between two parallel regions PyTorch's OpenMP threads spin before
  they sleep (libgomp: 300,000 rounds unless told otherwise). On cores that other processes
  share, a spinning thread takes the core from the one with work, and every region waits for the
  slowest thread: 8x slower than with short spins at the same load. A thousand rounds keep the
  idle-core speed within 2%, and under load did as well as threads that never spin. libgomp reads
  GOMP_SPINCOUNT once, when torch loads it, so it is set before the import; OMP_WAIT_POLICY or
  GOMP_SPINCOUNT in the environment are kept, and other OpenMP runtimes ignore the variable.
- glibc malloc. A training step frees and allocates the same few hundred MB of activations each
  step; by default glibc gives freed memory at the top of the heap back to the system once more
  than twice its (adaptive) mmap threshold is free, and serves blocks above that threshold with
  fresh mmaps, so every step pays page faults on memory it just had (about 45,000 a micro-batch
  on the tiny model). Blocks up to 32 MiB from the heap, and up to 1 GiB of freed heap kept:
  +14% tokens/s. Only where CUDA is absent (a GPU job's host memory is left to glibc), only with
  glibc, and not when GLIBC_TUNABLES already says something about malloc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 2**30


OMP_SPINCOUNT = "1000"


def short_omp_spinning(env=os.environ) -> None:
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        env["GOMP_SPINCOUNT"] = OMP_SPINCOUNT


def keep_freed_memory(env=os.environ) -> bool:
    """glibc's mallopt as above, on a machine without CUDA; whether it was applied."""
    if "glibc.malloc" in env.get("GLIBC_TUNABLES", ""):
        return False
    import torch

    if torch.cuda.is_available():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
