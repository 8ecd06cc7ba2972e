"""bench/gpu_suite.py (the package bench/gpu/) on CPU: its dry run passes quickly, a missing config is
one line, and the table it builds from the parts' results (synthetic here) has one row per result and
says by how much a goal is missed."""
import importlib
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_suite():
    """The suite, the package bench/gpu/ that bench/gpu_suite.py runs."""
    return importlib.import_module("bench.gpu")


def test_dry_run_passes_quickly(tmp_path, capsys):
    suite = load_suite()
    t0 = time.perf_counter()
    code = suite.main(["--dry-run", "--wheels", str(tmp_path / "no-wheels"), "--work", str(tmp_path / "work")])
    elapsed = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert code == 0, out
    assert "dry run passed (0 failed)" in out
    assert "FAIL" not in out
    assert f"wheel folder {tmp_path / 'no-wheels'} absent: build it with `../shared/gpu/wheels.sh" in out
    for part in ("[tests] STRATA_GPU_TESTS=1", "[kernels]", "[peak]", "[train recompute=none triton]",
                 "[train recompute=selective reference]", "--warm-peers"):
        assert part in out
    assert "total, of a 440 s budget" in out
    assert elapsed < 10, elapsed


def test_dry_run_plans_fp8_twins_of_the_triton_run(tmp_path, capsys):
    """--fp8: the FP8 runs beside the bf16 Triton run without recompute; a recipe strata lacks is one line."""
    from strata.kernels.fp8.recipe import RECIPES

    suite = load_suite()
    assert suite.cli.FP8_RECIPES == RECIPES
    code = suite.main(["--dry-run", "--wheels", str(tmp_path / "w"), "--work", str(tmp_path / "work"),
                       "--parts", "train", "--recompute", "none", "--backends", "triton", "--no-packed",
                       "--fp8", "tensorwise,rowwise", "--steps", "200"])
    out = capsys.readouterr().out
    assert code == 0, out
    for run in ("[train recompute=none triton]", "[train recompute=none triton fp8=tensorwise]",
                "[train recompute=none triton fp8=rowwise]"):
        assert run in out
    assert "train.fp8=rowwise" in out


def test_dry_run_fails_when_the_estimate_is_over_budget(tmp_path, capsys):
    code = load_suite().main(["--dry-run", "--wheels", str(tmp_path / "absent"), "--budget", "100"])
    out = capsys.readouterr().out
    assert code == 1
    assert "> --budget 100 s" in out


def test_missing_config_is_one_line():
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "bench/gpu_suite.py", "--dry-run", "--config", "configs/nope.yaml"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "configs/nope.yaml not found" in lines[0], proc.stderr
    assert time.perf_counter() - t0 < 10


def test_bad_override_is_one_line(capsys):
    code = load_suite().main(["--dry-run", "train.recompute=sometimes"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "recompute" in err[0]


def kernel_rows():
    def row(op, mode, impl, ms, **kw):
        return dict(op=op, mode=mode, impl=impl, ms=ms, gbs=kw.get("gbs"), tflops=kw.get("tflops"),
                    speedup=kw.get("speedup"), err=kw.get("err"), note=kw.get("note", ""), **(
                        {"mem_mib": kw["mem"]} if "mem" in kw else {}))
    return [row("ssd", "fwd+bwd", "reference", 90.0, gbs=18, tflops=3.4),
            row("ssd", "fwd+bwd", "triton", 4.9, gbs=339, tflops=63.3, speedup=18.4, err=3e-3),
            row("ssd", "fwd+bwd", "mamba_ssm 2.3.2.post1", 4.0, gbs=400, tflops=70.0, err=3e-3,
                note="Strata 0.82x slower; Triton SSD"),
            row("ssd", "-", "fla 0.6.0", float("nan"), note="not installed"),
            row("linear CE", "fwd+bwd", "reference", 34.0, tflops=380, mem=12288),
            row("linear CE", "fwd+bwd", "triton", 21.9, tflops=600, speedup=1.57, err=3e-3, mem=1408,
                note="peak mem 1408 vs 12288 MiB"),
            row("linear CE", "fwd+bwd", "liger_kernel 0.8.5", 25.0, tflops=520, err=4e-3, mem=1600,
                note="peak mem 1600 MiB; Strata 1.14x faster")]


def test_table_from_results(tmp_path):
    gs = load_suite()
    args = gs.parse_args(["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    args.seq_len = 4096
    suite = gs.Suite(args)
    suite.work.mkdir(parents=True)
    suite.times["tests"] = 61.0
    (suite.work / "tests.json").write_text(json.dumps({
        "labels": {"a[bf16]": "bf16", "b[bf16]": "bf16", "c[fp32]": "fp32"},
        "outcomes": {"a[bf16]": "passed", "b[bf16]": "failed", "c[fp32]": "passed"}, "exitstatus": 1}))
    suite.test_rows()
    data = {"hbm_tbs": 3.0, "peak_tflops": 790.0, "rows": kernel_rows(),
            "shapes": dict(batch=8, seqlen=4096, d_model=2048, nheads=64, headdim=64, dstate=128, chunk=256,
                           vocab=32768)}
    for r in data["rows"]:
        suite.kernel_row(r, data, data["shapes"])
    records = [{"loss": 10.0 - 0.1 * i, "tokens_per_s": 30000.0, "tflops_per_gpu": 270.0, "mfu_percent": 27.3,
                "peak_memory_gib": 36.0, "step_time_s": 0.27} for i in range(20)]
    tri = gs.TrainRun("none", "triton", 20, [], planned_gib=40.0)
    tri.result = {"status": "ok", "records": records, "wall_s": 40.0, "summary": load_train_gpu().summary(records, 5)}
    ref_records = [{**r, "loss": r["loss"] * (1 + 1e-3)} for r in records[:10]]
    ref = gs.TrainRun("none", "reference", 10, [], planned_gib=None)
    ref.result = {"status": "stopped after 50 s", "records": ref_records, "wall_s": 50.0,
                  "summary": load_train_gpu().summary(ref_records, 5)}
    skipped = gs.TrainRun("selective", "reference", 10, [], planned_gib=90.0)
    skipped.result = {"status": "not run: the plan predicts 90.0 GiB > the GPU's 79.6 GiB"}
    packed_records = [{**r, "loss": r["loss"] + 0.5, "tokens_per_s": 29100.0} for r in records]
    packed = gs.TrainRun("none", "triton", 20, ["data.doc_boundaries=true"], planned_gib=40.0, packed=True)
    packed.result = {"status": "ok", "records": packed_records, "wall_s": 40.0,
                     "summary": load_train_gpu().summary(packed_records, 5)}
    bf16_records = [{**r, "tokens_per_s": 27000.0, "peak_memory_gib": 30.6} for r in records]
    bf16 = gs.TrainRun("none", "triton", 20, ["train.param_dtype=bf16"], planned_gib=32.0, bf16_params=True)
    bf16.result = {"status": "ok", "records": bf16_records, "wall_s": 40.0,
                   "summary": load_train_gpu().summary(bf16_records, 5)}
    fp8_records = [{**r, "tokens_per_s": r["tokens_per_s"] * 1.1, "loss": r["loss"] * 1.003} for r in records]
    fp8 = gs.TrainRun("none", "triton", 20, ["train.fp8=tensorwise"], planned_gib=40.0, fp8="tensorwise")
    fp8.result = {"status": "ok", "records": fp8_records, "wall_s": 40.0,
                  "summary": load_train_gpu().summary(fp8_records, 5)}
    runs = [tri, packed, bf16, fp8, ref, skipped]
    for run in runs:
        suite.train_row(run, runs, 790.0, load_train_gpu().max_relative_difference)
    table = (tmp_path / "out" / "gpu_suite.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert len(lines) == 2 + 2 + len(data["rows"]) + len(runs)
    assert all(line.count("|") == 11 for line in lines)
    text = "\n".join(lines)
    assert "1 passed, 1 failed" in text and "all pass: missed (1 failed)" in text
    assert "faster than mamba_ssm: missed by 2" in text and "(4.900 vs 4.000 ms)" in text
    assert "| bf16 err 3.0e-03 |" in text and "| ssd | fla 0.6.0 |" in text
    assert "at least as fast as Liger: met (1.14x); memory <= Liger's: met" in text
    assert "MFU 34.2%" in text and "MFU >= 45%: missed by 10.8 pts" in text
    assert "36.0 GiB; plan 40.0 (-10%)" in text and "memory within 10% of plan: met" in text
    assert "loss curves: max rel. diff 1.0e-03 vs reference (10 steps)" in text
    assert "not run: the plan predicts 90.0 GiB" in text
    assert "stopped after 50 s" in text
    packed_row = next(line for line in lines if "packed documents" in line)
    assert "isolation costs 3.0% of the tokens/s of unpacked rows" in packed_row
    assert "isolation under 5%: met" in packed_row and "loss vs recompute=none" not in packed_row
    bf16_row = next(line for line in lines if "bf16 parameters" in line)
    assert "bf16 parameters: 90% of the tokens/s and 85% of the memory of fp32 parameters" in bf16_row
    fp8_row = next(line for line in lines if "FP8 tensorwise" in line)
    assert "hybrid-1b3 recompute=none FP8 tensorwise micro-batch 4" in fp8_row
    assert "FP8 tensorwise: 1.10x the tokens/s of bf16; loss vs bf16: largest rel. gap 3.0e-03, final +0.30%" in fp8_row
    assert "FP8 >= 1.15x bf16: missed by 0.05x" in fp8_row and "final loss within 1% of bf16: met" in fp8_row


def load_train_gpu():
    return load_suite().load_bench("train_gpu")


def test_wheel_list_matches_the_script():
    gs = load_suite()
    if not gs.WHEELS_SH.is_file():
        return  # a checkout without ../shared: the dry run says so
    assert dict(gs.wheels_in_script()) == {n: v for n, v in gs.WHEELS} | {gs.MAMBA_SDIST[0]: gs.MAMBA_SDIST[1]}


def test_profiled_steps_write_a_table(tmp_path):
    """bench/profile_steps.py wraps a train_step: the steps asked for, on rank 0, into one table."""
    import types

    import torch

    profile_steps = load_suite().load_bench("profile_steps")
    seen = []

    def train_step(run):
        a = torch.randn(64, 64)
        seen.append(run.step)
        return {"loss": float((a @ a).sum())}, False

    module = types.SimpleNamespace(train_step=train_step)
    profile_steps.install(module, 2, 4, tmp_path / "profile.md")
    run = types.SimpleNamespace(step=0, dist=types.SimpleNamespace(is_main=True))
    for step in range(6):
        run.step = step
        assert module.train_step(run)[1] is False
    assert seen == list(range(6))
    table = (tmp_path / "profile.md").read_text()
    assert table.startswith("2 profiled steps: wall ") and "| matmul |" in table and "`aten::mm` | 1 |" in table
    assert load_suite().profile_summary(table).startswith("profile: wall ")


def test_profile_counts_device_time_once():
    """On a GPU run the device time is the kernels' (not also the ops that launched them), and busy
    is the union of their intervals: two overlapping kernels of 4 and 2 ms over 5 ms count 5."""
    import types

    profile_steps = load_suite().load_bench("profile_steps")

    def event(name, device, start_ms, end_ms, self_cpu_ms=0.0):
        return types.SimpleNamespace(name=name, device_type=f"DeviceType.{device}", self_cpu_time_total=1e3 * self_cpu_ms,
                                     time_range=types.SimpleNamespace(start=1e3 * start_ms, end=1e3 * end_ms))

    events = [event("aten::mm", "CPU", 0, 1, self_cpu_ms=1.0), event("nvjet_sm90_gemm", "CUDA", 0, 4),
              event("_scan_fwd_kernel", "CUDA", 3, 5), event("SSDChunkedBackward", "CPU", 1, 3, self_cpu_ms=2.0)]
    table = profile_steps.profile_table(events, walls=[0.010])
    assert table.startswith("1 profiled steps: wall 10.0 ms per step, device busy 5.0 ms (50% of the wall), "
                            "host time in profiled ops 3.0 ms")
    assert "| matmul | 4.00 | 66.7% |" in table and "| Triton kernels | 2.00 | 33.3% |" in table
    assert "`aten::mm` | 1 | 1.00 |" in table and "`SSDChunkedBackward` | 1 | 2.00 |" in table  # the host table
