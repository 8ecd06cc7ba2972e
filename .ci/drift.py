"""Installed versions against a pip constraints file (`name==version` lines).

    python .ci/drift.py .ci/tested.txt            # says which installed releases differ from the last tested
    python .ci/drift.py .ci/oldest.txt --exact    # exit 1 unless every listed package is at that version
"""
import argparse
import importlib.metadata
import re
import sys

from packaging.utils import canonicalize_name


def pinned(path: str) -> dict[str, str]:
    pins = {}
    for line in open(path):
        line = line.split("#", 1)[0].strip()
        if match := re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line):
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name).split("+")[0]
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("constraints")
    parser.add_argument("--exact", action="store_true", help="fail unless every pin is what is installed")
    args = parser.parse_args()
    differ = [(name, want, installed(name)) for name, want in pinned(args.constraints).items()
              if installed(name) != want.split("+")[0]]
    for name, want, have in differ:
        print(f"{name}: {have or 'absent'} installed, {want} in {args.constraints}")
    if not differ:
        print(f"every version in {args.constraints} is installed")
    elif not args.exact:
        print(f"(the suite below says whether these pass; when they do, record them: "
              f"pip freeze --exclude-editable | sed 's/+cpu$//' > {args.constraints})")
    return 1 if differ and args.exact else 0


if __name__ == "__main__":
    sys.exit(main())
