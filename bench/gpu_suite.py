"""The GPU suite's command line; the suite is the package bench/gpu/ (its docstring says each part).

    python3 bench/gpu_suite.py                 # on the GPU machine, from the repo root, the wheels in .whl
    python3 bench/gpu_suite.py --dry-run       # anywhere, on CPU: checks every step, prints commands and budget
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Run as a script, bench/ comes first on sys.path, where a bench module would stand in for a top-level
# package of its name (bench/data.py for any `data`): the repo root instead, for bench.gpu.
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() not in (REPO / "bench", REPO)]

from bench.gpu.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
