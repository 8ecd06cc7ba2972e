"""The suite's one table: a row per result of a part, written after every row (with the machine, date
and command) to <out>/gpu_suite.md, beside gpu_suite.json (every number)."""
from __future__ import annotations

import json
import os
import shlex
import sys
import time

from bench.gpu.commands import ENTRY, REPO

HEAD = ["part", "case", "impl", "time", "throughput", "% of peak", "memory", "vs", "goal", "note"]


class Table:
    """Suite's rows (a mixin: Suite holds args, out, t0, rows, results, times and status)."""

    def row(self, part, case, impl, time_="", through="", share="", memory="", vs="", goal="", note="") -> None:
        self.rows.append([part, case, impl, time_, through, share, memory, vs, goal, note])
        self.write()

    def table(self) -> str:
        lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
        for r in self.rows:
            lines.append("| " + " | ".join(str(c).replace("|", "/") for c in r) + " |")
        return "\n".join(lines)

    def header(self) -> str:
        peak = self.results["parts"].get("peak", {})
        machine = peak.get("device", "unknown device")
        if peak:
            machine += (f" ({peak['memory_gib']:.0f} GiB, {peak.get('sms', '?')} SMs, driver "
                        f"{peak.get('driver', '?')}), torch {peak['torch']}, triton {peak['triton']}")
        cmd = "python3 " + " ".join(shlex.quote(a) for a in [os.path.relpath(ENTRY, REPO), *sys.argv[1:]])
        times = ", ".join(f"{k} {v:.0f} s" for k, v in self.times.items())
        return (f"GPU suite: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(self.t0))}; machine: {machine}\n"
                f"command: {cmd}\nwall time {time.time() - self.t0:.0f} s of a {self.args.budget:.0f} s budget: "
                f"{times}\n")

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_suite.md").write_text(self.header() + "\n" + self.table() + "\n")
        payload = {**self.results, "times": self.times, "status": self.status, "argv": sys.argv,
                   "args": {k: v for k, v in vars(self.args).items()}}
        (self.out / "gpu_suite.json").write_text(json.dumps(payload, indent=1, default=str))
