"""The setup part: the wheels ../shared/gpu/wheels.sh built, installed with `pip install --no-index
--no-deps --target SITE`, mamba_ssm's package copied from its sdist, and Strata itself importable as
`strata` from SITE without pip (the GPU machine has no network and no install of this checkout)."""
from __future__ import annotations

import importlib.util
import shutil
import sys
import tarfile
import time
import tomllib
from pathlib import Path

from bench.gpu.budget import ESTIMATE
from bench.gpu.commands import REPO, commands, wheel_files

WHEELS_SH = REPO.parent / "shared" / "gpu" / "wheels.sh"
# What ../shared/gpu/wheels.sh leaves in the wheel folder (name, version): the dry run checks this list
# against the script and the folder.
WHEELS = [("megatron_core", "0.16.1"), ("hjson", "3.1.0"), ("pydantic", "2.14.4"), ("pydantic_core", "2.50.5"),
          ("annotated_types", None), ("typing_inspection", None), ("zstandard", None),
          ("liger_kernel", "0.8.5"), ("fla_core", "0.6.0"), ("torchao", "0.18.0"), ("cut_cross_entropy", "25.1.1"),
          ("deepspeed", "0.19.8")]
MAMBA_SDIST = ("mamba_ssm", "2.3.2.post1")


def strata_folders() -> list[str]:
    """The repository's folders that are strata's packages (strata.launcher is launcher/, ...): the top
    level of pyproject.toml's package list, which setuptools maps with package-dir {"strata": "."}."""
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    return [name.split(".")[1] for name in packages if name.count(".") == 1]


def link_strata(site: str | Path) -> Path:
    """SITE/strata/ holding a link per folder to this checkout's (launcher -> REPO/launcher, ...), with
    no __init__.py: a namespace package, as the install's, so that PYTHONPATH=SITE imports strata.* from
    this tree without pip. A stale link is replaced; a real folder there is left alone."""
    root = Path(site) / "strata"
    root.mkdir(parents=True, exist_ok=True)
    for name in strata_folders():
        link, target = root / name, REPO / name
        if link.is_symlink() and link.resolve() != target.resolve():
            link.unlink()
        if not link.exists() and not link.is_symlink():
            link.symlink_to(target, target_is_directory=True)
    return root


def importable_strata(site: str) -> None:
    """This process imports strata: from its install where there is one, else from SITE's links (put
    last on sys.path, so that the wheels there stand in for nothing already installed)."""
    if importlib.util.find_spec("strata") is None:
        link_strata(site)
        sys.path.append(str(site))


class SetupPart:
    """Suite's setup part (a mixin of Suite: uses args, run, say, row, times and status)."""

    def setup(self) -> None:
        args = self.args
        started = time.time()
        files = wheel_files(args)
        marker = Path(args.site) / ".gpu_suite_wheels"
        listing = "\n".join(Path(f).name for f in files)
        sdist = Path(args.wheels) / f"{MAMBA_SDIST[0]}-{MAMBA_SDIST[1]}.tar.gz"
        if not files:
            self.status["setup"] = (f"no wheels in {args.wheels}: run ../shared/gpu/wheels.sh {args.wheels} "
                                    "where pip works")
        elif marker.is_file() and marker.read_text() == listing:
            self.status["setup"] = "ok (installed before)"
        else:
            cmd = commands(args, None, 0)["setup"][:-1] + files
            status = self.run("setup", cmd, ESTIMATE["setup"] * 6)
            if status == "ok" and sdist.is_file():
                with tarfile.open(sdist) as t:
                    top = f"{MAMBA_SDIST[0]}-{MAMBA_SDIST[1]}/mamba_ssm/"
                    members = [m for m in t.getmembers() if m.name.startswith(top)]
                    for m in members:
                        m.name = m.name[len(top) - len("mamba_ssm/"):]
                    shutil.rmtree(Path(args.site) / "mamba_ssm", ignore_errors=True)
                    t.extractall(args.site, members=members, filter="data")
                marker.write_text(listing)
            elif status == "ok":
                self.status["setup"] = f"ok, but no {sdist.name}: mamba_ssm rows will say not installed"
        self.times["setup"] = time.time() - started
        self.say(f"setup: {self.status['setup']} ({len(files)} wheels)")
        self.row("setup", f"{len(files)} wheels + mamba_ssm sources", "pip --target " + args.site,
                 f"{self.times['setup']:.0f} s", note=self.status["setup"])
