"""`strata launch slurm` and SLURM's variables: the node-list parser, the master address and port
derived from SLURM_* alone, the sbatch script's lines, the script run end to end under bash with
fake srun / scontrol / scancel / torchrun (finish, preempted, SIGUSR1 before the time limit,
SLURM's own SIGTERM), and --submit with a fake sbatch."""
import os
import shlex
import signal
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import pytest

from strata.launcher import launch
from strata.parallel import distributed
from strata.parallel.distributed import expand_nodelist, rank_environment, slurm_master

REPO = Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "tiny.yaml")
JOB_ID = 4242
PORT = distributed.SLURM_PORT_BASE + JOB_ID % distributed.SLURM_PORT_SPAN


# ----------------------------------------------------------------------------------------
# SLURM's variables alone
# ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("nodelist,hosts", [
    ("gpu[001-004,010],login1", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu010", "login1"]),
    ("node-[1-3]", ["node-1", "node-2", "node-3"]),
    ("a1,b[2-3]", ["a1", "b2", "b3"]),
    ("single", ["single"]),
    ("n[9-11]", ["n9", "n10", "n11"]),
    ("n[098-101]", ["n098", "n099", "n100", "n101"]),
    ("rack[1-2]-n[08-09]", ["rack1-n08", "rack1-n09", "rack2-n08", "rack2-n09"]),
    ("x[1,3]-ib,y", ["x1-ib", "x3-ib", "y"]),
])
def test_nodelist_forms(nodelist, hosts):
    assert list(expand_nodelist(nodelist)) == hosts


@pytest.mark.parametrize("nodelist", ["gpu[1-", "gpu]1[", "gpu[3-1]", "gpu[a-b]", "gpu[[1]]"])
def test_nodelist_errors_name_the_list(nodelist):
    with pytest.raises(ValueError, match="SLURM node list"):
        list(expand_nodelist(nodelist))


def test_first_host_of_a_huge_list_is_not_expanded():
    assert next(expand_nodelist("n[00000001-99999999]")) == "n00000001"


SRUN_ENV = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": str(JOB_ID),
            "SLURM_JOB_NODELIST": "gpu[007-008]"}


def test_master_from_slurm_variables():
    assert slurm_master(SRUN_ENV) == {"MASTER_ADDR": "gpu007", "MASTER_PORT": str(PORT)}
    # the step's node list (where task 0 runs) wins over the job's; SLURM_NODELIST is the fallback
    assert slurm_master({**SRUN_ENV, "SLURM_STEP_NODELIST": "gpu008"})["MASTER_ADDR"] == "gpu008"
    env = {k: v for k, v in SRUN_ENV.items() if k != "SLURM_JOB_NODELIST"}
    assert slurm_master({**env, "SLURM_NODELIST": "a1,b[2-3]"})["MASTER_ADDR"] == "a1"


def test_master_left_to_launchers_and_single_processes():
    assert slurm_master({**SRUN_ENV, "MASTER_PORT": "1234"}) == {"MASTER_ADDR": "gpu007"}
    assert slurm_master({**SRUN_ENV, "MASTER_ADDR": "h", "MASTER_PORT": "1"}) == {}
    assert slurm_master({**SRUN_ENV, "RANK": "0", "WORLD_SIZE": "8"}) == {}  # torchrun inside srun
    assert slurm_master({**SRUN_ENV, "SLURM_NTASKS": "1"}) == {}  # one process keeps its free port
    assert slurm_master({"SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n1"}) == {}  # the batch shell


def test_init_distributed_from_slurm_variables_alone(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_STEP_NODELIST"):
        # setenv first: monkeypatch records only keys that exist, and init_distributed sets these in
        # os.environ; a leaked RANK/WORLD_SIZE makes every later `strata train` of the session rank 5 of 16
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    for key, value in SRUN_ENV.items():
        monkeypatch.setenv(key, value)
    calls = []
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setattr(distributed.dist, "new_group", lambda **kw: calls.append(("new_group", kw)))
    monkeypatch.setattr(distributed, "skip_deepspeed_shm_build", lambda: None)
    assert rank_environment() == (5, 16, 1)
    info = distributed.init_distributed(timeout_s=600, long_timeout_s=7200)
    assert (info.rank, info.world_size, info.local_rank, info.backend) == (5, 16, 1, "gloo")
    assert calls == [(("gloo",), {"rank": 5, "world_size": 16, "device_id": None, "timeout": timedelta(seconds=600)}),
                     ("new_group", {"backend": "gloo", "timeout": timedelta(seconds=7200)})]
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("gpu007", str(PORT))


# ----------------------------------------------------------------------------------------
# The script
# ----------------------------------------------------------------------------------------

ARGS = ["slurm", "--nodes", "2", "--gpus-per-node", "4", "--config", CONFIG, "train.run_dir=runs/my run",
        "--time", "02:00:00", "--partition", "gpu", "--account", "my account", "train.max_steps=7"]


def generate(tmp_path, monkeypatch, args=ARGS) -> Path:
    monkeypatch.chdir(tmp_path)
    assert launch.main(list(args)) == 0
    return tmp_path / "runs" / "my run" / "launch.sbatch"


def test_script_lines(tmp_path, monkeypatch, capsys):
    path = generate(tmp_path, monkeypatch)
    out = capsys.readouterr().out
    assert "wrote runs/my run/launch.sbatch" in out and "sbatch 'runs/my run/launch.sbatch'" in out
    text = path.read_text()
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --cpus-per-task=32", "#SBATCH --time=02:00:00", "#SBATCH --partition=gpu",
                 "#SBATCH --account='my account'", "#SBATCH --job-name='strata-my run'", "#SBATCH --requeue",
                 "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@180", f"#SBATCH --chdir={tmp_path}",
                 f"#SBATCH --output='{tmp_path}/runs/my run/slurm-%j.out'"]:
        assert line in text.splitlines(), line
    assert (tmp_path / "runs" / "my run").is_dir()  # SLURM opens --output before the script runs
    command = " ".join(text.split("\nsrun ", 1)[1].split("&\n", 1)[0].split("\\\n"))
    assert shlex.split(command) == [
        "--ntasks-per-node=1", "--cpus-per-task=32", "--kill-on-bad-exit=0", "--wait=0",
        "torchrun", "--nnodes", "$SLURM_NNODES", "--nproc-per-node", "4", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "$HEAD:$PORT", "--rdzv-id", "$SLURM_JOB_ID", "--max-restarts", "3", "--shutdown-timeout", "150",
        "-m", "strata.launcher.train", "--config", CONFIG, "train.run_dir=runs/my run", "train.max_steps=7"]
    assert "trap on_usr1 USR1" in text and "trap on_term TERM" in text
    assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in text.splitlines()  # restarts in place work (restart_hazard)
    assert 'scancel --signal=TERM "$SLURM_JOB_ID"' in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_script_options(tmp_path, monkeypatch):
    path = generate(tmp_path, monkeypatch, ["slurm", "--nodes", "1", "--gpus-per-node", "8", "--config", CONFIG,
                                            "train.run_dir=runs/my run", "--port", "29500", "--cpus-per-task", "12",
                                            "--signal-seconds", "600", "--job-name", "it's", "--out", "job.sh"])
    assert not path.exists()
    text = (tmp_path / "job.sh").read_text()
    assert "#SBATCH --job-name='it'\"'\"'s'" in text and "#SBATCH --signal=B:USR1@600" in text
    assert "PORT=29500" in text and "--cpus-per-task=12" in text and "--shutdown-timeout 570" in text
    assert "#SBATCH --time" not in text and "#SBATCH --partition" not in text


@pytest.mark.parametrize("extra,message", [
    (["train.max_step=5"], "error: unknown key train.max_step; did you mean train.max_steps?"),
    (["--signal-seconds", "30"], "error: --signal-seconds 30 leaves no time to save"),
    (["--time", "2:00"], "error: --time 2:00 is not longer than --signal-seconds 180"),
    (["--time", "1:2:3:4"], "error: --time '1:2:3:4' is not a SLURM time limit"),
    (["--port", "70000"], "error: --port 70000 is not a TCP port"),
    (["--max-restarts", "-1"], "error: --max-restarts -1 is negative"),
])
def test_bad_config_or_flag_is_one_line_exit_2(tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    rc = launch.main(["slurm", "--nodes", "1", "--gpus-per-node", "1", "--config", CONFIG, *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert not list(tmp_path.rglob("launch.sbatch"))


@pytest.mark.parametrize("given", ["configs/tiny.yaml", "tiny", "tiny.yaml"])
def test_a_repository_config_is_found_from_any_directory(tmp_path, monkeypatch, given):
    """`--config configs/tiny.yaml` worked only from the repository root; the script names the file it
    read by its absolute path, so the job reads the same one whatever --chdir is."""
    monkeypatch.chdir(tmp_path)
    assert launch.main(["slurm", "--nodes", "1", "--gpus-per-node", "1", "--config", given]) == 0
    script = (tmp_path / "runs" / "tiny" / "launch.sbatch").read_text()
    assert f"--config {REPO / 'configs' / 'tiny.yaml'}" in script


def test_a_config_found_nowhere_is_one_line_naming_where_it_looked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.yaml").write_text((REPO / "configs" / "tiny.yaml").read_text())
    assert launch.main(["slurm", "--nodes", "1", "--gpus-per-node", "1", "--config", "mine.yaml"]) == 0
    assert f"--config {tmp_path / 'mine.yaml'}" in (tmp_path / "runs" / "tiny" / "launch.sbatch").read_text()
    capsys.readouterr()
    assert launch.main(["slurm", "--nodes", "1", "--gpus-per-node", "1", "--config", "nope.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config file nope.yaml not found (looked in ") and "hybrid-1b3" in err
    assert err.count("\n") == 1


def write_exe(path: Path, text: str) -> None:
    path.write_text("#!/bin/bash\n" + text)
    path.chmod(0o755)


def test_submit_runs_sbatch_on_the_script(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_exe(bin_dir / "sbatch", f'echo "$@" > {tmp_path}/sbatch.args; echo "Submitted batch job {JOB_ID}"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    path = generate(tmp_path, monkeypatch, ARGS + ["--submit"])
    assert (tmp_path / "sbatch.args").read_text().strip() == "runs/my run/launch.sbatch" and path.is_file()


def test_submit_without_sbatch_is_one_line_exit_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch there
    monkeypatch.chdir(tmp_path)
    assert launch.main(ARGS + ["--submit"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: sbatch is not on PATH") and err.count("\n") == 1
    assert (tmp_path / "runs" / "my run" / "launch.sbatch").is_file()  # written all the same


# ----------------------------------------------------------------------------------------
# The script end to end, under bash with fake SLURM commands and a fake torchrun
# ----------------------------------------------------------------------------------------

FAKES = {
    # srun: runs its command (the task) and exits with its code. A real srun turns a SIGTERM of its
    # own into SIGKILL of its tasks, so the script must never signal it: record it if it does.
    "srun": """trap 'echo TERM >> "$FAKE_DIR/srun.signals"' TERM
while [[ "$1" == --* ]]; do echo "$1" >> "$FAKE_DIR/srun.args"; shift; done
"$@" &
task=$!
echo "$task" > "$FAKE_DIR/task.pid"
while kill -0 "$task" 2>/dev/null; do wait "$task"; done
wait "$task"
""",
    # torchrun: exits with $FAKE_RC at once, or sleeps until a SIGTERM (then exits with $FAKE_RC).
    "torchrun": """if [ -n "${FAKE_SLEEP:-}" ]; then
    trap 'echo TERM >> "$FAKE_DIR/torchrun.signals"; kill "$sleeper"; exit "$FAKE_RC"' TERM
    sleep "$FAKE_SLEEP" & sleeper=$!
    printf '%s\\n' "$@" > "$FAKE_DIR/torchrun.argv"
    wait "$sleeper"
    exit 99
fi
printf '%s\\n' "$@" > "$FAKE_DIR/torchrun.argv"
exit "$FAKE_RC"
""",
    "scontrol": """case "$1" in
    show) printf 'node1\\nnode2\\n' ;;
    requeue) echo "requeue $2" >> "$FAKE_DIR/scontrol.log" ;;
esac
""",
    # scancel --signal=TERM JOBID: SIGTERM to the job's steps, i.e. the task
    "scancel": """echo "$@" >> "$FAKE_DIR/scancel.args"
kill -TERM "$(cat "$FAKE_DIR/task.pid")"
""",
}


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    """Runs the generated script under bash as SLURM would, with the fakes first on PATH."""
    script = generate(tmp_path, monkeypatch)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in FAKES.items():
        write_exe(bin_dir / name, text)

    def start(rc: int, sleep: int | None = None) -> subprocess.Popen:
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "FAKE_DIR": str(tmp_path), "FAKE_RC": str(rc),
               "SLURM_JOB_ID": str(JOB_ID), "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_NNODES": "2",
               **({"FAKE_SLEEP": str(sleep)} if sleep else {})}
        return subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def wait_running():
        deadline = time.monotonic() + 10
        while not all((tmp_path / f).is_file() and (tmp_path / f).read_text() for f in ("task.pid", "torchrun.argv")):
            assert time.monotonic() < deadline, "the fake torchrun did not start"
            time.sleep(0.02)

    def read(name: str) -> str:
        return (tmp_path / name).read_text() if (tmp_path / name).exists() else ""

    start.wait_running, start.read = wait_running, read
    return start


def test_finished_job_exits_0_and_is_not_requeued(slurm):
    proc = slurm(rc=0)
    out = proc.communicate(timeout=10)[0]
    assert proc.returncode == 0, out
    assert slurm.read("torchrun.argv").splitlines() == [
        "--nnodes", "2", "--nproc-per-node", "4", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"node1:{PORT}",
        "--rdzv-id", str(JOB_ID), "--max-restarts", "3", "--shutdown-timeout", "150", "-m", "strata.launcher.train",
        "--config", CONFIG,
        "train.run_dir=runs/my run", "train.max_steps=7"]
    assert "--ntasks-per-node=1" in slurm.read("srun.args").split()
    assert slurm.read("scontrol.log") == "" and slurm.read("scancel.args") == ""


def test_failed_job_is_not_requeued(slurm):
    proc = slurm(rc=1)
    proc.communicate(timeout=10)
    assert proc.returncode == 1 and slurm.read("scontrol.log") == ""


def test_preempted_exit_code_requeues(slurm):
    proc = slurm(rc=launch.PREEMPTED_EXIT)
    out = proc.communicate(timeout=10)[0]
    assert proc.returncode == 75, out
    assert slurm.read("scontrol.log") == f"requeue {JOB_ID}\n"


def test_usr1_before_the_time_limit_saves_and_requeues(slurm):
    proc = slurm(rc=1, sleep=30)  # torchrun exits 1 after a forwarded SIGTERM, whatever its workers did
    slurm.wait_running()
    t0 = time.monotonic()
    proc.send_signal(signal.SIGUSR1)
    out = proc.communicate(timeout=10)[0]
    assert time.monotonic() - t0 < 5, out
    assert proc.returncode == 1, out
    assert slurm.read("scancel.args") == f"--signal=TERM {JOB_ID}\n"
    assert slurm.read("torchrun.signals") == "TERM\n"  # the task got SIGTERM ...
    assert slurm.read("srun.signals") == ""  # ... and srun itself none (it would SIGKILL its tasks)
    assert slurm.read("scontrol.log") == f"requeue {JOB_ID}\n"


def test_slurms_own_sigterm_is_survived_and_not_requeued(slurm):
    """Preemption with a GraceTime or scancel: SLURM signals the tasks itself. The batch shell
    outlives a SIGTERM of its own, waits for the tasks to save, and leaves the requeue to SLURM."""
    proc = slurm(rc=launch.PREEMPTED_EXIT, sleep=30)
    slurm.wait_running()
    proc.send_signal(signal.SIGTERM)
    os.kill(int(slurm.read("task.pid")), signal.SIGTERM)
    out = proc.communicate(timeout=10)[0]
    assert proc.returncode == 75, out
    assert slurm.read("torchrun.signals") == "TERM\n" and slurm.read("scontrol.log") == ""
