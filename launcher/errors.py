"""How a command ends when something is wrong: one line naming the problem and the fix (said once,
by rank 0, in a job), and an exit code that says what kind of end it was, the same for every
command (docs/OPERATIONS.md, "Exit codes")."""
from __future__ import annotations

import errno
import sys
import threading
import time

from strata.launcher.config import ConfigError

FAILURE_EXIT = 1  # what the command read or wrote failed: a missing or damaged file, a data error, a full disk
CONFIG_EXIT = 2  # what was asked cannot be done as asked: a bad config key, value, flag or layout; nothing was started
DIVERGED_EXIT = 3  # too many non-finite steps in a row: the last good checkpoint is intact
PREEMPTED_EXIT = 75  # EX_TEMPFAIL, "try again later": a checkpoint was saved; the same command resumes


REPORT_GRACE_S = 10.0


class Diverged(Exception):
    """Too many consecutive non-finite steps, or non-finite weights; str() is one line."""


def report_error_once(message: str, is_main: bool, rank: int = 0, every_rank_has_it: bool = False) -> None:
    """Most problems every rank finds alike (a config, a checkpoint all of them verified, a decision they
    shared: parallel.distributed.on_every_rank); rank 0 says it at once. Another rank waits first:
    torchrun and the deepspeed launcher stop every rank as soon as one exits with an error, so when rank 0
    had it too, this rank is stopped before it repeats the line. A problem of this rank alone (a shard
    only it read) is said after the wait, under its rank, and its exit then ends the others' wait."""
    if is_main:
        print(f"error: {message}", file=sys.stderr, flush=True)
        return
    time.sleep(REPORT_GRACE_S)
    if not every_rank_has_it:
        said_by = "" if message.startswith("rank ") else f"rank {rank}: "  # on_every_rank named the rank
        print(f"error: {said_by}{message}", file=sys.stderr, flush=True)


# What the user asked for cannot run as asked, whatever the files hold: a config key or value (ConfigError), a
# flag, a layout, a model or architecture Strata cannot express (ValueError), an output that exists already, an
# optional dependency not installed.
REQUEST_ERRORS = (ValueError, FileExistsError, ImportError)


def exit_code_of(e: Exception) -> int:
    """docs/OPERATIONS.md, "Exit codes", for every command: 2 the request, 3 diverged, 1 anything the
    command read or wrote (a missing, incomplete or damaged checkpoint, a data error, a full disk)."""
    if isinstance(e, Diverged):
        return DIVERGED_EXIT
    return CONFIG_EXIT if isinstance(e, (ConfigError, *REQUEST_ERRORS)) else FAILURE_EXIT


def report_and_exit_code(e: Exception) -> int:
    """A single-process command's end (export, import, generate, prepare): the line, and its code."""
    system = isinstance(e, OSError) and e.errno is not None  # from the OS, not a message of ours
    print(f"error: {describe_os_error(e) if system else e}", file=sys.stderr)
    return exit_code_of(e)


def leave_os_errors_to_the_main_thread(args) -> None:
    """A writer thread (TensorBoard's) that fails on a full disk would print a traceback; the
    main thread meets the same error at its next write and says it in one line."""
    if not issubclass(args.exc_type, OSError):
        threading.__excepthook__(args)


def describe_os_error(e: OSError) -> str:
    where = f" ({e.filename})" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return (f"no space left on device{where}: free disk space (a lower checkpoint.keep_last frees nothing "
                "before the next checkpoint is complete), then run the "
                "same command again; complete checkpoints are intact")
    return f"{e.strerror or e}{where}: check the path, its permissions and the file system"
