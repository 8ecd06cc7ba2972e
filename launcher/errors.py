"""How a rank of a job ends when something is wrong: one line naming the problem and the fix,
said once (by rank 0), and an exit code that says what kind of end it was (docs/OPERATIONS.md,
"Exit codes")."""
from __future__ import annotations

import errno
import sys
import threading
import time

from strata.launcher.config import ConfigError

FAILURE_EXIT = 1  # a damaged checkpoint, a data error, a full disk: the line says which
CONFIG_EXIT = 2  # a bad config key, value, flag or layout: nothing was started
DIVERGED_EXIT = 3  # too many non-finite steps in a row: the last good checkpoint is intact
PREEMPTED_EXIT = 75  # EX_TEMPFAIL, "try again later": a checkpoint was saved; the same command resumes


REPORT_GRACE_S = 10.0


class Diverged(Exception):
    """Too many consecutive non-finite steps, or non-finite weights; str() is one line."""


def report_error_once(message: str, is_main: bool) -> None:
    """Every rank finds the same problem; rank 0 says it. The others wait before they exit:
    torchrun and the deepspeed launcher stop every rank as soon as one exits with an error,
    and rank 0 must have printed by then (rank 0's own exit ends the wait for them)."""
    if is_main:
        print(f"error: {message}", file=sys.stderr, flush=True)
    else:
        time.sleep(REPORT_GRACE_S)


def exit_code_of(e: Exception) -> int:
    """docs/OPERATIONS.md, "Exit codes": 2 a bad config, 3 diverged, 75 preempted, 1 anything else."""
    if isinstance(e, ConfigError):
        return CONFIG_EXIT
    return DIVERGED_EXIT if isinstance(e, Diverged) else FAILURE_EXIT


def leave_os_errors_to_the_main_thread(args) -> None:
    """A writer thread (TensorBoard's) that fails on a full disk would print a traceback; the
    main thread meets the same error at its next write and says it in one line."""
    if not issubclass(args.exc_type, OSError):
        threading.__excepthook__(args)


def describe_os_error(e: OSError) -> str:
    where = f" ({e.filename})" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return (f"no space left on device{where}: free disk space (or lower checkpoint.keep_last), then run the "
                "same command again; complete checkpoints are intact")
    return f"{e.strerror or e}{where}: check the path, its permissions and the file system"
