"""The dry run, on CPU: every file and entry point the parts use, the wheel list against wheels.sh and the
wheel folder, each peer's calls against its sources, strata importable from SITE's links alone, every
training run's config and plan; then every command and the time budget."""
from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

from bench.gpu.budget import H100_GIB, print_budget
from bench.gpu.commands import KERNEL_BENCH, REPO, commands, load_bench, py, shown
from bench.gpu.part_setup import MAMBA_SDIST, WHEELS, WHEELS_SH, link_strata, strata_folders
from bench.gpu.runs import (corpus_dir, global_batch, plan_runs, profile_of, run_dir_name, train_command_for,
                            train_runs)


class Checks:
    def __init__(self):
        self.failed = 0

    def line(self, status: str, what: str) -> None:
        if status == "FAIL":
            self.failed += 1
        print(f"  {status:4s} {what}", flush=True)


def wheels_in_script() -> list[tuple[str, str | None]] | None:
    """The (name, version) pairs ../shared/gpu/wheels.sh fetches, normalised as wheel file names are."""
    if not WHEELS_SH.is_file():
        return None
    text = WHEELS_SH.read_text()
    found = []
    for m in re.finditer(r"pip (?:download|wheel)\b(.*?)(?:\n(?!\s)|$)", text, re.S):
        for token in m.group(1).replace("\\\n", " ").split():
            if token.startswith(("-", "$", '"')) or "=" in token and "==" not in token:
                continue
            name, _, version = token.partition("==")
            if re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", name):
                found.append((name.replace("-", "_").lower(), version or None))
    return found


def check_wheels(args, checks: Checks) -> None:
    script = wheels_in_script()
    expected = {n: v for n, v in WHEELS} | {MAMBA_SDIST[0]: MAMBA_SDIST[1]}
    if script is None:
        checks.line("note", f"{WHEELS_SH} not found: the wheel list is the suite's own ({len(expected)} files)")
    else:
        got = dict(script)
        if got != expected:
            missing = sorted(set(got) - set(expected)) + [f"{n}=={v}" for n, v in got.items() if n in expected and
                                                          expected[n] != v]
            extra = sorted(set(expected) - set(got))
            checks.line("FAIL", f"wheel list differs from {WHEELS_SH.name}: suite lacks {missing or '-'}, "
                                f"script lacks {extra or '-'}")
        else:
            checks.line("ok", f"wheel list = what {WHEELS_SH.name} fetches ({len(expected)} files)")
    folder = Path(args.wheels)
    if not folder.is_dir():
        checks.line("note", f"wheel folder {folder} absent: build it with `../shared/gpu/wheels.sh {args.wheels}` "
                            f"(needs the network; carry it with the device call)")
        return
    files = [p.name for p in folder.iterdir()]
    for name, version in [*WHEELS, MAMBA_SDIST]:
        pattern = f"{name}-{version or ''}"
        hits = [f for f in files if f.lower().startswith(pattern.lower()) and
                (f.endswith(".whl") or f.endswith(".tar.gz"))]
        if len(hits) == 1:
            continue
        checks.line("FAIL", f"{folder}: {len(hits)} files for {name} {version or ''} ({', '.join(hits) or 'none'}); "
                            f"run ../shared/gpu/wheels.sh {args.wheels}")
        return
    size = sum((folder / f).stat().st_size for f in files) / 2**20
    checks.line("ok", f"{folder}: all {len(WHEELS) + 1} files ({size:.0f} MiB)")


def source_of(archive: Path, path: str) -> str | None:
    """The text of `path` (a/b.py) inside a wheel or an sdist (under its top folder), or None."""
    if archive.name.endswith(".whl"):
        with zipfile.ZipFile(archive) as z:
            return z.read(path).decode() if path in z.namelist() else None
    with tarfile.open(archive) as t:
        for member in t.getmembers():
            if member.name.split("/", 1)[-1] == path:
                return t.extractfile(member).read().decode()
    return None


def parameters(tree: ast.Module, name: str) -> list[str] | None:
    """The parameter names of function `name` or method `Class.method` defined in `tree`."""
    *outer, leaf = name.split(".")
    body = tree.body
    for cls in outer:
        node = next((n for n in body if isinstance(n, ast.ClassDef) and n.name == cls), None)
        if node is None:
            return None
        body = node.body
    fn = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == leaf), None)
    if fn is None:
        return None
    a = fn.args
    return [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)] + (["**"] if a.kwarg else [])


def check_peers(args, checks: Checks) -> None:
    peers = load_bench("kernel_peers").PEERS
    folder = Path(args.wheels)
    for package, spec in peers.items():
        archive = folder / spec["dist"]
        for module, name, params in spec["calls"]:
            line = f"from {module} import {name.split('.')[0]}"
            try:
                ast.parse(line)
            except SyntaxError as e:
                checks.line("FAIL", f"{line}: {e}")
                continue
            if not archive.is_file():
                checks.line("ok", f"{line} (parses; {archive} absent, its source not checked)")
                continue
            rel = module.replace(".", "/")
            text = source_of(archive, rel + ".py") or source_of(archive, rel + "/__init__.py")
            if text is None:
                checks.line("FAIL", f"{line}: no {rel}.py in {archive.name}")
                continue
            have = parameters(ast.parse(text), name)
            if have is None:
                checks.line("FAIL", f"{line}: {name} is not defined in {rel}.py of {archive.name}")
                continue
            lacking = [p for p in params if p not in have]
            if lacking and "**" not in have:
                checks.line("FAIL", f"{module}.{name}: no parameter {', '.join(lacking)} in {archive.name}")
            else:
                checks.line("ok", f"{module}.{name}({', '.join(params)}) in {archive.name}")


def check_tree(args, checks: Checks) -> None:
    for path in ("tests/kernels/test_gpu.py", "tests/kernels/conftest.py", KERNEL_BENCH, "bench/train_gpu.py",
                 "bench/profile_steps.py"):
        found = (REPO / path).is_file()
        checks.line("ok" if found else "FAIL", f"{path} {'found' if found else 'missing'}")
    conftest_path = REPO / "tests/kernels/conftest.py"
    conftest = conftest_path.read_text() if conftest_path.is_file() else ""
    checks.line("ok" if "STRATA_GPU_TESTS" in conftest else "FAIL",
                "tests/kernels/conftest.py selects the GPU tests with STRATA_GPU_TESTS=1")
    bench = (REPO / KERNEL_BENCH).read_text()
    flags = ["--warm-peers", "--only-peers", "--json", "--no-compile", "--peak-tflops", "--hbm-tbs", "--batch"]
    lacking = [f for f in flags if f'"{f}"' not in bench]
    checks.line("FAIL" if lacking else "ok", f"{KERNEL_BENCH} takes {' '.join(flags)}" +
                (f" (lacks {' '.join(lacking)})" if lacking else ""))
    train = ast.parse((REPO / "launcher/train.py").read_text())
    saves = any(isinstance(n, ast.FunctionDef) and n.name == "save" for n in train.body)
    calls = any(isinstance(n, ast.Call) and getattr(n.func, "id", "") == "save" for n in ast.walk(train))
    checks.line("ok" if saves and calls else "FAIL",
                "launcher/train.py calls its module-level save(run): bench/train_gpu.py's --no-save entry replaces it")
    steps = any(isinstance(n, ast.FunctionDef) and n.name == "train_step" for n in train.body)
    profiled = "profile_steps" in load_bench("train_gpu").NO_SAVE_ENTRY
    checks.line("ok" if steps and profiled else "FAIL",
                "bench/train_gpu.py's entry profiles launcher/train.py's module-level train_step(run) when asked")
    sources = (REPO / "launcher/train.py").read_text() + (REPO / "launcher/metrics.py").read_text()
    keys = ["tokens_per_s", "tflops_per_gpu", "peak_memory_gib", "step_time_s", "mfu_percent"]
    lacking = [k for k in keys if f'"{k}"' not in sources]
    checks.line("FAIL" if lacking else "ok", "metrics.jsonl records " + ", ".join(keys) +
                (f" (lacks {', '.join(lacking)})" if lacking else ""))
    found = importlib.util.find_spec("bench.gpu.plugin") is not None if str(REPO) in sys.path else True
    checks.line("ok" if found else "FAIL", "pytest loads bench/gpu/plugin.py as the plugin bench.gpu.plugin "
                                           "(counts per dtype)")
    import strata.kernels
    import strata.launcher.metrics  # noqa: F401  (what the peak part imports; it reaches the kernels package)
    where = [Path(p).resolve() for p in strata.kernels.__path__]
    shadows = sorted(str(p.relative_to(REPO)) for p in (REPO / "bench").rglob("kernels*")
                     if p.stem == "kernels" and (p.suffix == ".py" or p.is_dir()))
    checks.line("ok" if REPO / "kernels" in where and not shadows else "FAIL",
                f"strata.kernels is {REPO / 'kernels'}; no bench module stands in for Hugging Face's kernels "
                f"(transformers imports it) when bench/ is first on sys.path" +
                (f" ({', '.join(shadows)} does)" if shadows else ""))


STRATA_PROBE = "import strata, strata.kernels.ops as ops; print(list(strata.__path__)[0]); print(ops.__file__)"


class StrataProbe:
    """strata.kernels.ops imported as on the GPU machine, beside the other checks: from a temporary SITE
    that link_strata fills, by `python -S` (no .pth file runs: no install of this checkout counts) with the
    site-packages folders of this process's sys.path on PYTHONPATH after SITE, for torch."""

    def __enter__(self) -> StrataProbe:
        self.tmp = tempfile.TemporaryDirectory(prefix="gpu_suite_site_")
        link_strata(self.tmp.name)
        packages = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([self.tmp.name, *packages])}
        self.proc = subprocess.Popen([py(), "-S", "-c", STRATA_PROBE], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        return self

    def check(self, checks: Checks) -> None:
        try:
            out, err = self.proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        got = out.split()
        ok = (self.proc.returncode == 0 and len(got) == 2 and
              Path(got[0]).resolve() == (Path(self.tmp.name) / "strata").resolve() and
              Path(got[1]).resolve() == REPO / "kernels" / "ops.py")
        why = "" if ok else ": " + ((err.strip().splitlines() or ["no output"])[-1] if self.proc.returncode
                                    else " ".join(got))
        checks.line("ok" if ok else "FAIL", f"PYTHONPATH=SITE imports strata.kernels.ops from this checkout through "
                                            f"SITE/strata's links alone (python -S: no install counts){why}")

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:  # the dry run ended before its check
            self.proc.kill()
        self.proc.communicate()
        self.tmp.cleanup()


def dry_run(args) -> int:
    with StrataProbe() as probe:
        return checked(args, probe)


def checked(args, probe: StrataProbe) -> int:
    t0 = time.time()
    checks = Checks()
    print(f"GPU suite dry run: {args.config}, budget {args.budget:.0f} s, parts {','.join(args.parts)}")
    print("files and entry points:")
    check_tree(args, checks)
    print("wheels:")
    check_wheels(args, checks)
    print("peers (import lines, and signatures in the wheels' sources where present):")
    check_peers(args, checks)
    print("training runs (launcher.config.load_config; the memory plan, launcher.plan.predicted_peak):")
    from strata.launcher.config import ConfigError, load_config
    cfg = load_config(REPO / args.config, args.overrides)
    args.seq_len = cfg.train.seq_len
    corpus = corpus_dir(args, cfg)
    runs = train_runs(args, corpus)
    try:
        plan_runs(args, runs)
    except ConfigError as e:
        checks.line("FAIL", f"{args.config} with a training run's overrides: {e}")
        return finish_dry_run(checks, t0)
    for run in runs:
        plan = "plan n/a" if run.planned_gib is None else f"plan {run.planned_gib:.1f} GiB"
        status = "FAIL" if run.planned_gib is not None and run.plan_note else "ok"
        over = "" if run.planned_gib is None or run.planned_gib <= H100_GIB else \
            f" (over the {H100_GIB} GiB of an H100: left out there, runs on an H200)"
        note = f"; {run.plan_note}" if run.plan_note else ""
        checks.line(status, f"{run.name}: {run.steps} steps x {global_batch(args)} x "
                            f"{cfg.train.seq_len} tokens, {run.flops_per_token / 1e9:.2f} GFLOP/token, "
                            f"{plan}{note}{over}")
    print("commands:")
    print(f"  [strata] {args.site}/strata/{{{','.join(strata_folders())}}}: links to this checkout's folders, "
          f"before every part (no pip install)")
    probe.check(checks)
    cmds = commands(args, corpus, cfg.data.vocab_size)
    env = {"PYTHONPATH": f"{args.site}:$PWD"}
    for name, cmd in cmds.items():
        extra = {"STRATA_GPU_TESTS": "1"} if name == "tests" else {}
        print(f"  [{name}] {shown(cmd, {**extra, **env} if name != 'setup' else {})}")
        if name == "setup":
            sdist = f"{args.wheels}/{MAMBA_SDIST[0]}-{MAMBA_SDIST[1]}.tar.gz"
            print(f"  [setup] then mamba_ssm/ of {sdist} into {args.site}")
    for run in runs:
        cmd = train_command_for(args, run, Path(args.work) / "runs" / run_dir_name(run))
        profiled = load_bench("train_gpu").profile_env(profile_of(args, run, Path("$OUT")))
        print(f"  [train {run.name}] {shown(cmd, {'STRATA_KERNELS': run.backend, **profiled, **env})}")
    print("time budget (estimates for one H100; the suite re-estimates with what it measures):")
    total = print_budget(args, runs)
    if total > args.budget:
        checks.line("FAIL", f"estimated {total:.0f} s > --budget {args.budget:.0f} s: fewer --steps / --ref-steps")
    return finish_dry_run(checks, t0)


def finish_dry_run(checks: Checks, t0: float) -> int:
    verdict = "FAILED" if checks.failed else "passed"
    print(f"dry run {verdict} ({checks.failed} failed) in {time.time() - t0:.1f} s")
    return 1 if checks.failed else 0
