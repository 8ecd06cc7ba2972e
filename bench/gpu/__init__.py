"""The GPU suite: one call of under 8 minutes on one H100 or H200, one markdown table.

    python3 bench/gpu_suite.py                 # on the GPU machine, from the repo root, the wheels in .whl
    python3 bench/gpu_suite.py --dry-run       # anywhere, on CPU: checks every step, prints commands and budget
    python3 bench/gpu_suite.py --parts train --steps 30 train.recompute_kinds.M=full   # a part again, shorter

The GPU machine has PyTorch and Triton and nothing else (no network): `../shared/gpu/wheels.sh .whl`
builds, on a machine with one, every wheel the suite needs (DeepSpeed, megatron-core and what they
lack, and the peers fla-core and liger-kernel, plus mamba_ssm's sources). Strata is not installed
there either: before any part, SITE/strata/ gets a link per folder of this checkout (launcher, model,
parallel, data, kernels; a namespace package, as the install's), and every part runs with
PYTHONPATH=SITE:REPO. The suite then runs, each part in its own process, logs under --work:

  setup    the wheels installed with `pip install --no-index --no-deps --target SITE`, and mamba_ssm's
           package copied from its sdist (its Triton SSD is pure Python; what a build with
           MAMBA_SKIP_CUDA_BUILD=TRUE installs, without running its setup.py);
  tests    STRATA_GPU_TESTS=1 pytest tests/kernels/test_gpu.py: the compiled kernels in bf16 (and fp32)
           against the references, pass/fail counts per dtype; at the same time, on other cores, the
           peers' kernels are compiled once (bench/kernel_speed.py --warm-peers: mamba_ssm's SSD autotunes
           about 120 configurations) and the training corpus is prepared;
  peak     a bf16 8192^3 matmul and a device copy (triton.testing.do_bench): the measured peaks, MFU's
           denominator;
  kernels  bench/kernel_speed.py --ops ssd,norm,ce: Strata's SSD, RMSNorm (plain, gated) and fused linear
           cross-entropy beside the PyTorch reference, mamba_ssm (SSD, gated norm), fla
           (chunk_simple_gla) and Liger (fused linear CE, RMSNorm), at the 1.3B hybrid's shapes;
  train    --config (configs/hybrid-1b3.yaml) end to end through `strata train` (bench/train_gpu.py, by
           python -m strata.launcher.cli, without the final checkpoint) for --steps (--ref-steps) at its
           seq 4096 in bf16, micro-batches of --micro-batch sequences (--ref-micro-batch, accumulated to
           the same global batch), for each train.recompute in --recompute and each kernel path in
           --backends: tokens/s, TFLOP/s, MFU against the measured peak, peak memory against the plan's
           prediction (planned_peak_gib), and the largest relative difference of the reference and
           Triton loss curves; the Triton run without recompute once more on packed documents
           (data.doc_boundaries=true, the seq_idx kernels; --no-packed leaves it out): what keeping
           documents apart costs in tokens/s.
           Three steps near the end of each Triton run are profiled (bench/profile_steps.py) into
           $OUT/profile-<run>.md: how busy the device was, by group and kernel, and the host's ops
           (--no-profile: none).

Every part runs under one deadline (--budget): a part that would start too late is a row that says so,
and a training run stopped by the deadline reports the steps it made. The table is printed last and
written, with the machine, date and command, to $OUT (or --out) as gpu_suite.md, beside gpu_suite.json
(every number) and gpu_suite.log (every part's output).
"""
# The package, one module per part and what they share, each importing only those above it:
#   commands.py      the parts' command lines, the bench scripts they call (load_bench), REPO
#   runs.py          the training runs: TrainRun, their configs' plans, run directories, profiled steps
#   budget.py        the estimates, the reserve, the dry run's budget
#   table.py         the table's rows, header, gpu_suite.md and gpu_suite.json
#   part_setup.py    the wheels, mamba_ssm's sources, strata linked into SITE
#   part_tests.py    the GPU tests, side by side with the peers' compilation and the corpus
#   plugin.py        the tests part's pytest plugin: pass/fail per dtype
#   part_peak.py     the measured peaks (and the --measure-peak process)
#   part_kernels.py  the kernel rows and their goals against the peers
#   part_train.py    the training runs, their rows and profiles
#   suite.py         Suite: the deadline, the parts' processes and logs, the parts and the table together
#   dry_run.py       the checks on CPU, the commands and the budget
#   cli.py           the arguments and main (bench/gpu_suite.py calls it)
from bench.gpu.cli import main, parse_args
from bench.gpu.commands import load_bench
from bench.gpu.dry_run import wheels_in_script
from bench.gpu.part_setup import MAMBA_SDIST, WHEELS, WHEELS_SH, link_strata
from bench.gpu.part_train import profile_summary
from bench.gpu.runs import TrainRun
from bench.gpu.suite import Suite

__all__ = ["MAMBA_SDIST", "WHEELS", "WHEELS_SH", "Suite", "TrainRun", "link_strata", "load_bench", "main",
           "parse_args", "profile_summary", "wheels_in_script"]
