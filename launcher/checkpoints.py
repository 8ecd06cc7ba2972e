"""`strata checkpoint verify RUN_OR_CKPT`: check a run's checkpoints against their manifests
(every file's size and CRC32) without loading them.

    strata checkpoint verify runs/tiny                              # every checkpoint of the run
    strata checkpoint verify runs/tiny/checkpoints/step_00000100    # one checkpoint

Exit code 0 when every complete checkpoint verifies, 1 when one does not (each problem is one
line naming the file), 2 for a bad argument.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from strata.launcher.errors import FAILURE_EXIT


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="strata checkpoint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="action", required=True)
    verify = sub.add_parser("verify", help="check checkpoints against their manifests without loading them")
    verify.add_argument("path", help="a run directory, its checkpoints/ directory, or one step directory")
    return p.parse_args(argv)


def checkpoints_under(path: Path) -> tuple[list[Path], list[Path]]:
    """(complete checkpoints, other entries worth naming: unfinished saves and set-aside damaged ones)."""
    from strata.parallel.checkpoint.files import DAMAGED_SUFFIX, STEP_DIR, complete_checkpoints

    if STEP_DIR.match(path.name):
        return [path], []
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    others = sorted(p for p in root.iterdir() if p.name.startswith("step_") and p.name.endswith((".tmp", DAMAGED_SUFFIX)))
    return complete_checkpoints(root), others


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from strata.parallel.checkpoint.files import DAMAGED_SUFFIX, read_manifest, verify

    path = Path(args.path)
    if not path.is_dir():
        print(f"error: {path} is not a directory; give a run directory or a checkpoint step directory", file=sys.stderr)
        return FAILURE_EXIT
    complete, others = checkpoints_under(path)
    if not complete:
        print(f"error: {path} holds no complete checkpoint", file=sys.stderr)
        return FAILURE_EXIT
    damaged = 0
    for ckpt in complete:
        problems = verify(ckpt)
        if problems:
            damaged += 1
            for problem in problems:
                print(f"{ckpt}: DAMAGED: {problem}")
            continue
        files = read_manifest(ckpt).get("files")
        if files is None:
            print(f"{ckpt}: complete, no checksums (written before Strata recorded them)")
        else:
            size = sum(f["bytes"] for f in files.values()) / 2**20
            print(f"{ckpt}: ok ({len(files)} files, {size:.1f} MiB)")
    for other in others:
        what = "set aside as damaged" if other.name.endswith(DAMAGED_SUFFIX) else \
            "unfinished save (removed when the run next starts)"
        print(f"{other}: {what}")
    print(f"{len(complete) - damaged} of {len(complete)} checkpoints verify")
    return FAILURE_EXIT if damaged else 0


if __name__ == "__main__":
    raise SystemExit(main())
