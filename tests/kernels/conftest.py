"""Kernel tests run every Triton kernel on CPU in Triton's interpreter (fp32 only).

TRITON_INTERPRET must be set before a kernel is defined (triton.jit reads it when it
decorates), so it is set here at import time. pytest imports this file when it
collects tests/kernels, before any kernel test runs; the Triton kernel modules are
imported lazily by kernels.ops, and any that another test imported earlier without
the interpreter are dropped from sys.modules so that they are defined again under it.

Run: `pytest tests/kernels` (or `pytest tests/`) from the repo root; no GPU needed.
Equivalent by hand: `TRITON_INTERPRET=1 pytest tests/kernels`.

On a GPU machine, `STRATA_GPU_TESTS=1 pytest tests/kernels` runs instead the compiled
kernels on CUDA (tests/kernels/test_gpu.py: fp32 and bf16, autocast) and deselects the
interpreter tests; without it test_gpu.py is deselected.
"""
import os
import sys

GPU_MODE = os.environ.get("STRATA_GPU_TESTS") == "1"

if not GPU_MODE:
    os.environ["TRITON_INTERPRET"] = "1"
    for _name, _mod in list(sys.modules.items()):
        if _name.startswith("strata.kernels.") and "triton" in getattr(_mod, "__dict__", {}):
            del sys.modules[_name]

sys.path.insert(0, os.path.dirname(__file__))  # for kernel_helpers, whichever way pytest was invoked


def pytest_collection_modifyitems(config, items):
    """Interpreter tests and GPU tests are two suites: run one, deselect the other."""
    here = os.path.dirname(__file__)
    keep, drop = [], []
    for item in items:
        in_kernels = str(item.fspath).startswith(here)
        on_gpu_file = os.path.basename(str(item.fspath)) == "test_gpu.py"
        (drop if in_kernels and on_gpu_file != GPU_MODE else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
