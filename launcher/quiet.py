"""Third-party start-up noise kept off the terminal: Strata's own line comes first.

    quiet_third_party()                          # launcher/cli.py:main, and launcher/train.py as torchrun's entry
    STRATA_LOG=debug strata train                # leaves every library's logging as it is

One explicit call, made by each process entry point before anything imports DeepSpeed (never an
import side effect, so what a command prints does not depend on import order). What it does:

- DeepSpeed, when it finds no GPU at import, logs "[WARNING] Setting accelerator to CPU..." on
  stdout. Strata uses CUDA when torch sees it and the CPU otherwise, so it names the CPU itself,
  through DeepSpeed's own override (``DS_ACCELERATOR=cpu``, inherited by the ranks a launcher
  starts); DeepSpeed and Strata then agree on the device (on a Mac DeepSpeed would pick MPS, where
  Strata trains on the CPU). A ``DS_ACCELERATOR`` the user set is kept.
- DeepSpeed's ZeRO calls torch.distributed functions that torch has deprecated, and each rank
  prints torch's FutureWarning about it on every run; a user can do nothing about it, so those
  deprecation warnings are ignored.
- megatron-core warns at import, once per module that looks, that Transformer Engine and Apex are not
  installed and it falls back to its own implementations. Strata uses megatron-core's process groups
  and tensor-parallel layers only, none of what those libraries would accelerate, so the warning is
  ignored (`strata export` printed it before its own first line).
- ``stdout_is_output``: for the commands whose stdout is their result (``strata generate``'s text,
  ``strata export``'s summary), DeepSpeed's logger writes to stderr instead of stdout.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

DEBUG_ENV = "STRATA_LOG"
"""``STRATA_LOG=debug`` asks for third-party logging as the libraries do it by default."""


def debug_logging(env=os.environ) -> bool:
    return env.get(DEBUG_ENV, "").strip().lower() == "debug"


def quiet_third_party(stdout_is_output: bool = False, env=os.environ) -> None:
    """Call once per process, before DeepSpeed is imported (calling again changes nothing)."""
    if not debug_logging(env):
        if "DS_ACCELERATOR" not in env and "deepspeed" not in sys.modules:
            import torch

            if not torch.cuda.is_available():  # DeepSpeed's own fallback, without its warning
                env["DS_ACCELERATOR"] = "cpu"
        warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r"Transformer Engine and Apex are not installed", category=UserWarning)
    if stdout_is_output:
        import deepspeed.utils

        for handler in deepspeed.utils.logger.handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
                handler.setStream(sys.stderr)
