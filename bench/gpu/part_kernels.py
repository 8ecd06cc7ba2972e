"""The kernels part: bench/kernel_speed.py --ops ssd,norm,ce, Strata's SSD, RMSNorm (plain, gated) and
fused linear cross-entropy beside the PyTorch reference and the peers (mamba_ssm, fla, Liger) at the
1.3B hybrid's shapes; a row per op, pass and implementation, with the goals against the peers."""
from __future__ import annotations

import json

from bench.gpu.budget import ASSUMED_PEAK_TFLOPS, ESTIMATE
from bench.gpu.commands import KERNEL_BENCH, commands


class KernelsPart:
    """Suite's kernels part (a mixin of Suite: uses args, work, run, say, row and results)."""

    def kernels(self, peak: dict) -> None:
        args = self.args
        cmd = commands(args, None, 0)["kernels"]
        cmd[cmd.index("PEAK")] = f"{peak.get('tflops', ASSUMED_PEAK_TFLOPS):.0f}"
        cmd[cmd.index("HBM")] = f"{peak.get('hbm_tbs', 3.0):.2f}"
        status = self.run("kernels", cmd, ESTIMATE["kernels"] * 3)
        path = self.work / "kernels.json"
        if not path.is_file():
            self.row("kernels", args.kernel_ops, KERNEL_BENCH, "", note=f"{status}; no rows")
            return
        data = json.loads(path.read_text())
        self.results["parts"]["kernels"] = data
        sh = data["shapes"]
        self.say(f"kernels: {status}, {len(data['rows'])} rows")
        for r in data["rows"]:
            self.kernel_row(r, data, sh)
        if status != "ok":
            self.row("kernels", "(the rest)", "", "", note=f"{KERNEL_BENCH} {status}")

    def kernel_row(self, r: dict, data: dict, sh: dict) -> None:
        rows = data["rows"]
        impl = {"triton": "Strata (Triton)", "reference": "PyTorch reference"}.get(r["impl"], r["impl"])
        if r["impl"].startswith("triton, "):  # a variant of Strata's kernel, e.g. the CE at Liger's chunk rows
            impl = "Strata (Triton), " + r["impl"].removeprefix("triton, ")
        ms = r["ms"]
        time_ = "" if ms != ms else f"{ms:.3f} ms"
        through = ", ".join(x for x in ("" if r["gbs"] is None or ms != ms else f"{r['gbs']:.0f} GB/s",
                                        "" if r["tflops"] is None or ms != ms else f"{r['tflops']:.1f} TFLOP/s") if x)
        share = ", ".join(x for x in ("" if r["gbs"] is None or ms != ms else
                                      f"{100 * r['gbs'] / (data['hbm_tbs'] * 1e3):.0f}% HBM",
                                      "" if r["tflops"] is None or ms != ms else
                                      f"{100 * r['tflops'] / data['peak_tflops']:.0f}% matmul") if x)
        memory = f"{r['mem_mib']:.0f} MiB" if r.get("mem_mib") is not None else ""
        vs = f"{r['speedup']:.2f}x the reference" if r.get("speedup") else ""
        note_parts = [x for x in r["note"].split("; ") if x and not x.startswith("peak mem")]
        vs_strata = [x for x in note_parts if x.startswith("Strata ")]
        note_parts = [x for x in note_parts if not x.startswith("Strata ")]
        if vs_strata:
            vs = vs_strata[0]
        if r["err"] is not None:
            note_parts.insert(0, f"bf16 err {r['err']:.1e}")
        goal = ""
        if r["impl"] == "triton" and r["op"] == "ssd" and r["mode"] == "fwd+bwd":
            goal = faster_than(ms, find(rows, "ssd", "fwd+bwd", "mamba_ssm"), "mamba_ssm")
        if r["impl"].startswith("triton") and r["op"] == "linear CE":
            liger = next((x for x in rows if x["op"] == "linear CE" and x["impl"].startswith("liger")), None)
            goal = faster_than(ms, liger["ms"] if liger else None, "Liger", at_least=True)
            if liger and liger.get("mem_mib") is not None and r.get("mem_mib") is not None:
                m, lm = r["mem_mib"], liger["mem_mib"]
                goal += "; memory <= Liger's: " + ("met" if m <= lm else f"missed by {100 * (m / lm - 1):.0f}%")
        shape = (f"b{sh['batch']} x {sh['seqlen']}, {sh['nheads']} heads x {sh['headdim']}, state {sh['dstate']}"
                 if r["op"] == "ssd" else f"{sh['batch'] * sh['seqlen']} rows x "
                 f"{sh['d_model'] * (2 if 'gated' in r['op'] else 1)}" if "norm" in r["op"] else
                 f"{sh['batch'] * sh['seqlen']} x {sh['d_model']}, V {sh['vocab']}" if r["op"] == "linear CE" else "")
        case = r["op"] if r["mode"] == "-" else f"{r['op']} {r['mode']}"
        self.row("kernels", case + (f" ({shape})" if shape and impl.startswith("PyTorch") else ""),
                 impl, time_, through, share, memory, vs, goal, "; ".join(note_parts))


def faster_than(ms: float, other: float | None, who: str, at_least: bool = False) -> str:
    goal = f"{'at least as fast as' if at_least else 'faster than'} {who}"
    if other is None or other != other or ms != ms:
        return f"{goal}: no {who} time"
    if ms < other or (at_least and ms <= other):
        return f"{goal}: met ({other / ms:.2f}x)"
    return f"{goal}: missed by {100 * (ms / other - 1):.0f}% ({ms:.3f} vs {other:.3f} ms)"


def find(rows: list[dict], op: str, mode: str, impl_prefix: str) -> float | None:
    return next((r["ms"] for r in rows if r["op"] == op and r["mode"] == mode and r["impl"].startswith(impl_prefix)),
                None)
