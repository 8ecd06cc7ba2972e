"""`strata launch slurm`: the sbatch script for a training job on SLURM, from the config and
overrides `strata train` takes; with --submit it also submits it.

    strata launch slurm --nodes 8 --gpus-per-node 8 --config configs/hybrid-1b3.yaml --time 48:00:00 --submit
    strata launch slurm --nodes 2 --gpus-per-node 4 --config configs/hybrid-1b3.yaml parallel.tp=4 --partition gpu

The script (default <run_dir>/launch.sbatch) starts one torchrun per node with srun, joined by a
c10d rendezvous on the first node, and outlives the time limit and preemption: SLURM sends the
batch shell SIGUSR1 --signal-seconds before the limit; the shell has every task save a checkpoint
at its next step boundary (SIGTERM through scancel), waits for them, and requeues the job, which
runs the same command again and resumes from the newest complete checkpoint. What each line is
for and how to size the grace windows: docs/OPERATIONS.md.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from strata.launcher.config import ConfigError, config_path, load_config
from strata.launcher.errors import PREEMPTED_EXIT
from strata.parallel.distributed import SLURM_PORT_BASE, SLURM_PORT_SPAN

SIGNAL_SECONDS = 180  # default warning before the time limit
STOP_MARGIN_S = 30  # torchrun SIGKILLs workers still saving this long before the time limit
MAX_RESTARTS = 3  # torchrun's restarts in place when a rank dies (a lost node waits for SLURM's requeue)
CPUS_PER_GPU = 8  # default --cpus-per-task = this x --gpus-per-node


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="strata launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scheduler", choices=["slurm"], help="the scheduler to write a job script for")
    p.add_argument("overrides", nargs="*", help="dotted overrides, as for strata train")
    p.add_argument("--config", required=True, help="YAML config, as for strata train")
    p.add_argument("--nodes", type=positive, required=True, help="nodes; one torchrun on each")
    p.add_argument("--gpus-per-node", type=positive, required=True, help="GPUs per node; one worker on each")
    p.add_argument("--cpus-per-task", type=positive, default=None,
                   help=f"CPUs for each node's torchrun and its workers (default: {CPUS_PER_GPU} per GPU)")
    p.add_argument("--time", default=None,
                   help="time limit as SLURM writes it: HH:MM:SS, D-HH:MM:SS, minutes (default: the partition's)")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--job-name", default=None, help="default: strata-<run_dir's name>")
    p.add_argument("--port", type=positive, default=None,
                   help=f"c10d rendezvous port on the first node (default: {SLURM_PORT_BASE} + job id "
                        f"%% {SLURM_PORT_SPAN}, so jobs that share a node differ)")
    p.add_argument("--signal-seconds", type=int, default=SIGNAL_SECONDS,
                   help="how long before the time limit SLURM warns the job to save and requeue "
                        f"(default {SIGNAL_SECONDS})")
    p.add_argument("--max-restarts", type=int, default=MAX_RESTARTS,
                   help="times torchrun restarts the job in place, from its newest checkpoint, when a rank dies "
                        f"(default {MAX_RESTARTS}; 0: the job ends, and SLURM's requeue is the only restart)")
    p.add_argument("--out", default=None, help="where to write the script (default: <run_dir>/launch.sbatch)")
    p.add_argument("--submit", action="store_true", help="submit the script with sbatch")
    return p.parse_intermixed_args(argv)


def time_limit_seconds(text: str) -> float:
    """SLURM's --time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S, UNLIMITED) in seconds, so that
    a limit shorter than the warning is refused now rather than after the job waited in the queue."""
    if text.lower() in ("unlimited", "infinite"):
        return float("inf")
    days, dash, clock = text.partition("-")
    if not dash:
        days, clock = "0", text
    try:
        fields = [int(f) for f in clock.split(":")]
        if len(fields) > 3 or min(fields) < 0 or int(days) < 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"--time {text!r} is not a SLURM time limit; write e.g. 24:00:00 or 2-00:00:00") from None
    if dash:  # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = fields + [0] * (3 - len(fields))
    else:  # M, M:S, H:M:S
        hours, minutes, seconds = {1: [0, fields[0], 0], 2: [0, *fields], 3: fields}[len(fields)]
    return int(days) * 86400 + hours * 3600 + minutes * 60 + seconds


def check_flags(args: argparse.Namespace) -> None:
    if args.max_restarts < 0:
        raise ValueError(f"--max-restarts {args.max_restarts} is negative; use 0 (no restart in place) or more")
    if args.port is not None and args.port > 65535:
        raise ValueError(f"--port {args.port} is not a TCP port; use one below 65536")
    if args.signal_seconds < 2 * STOP_MARGIN_S:
        raise ValueError(f"--signal-seconds {args.signal_seconds} leaves no time to save; use at least "
                         f"{2 * STOP_MARGIN_S} (default {SIGNAL_SECONDS})")
    if args.time is not None and time_limit_seconds(args.time) <= args.signal_seconds:
        raise ValueError(f"--time {args.time} is not longer than --signal-seconds {args.signal_seconds}; "
                         "the job would be told to stop as it starts")


def train_command(args: argparse.Namespace) -> str:
    """One torchrun per node: the node ranks come from the c10d rendezvous on $HEAD, and the
    same command resumes a requeued job (training resumes from the newest complete checkpoint).
    torchrun forwards SIGTERM to its workers and SIGKILLs those still running after
    --shutdown-timeout, which ends STOP_MARGIN_S before the time limit."""
    rendezvous = (f'--rdzv-backend c10d --rdzv-endpoint "$HEAD:$PORT" --rdzv-id "$SLURM_JOB_ID" '
                  f"--max-restarts {args.max_restarts} --shutdown-timeout {args.signal_seconds - STOP_MARGIN_S}")
    train = " ".join(shlex.quote(a) for a in ["--config", str(config_path(args.config)), *args.overrides])
    return (f'torchrun --nnodes "$SLURM_NNODES" --nproc-per-node {args.gpus_per_node} \\\n'
            f"        {rendezvous} \\\n"
            f"        -m strata.launcher.train {train}")


def sbatch_header(args: argparse.Namespace, cpus: int, run_dir: Path, workdir: Path) -> str:
    options = [  # (option, value): None leaves the option out, True writes a flag
        ("job-name", args.job_name or f"strata-{run_dir.name}"),
        ("nodes", args.nodes),
        ("ntasks-per-node", 1),
        ("gpus-per-node", args.gpus_per_node),
        ("cpus-per-task", cpus),
        ("time", args.time),
        ("partition", args.partition),
        ("account", args.account),
        ("chdir", workdir),
        ("output", run_dir / "slurm-%j.out"),
        ("open-mode", "append"),
        ("requeue", True),
        ("signal", f"B:USR1@{args.signal_seconds}"),
    ]
    return "\n".join(f"#SBATCH --{name}" if value is True else f"#SBATCH --{name}={shlex.quote(str(value))}"
                     for name, value in options if value is not None)


SCRIPT = """#!/bin/bash
# Written by `strata launch slurm` (launcher/launch.py). Submit with: sbatch {path}
# Every line is explained in docs/OPERATIONS.md, "Preemption and requeue on SLURM". In short:
# one task per node runs torchrun, which starts one worker per GPU; --chdir is the directory the
# config and run_dir paths are relative to; every attempt appends to the same --output file;
# --requeue lets SLURM requeue the job on preemption or node failure; --signal sends this shell
# SIGUSR1 {signal_s} s before the time limit, so that the job saves and requeues itself.
{header}

set -u
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)  # the c10d rendezvous host
# A fresh rendezvous store for each of torchrun's restarts: with the shared one a restarted job reads the
# previous attempt's addresses and hangs (pytorch/pytorch#135712; parallel/distributed.py restart_hazard).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
PORT={port}
echo "strata: job $SLURM_JOB_ID, restart ${{SLURM_RESTART_COUNT:-0}}, $SLURM_NNODES nodes, rendezvous $HEAD:$PORT"

warned=0  # SIGUSR1 came: the time limit is near and every task was asked to save
ended=0   # SIGTERM came to this shell: SLURM itself is ending the job (scancel, the time limit)
on_usr1() {{
    warned=1
    echo "strata: SIGUSR1, the time limit is {signal_s} s away: every task saves at its next step boundary"
    # SIGTERM to the job's steps (each node's torchrun and its workers), not to this shell.
    # Not `kill $srun_pid`: srun answers a SIGTERM of its own with SIGKILL to its tasks.
    scancel --signal=TERM "$SLURM_JOB_ID"
}}
on_term() {{
    ended=1
    echo "strata: SIGTERM, SLURM is ending the job; the tasks save if its grace time allows"
}}
trap on_usr1 USR1
trap on_term TERM

# --kill-on-bad-exit=0 --wait=0: a node whose workers finished saving first must not end the
# step while the other nodes are still writing their shards.
srun --ntasks-per-node=1 --cpus-per-task={cpus} --kill-on-bad-exit=0 --wait=0 \\
    {command} &
srun_pid=$!
# A trapped signal ends `wait` early; wait again until srun itself has returned.
while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; done
wait "$srun_pid"
rc=$?
echo "strata: srun exited with code $rc"

# Requeue when the tasks stopped in order to be requeued: after our SIGUSR1 (torchrun exits 1
# whatever code its workers returned), or when the tasks say so themselves with {preempted}
# (srun with one task per GPU passes that code on). Not after SLURM's own SIGTERM: a preemption
# requeues the job by itself (--requeue), and a scancel means stop.
if [ "$rc" -ne 0 ] && {{ [ "$warned" -eq 1 ] || {{ [ "$rc" -eq {preempted} ] && [ "$ended" -eq 0 ]; }}; }}; then
    echo "strata: requeueing job $SLURM_JOB_ID; it resumes from the newest complete checkpoint"
    scontrol requeue "$SLURM_JOB_ID" || echo "strata: scontrol requeue failed; submit this script again to resume"
fi
exit "$rc"
"""


def render_script(args: argparse.Namespace, run_dir: Path, workdir: Path, path: Path) -> str:
    """The sbatch script: #SBATCH lines, then a batch shell that runs srun in the background
    (a trap runs only between commands, and `wait` is one) and decides about the requeue."""
    port = args.port or f"$(({SLURM_PORT_BASE} + SLURM_JOB_ID % {SLURM_PORT_SPAN}))"
    cpus = args.cpus_per_task or CPUS_PER_GPU * args.gpus_per_node
    return SCRIPT.format(path=shlex.quote(str(path)), header=sbatch_header(args, cpus, run_dir, workdir),
                         signal_s=args.signal_seconds, port=port, preempted=PREEMPTED_EXIT, cpus=cpus,
                         command=train_command(args))


def submit(path: Path) -> int:
    if shutil.which("sbatch") is None:
        print(f"error: sbatch is not on PATH; run `sbatch {shlex.quote(str(path))}` on a SLURM login node",
              file=sys.stderr)
        return 1
    return 0 if subprocess.run(["sbatch", str(path)]).returncode == 0 else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_flags(args)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir = Path.cwd()
    run_dir = (workdir / cfg.train.run_dir).resolve()
    path = Path(args.out) if args.out else Path(cfg.train.run_dir) / "launch.sbatch"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)  # SLURM opens --output there before the script runs
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_script(args, run_dir, workdir, path))
        path.chmod(0o755)
    except OSError as e:
        print(f"error: cannot write {e.filename or path}: {e.strerror}", file=sys.stderr)
        return 1
    print(f"wrote {path}: {args.nodes} node(s) x {args.gpus_per_node} GPU(s), SIGUSR1 {args.signal_seconds} s "
          f"before the time limit saves and requeues; log {run_dir}/slurm-<jobid>.out")
    if not args.submit:
        print(f"submit it with: sbatch {shlex.quote(str(path))}")
        return 0
    return submit(path)


if __name__ == "__main__":
    raise SystemExit(main())
