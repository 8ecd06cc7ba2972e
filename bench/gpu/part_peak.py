"""The peak part: a bf16 8192^3 matmul and a device copy timed by triton.testing.do_bench in a process of
their own (bench/gpu_suite.py --measure-peak): the measured peaks, MFU's denominator."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

from bench.gpu.budget import ASSUMED_PEAK_TFLOPS, ESTIMATE
from bench.gpu.commands import commands


def measure_peak(path: str) -> int:
    """The peak part's own process: bf16 matmul TFLOP/s and copy TB/s by triton.testing.do_bench."""
    import torch
    import triton
    import triton.testing

    n = 8192
    pair = [torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2)]  # random, never zeros
    ms = triton.testing.do_bench(lambda: torch.matmul(*pair), warmup=100, rep=500, return_mode="median")
    pair.clear()
    src = torch.randn(2**29, device="cuda", dtype=torch.float32)  # 2 GiB
    dst = torch.empty_like(src)
    copy_ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    props = torch.cuda.get_device_properties(0)
    name = torch.cuda.get_device_name()
    from strata.launcher.metrics import PEAK_BF16_TFLOPS
    driver = ""
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    data = {"device": name, "tflops": 2 * n**3 / ms / 1e9, "ms": ms, "copy_ms": copy_ms, "copy_gib": 2.0,
            "hbm_tbs": 2 * src.numel() * 4 / copy_ms / 1e9, "memory_gib": props.total_memory / 2**30,
            "sms": props.multi_processor_count, "driver": driver, "torch": torch.__version__,
            "triton": triton.__version__,
            "datasheet_tflops": next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)}
    Path(path).write_text(json.dumps(data, indent=1))
    print(json.dumps(data))
    return 0


class PeakPart:
    """Suite's peak part (a mixin of Suite: uses args, work, run, say, row and results)."""

    def peak(self) -> dict:
        cmd = commands(self.args, None, 0)["peak"]
        status = self.run("peak", cmd, ESTIMATE["peak"] * 5)
        path = self.work / "peak.json"
        if status != "ok" or not path.is_file():
            self.row("peak", "bf16 matmul 8192^3", "torch.matmul", "", note=f"{status}; the assumed "
                     f"{ASSUMED_PEAK_TFLOPS:.0f} TFLOP/s stands in")
            return {}
        peak = json.loads(path.read_text())
        self.results["parts"]["peak"] = peak
        self.say(f"peak: {peak['tflops']:.0f} TFLOP/s bf16, {peak['hbm_tbs']:.2f} TB/s, {peak['device']}")
        sheet = peak.get("datasheet_tflops")
        self.row("peak", "bf16 matmul 8192^3 (random data)", "torch.matmul", f"{peak['ms']:.3f} ms",
                 f"{peak['tflops']:.0f} TFLOP/s",
                 f"{100 * peak['tflops'] / sheet:.0f}% of {sheet:.0f}" if sheet else "",
                 note="MFU's denominator below")
        self.row("peak", f"device copy of {peak['copy_gib']:.0f} GiB", "Tensor.copy_", f"{peak['copy_ms']:.3f} ms",
                 f"{peak['hbm_tbs']:.2f} TB/s", note="read + written; % HBM below")
        return peak
