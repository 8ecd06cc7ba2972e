"""The tests part: STRATA_GPU_TESTS=1 pytest tests/kernels/test_gpu.py, the compiled kernels against the
references, pass/fail counts per dtype (bench/gpu/plugin.py counts them); beside it, on other cores, the
peers' kernels compiled once and the training corpus prepared."""
from __future__ import annotations

import json
import time
from pathlib import Path

from bench.gpu.budget import ESTIMATE
from bench.gpu.commands import commands


class TestsPart:
    """Suite's tests part (a mixin of Suite: uses args, work, start, finish, left, say, row, times and status)."""

    def side_by_side(self, cfg, corpus: str | None) -> None:
        """The tests, the peers' compilations and the corpus at once: none of them is timed."""
        args = self.args
        cmds = commands(args, corpus, cfg.data.vocab_size)
        jobs = {}
        started = time.time()
        wanted = (["tests"] if "tests" in args.parts else []) + \
                 (["warm mamba_ssm", "warm fla, liger"] if "kernels" in args.parts else []) + \
                 (["corpus"] if corpus and "train" in args.parts and not (Path(corpus) / "manifest.json").is_file()
                  else [])
        if not wanted:
            return
        limits = {name: min(3 * ESTIMATE[name] if name in ("tests", "corpus") else 1.5 * ESTIMATE[name],
                            self.left()) for name in wanted}
        for name in wanted:
            env = {"STRATA_GPU_TESTS": "1", "STRATA_GPU_SUITE_TESTS_JSON": str(self.work / "tests.json")} \
                if name == "tests" else {}
            jobs[name] = self.start(name, cmds[name], env)
        self.say(f"side by side: {', '.join(wanted)}")
        running = dict(jobs)
        while running:
            time.sleep(0.5)
            for name, (proc, log) in list(running.items()):
                if proc.poll() is not None or time.time() - started > limits[name]:
                    self.finish(name, proc, log, started, limits[name])
                    self.say(f"{name}: {self.status[name]} in {self.times[name]:.0f} s")
                    del running[name]
        if "tests" in jobs:
            self.test_rows()

    def test_rows(self) -> None:
        path = self.work / "tests.json"
        wall = f"{self.times['tests']:.0f} s (whole file)"
        if not path.is_file():
            self.row("tests", "tests/kernels/test_gpu.py", "pytest", wall, goal="all pass: no result",
                     note=f"{self.status['tests']}; see gpu_suite.log")
            return
        data = json.loads(path.read_text())
        self.results["parts"]["tests"] = data
        for label in ("bf16", "fp32"):
            ids = [k for k, v in data["labels"].items() if v == label]
            counts = {o: sum(1 for k in ids if data["outcomes"].get(k) == o) for o in ("passed", "failed", "skipped")}
            missing = sum(1 for k in ids if k not in data["outcomes"])
            failed = counts["failed"] + missing
            text = f"{counts['passed']} passed, {failed} failed" + (f", {counts['skipped']} skipped"
                                                                     if counts["skipped"] else "")
            self.row("tests", f"tests/kernels/test_gpu.py, {label}", "compiled Triton on CUDA",
                     wall if label == "bf16" else "", note=text,
                     goal="all pass: " + ("met" if not failed and counts["passed"] else f"missed ({failed} failed)"))
