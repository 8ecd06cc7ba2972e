"""The run on the GPU: Suite holds the deadline, starts each part's process (in a process group of its
own, ended past its time), keeps its log, and gathers the parts (bench/gpu/part_*.py) and the table."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

from bench.gpu.budget import RESERVE_S
from bench.gpu.commands import REPO, shown
from bench.gpu.part_kernels import KernelsPart
from bench.gpu.part_peak import PeakPart
from bench.gpu.part_setup import SetupPart
from bench.gpu.part_tests import TestsPart
from bench.gpu.part_train import TrainPart
from bench.gpu.table import Table


class Suite(SetupPart, TestsPart, PeakPart, KernelsPart, TrainPart, Table):
    def __init__(self, args):
        self.args = args
        self.t0 = time.time()
        self.deadline = self.t0 + args.budget
        self.work = Path(args.work)
        self.out = Path(args.out or REPO / "runs" / "gpu_suite")
        self.logs = self.work / "logs"
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([args.site, str(REPO)]), "PYTHONUNBUFFERED": "1"}
        self.times: dict[str, float] = {}
        self.status: dict[str, str] = {}
        self.results: dict = {"parts": {}, "train": []}
        self.rows: list[list[str]] = []
        self.logged: list[str] = []

    def left(self) -> float:
        return self.deadline - time.time() - RESERVE_S

    def say(self, text: str) -> None:
        print(f"[{time.time() - self.t0:5.0f} s] {text}", flush=True)

    def start(self, name: str, cmd: list[str], env: dict | None = None) -> tuple[subprocess.Popen, Path]:
        log = self.logs / (re.sub(r"[^A-Za-z0-9_.-]+", "-", name) + ".log")
        f = open(log, "w")
        f.write(f"$ {shown(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, env={**self.env, **(env or {})}, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        proc.log_file = f  # type: ignore[attr-defined]
        return proc, log

    def wait(self, name: str, proc: subprocess.Popen, log: Path, timeout: float, started: float) -> str:
        try:
            proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            pass
        return self.finish(name, proc, log, started, timeout)

    def finish(self, name: str, proc: subprocess.Popen, log: Path, started: float, timeout: float) -> str:
        """Record a part's process that has ended, or end it (its own process group) past its time."""
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this suite started for it, nothing else
            proc.wait()
            status = f"stopped after {timeout:.0f} s"
        else:
            status = "ok" if proc.returncode == 0 else f"exit code {proc.returncode}"
        proc.log_file.close()  # type: ignore[attr-defined]
        self.times[name] = time.time() - started
        self.status[name] = status
        self.keep_log(name, log)
        if status != "ok":
            tail = log.read_text(errors="replace").splitlines()[-6:]
            self.say(f"{name}: {status}; its log ends:\n    " + "\n    ".join(tail))
        return status

    def run(self, name: str, cmd: list[str], timeout: float, env: dict | None = None) -> str:
        started = time.time()
        proc, log = self.start(name, cmd, env)
        return self.wait(name, proc, log, min(timeout, self.left()), started)

    def keep_log(self, name: str, log: Path) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / "gpu_suite.log", "a") as f:
            f.write(f"\n===== {name} ({self.status.get(name, '')}, {self.times.get(name, 0):.0f} s)\n")
            f.write(log.read_text(errors="replace")[-200_000:])
