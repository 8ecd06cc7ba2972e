"""Checkpoints written in the background (`checkpoint.async`): the training step waits only for a
copy of each rank's state in host memory; a thread writes it while training goes on.

The files, their order and every guarantee are those of files.save_checkpoint (whose module
docstring is the format's contract); only who writes the shards, and when the commit happens, differ:

    start()    collective, at a step boundary: the .tmp directory is made (files.begin_save), DeepSpeed's
               save runs as usual, but its checkpoint engine (SnapshotEngine) copies each state dict
               into host memory (pinned on GPU; the optimizer goes on updating the live tensors) and
               queues it for this rank's writer thread, which writes and hashes the files
               (HashingWriter) in the order DeepSpeed gave them. The step waits for the copies only.
    written_everywhere()
               collective, one small all-reduce at each step boundary while a save is in flight:
               whether every rank's writer has finished (a failed write counts as finished).
    finish()   collective: waits for this rank's writer, then files.raise_if_any_failed (a write error on
               any rank, a full disk, is the synchronous save's one-line CheckpointError on every rank,
               the .tmp removed, the previous checkpoint intact) and files.commit_save (manifest last,
               atomic rename, `latest`, keep_last rotation).

Every collective runs on the main thread; the writer thread only writes files. Until finish() has
renamed it, the save is a step_XXXXXXXX.tmp directory that no reader loads, so a crash or SIGKILL
during the write leaves the previous checkpoint the newest complete one, and the next start removes
the .tmp (files.remove_stale_partials). At most one save is in flight (launcher/train.py decides,
with checkpoint.async_busy, what a save due meanwhile does).

The copy keeps what torch.save writes: every storage once, however many tensors view it, with its
offsets, strides, dtype, Parameter type, requires_grad and attributes, so the files are the
synchronous save's byte for byte on CPU (on GPU their storages are recorded as 'cpu': every reader
loads to the CPU anyway).

For tests only: STRATA_TEST_CHECKPOINT_WRITE_DELAY=<seconds> makes the writer wait that long before
each file, so that a test can act while a background write is in flight (read here, nowhere else).
"""
from __future__ import annotations

import copy
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from strata.parallel.checkpoint import files

WRITE_DELAY_VARIABLE = "STRATA_TEST_CHECKPOINT_WRITE_DELAY"


def host_snapshot(state_dict):
    """A copy of a state dict whose tensors live in host memory, apart from the live ones. The
    object graph is kept as torch.save pickles it: what the state dict refers to twice, the copy
    refers to twice (one memo, as copy.deepcopy's), each storage is copied once."""
    return _copied(state_dict, {})


def _copied(obj, memo: dict):
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, torch.Tensor):
        out = _host_tensor(obj, memo)
    elif isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the type and attributes (a module state dict's _metadata)
        memo[id(obj)] = out
        for key, value in obj.items():
            out[key] = _copied(value, memo)
    elif isinstance(obj, list):
        out = memo[id(obj)] = []
        out.extend(_copied(v, memo) for v in obj)
    elif isinstance(obj, tuple):
        items = [_copied(v, memo) for v in obj]
        same = all(a is b for a, b in zip(items, obj))
        out = obj if same else type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    else:
        return copy.deepcopy(obj, memo)
    memo[id(obj)] = out
    memo.setdefault("keep alive", []).append(obj)  # no id is reused while the copy is made
    return out


def _host_tensor(t: torch.Tensor, memo: dict) -> torch.Tensor:
    storage = t.untyped_storage()
    key = ("storage", storage._cdata)  # what torch.save tells storages apart by: views of one storage stay one
    host = memo.get(key)
    if host is None:
        host = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=t.is_cuda).untyped_storage()
        host.copy_(storage, non_blocking=t.is_cuda)
        memo[key] = host
    out = torch.empty(0, dtype=t.dtype).set_(host, t.storage_offset(), t.size(), t.stride())
    if isinstance(t, torch.nn.Parameter):
        out = torch.nn.Parameter(out, requires_grad=t.requires_grad)
    elif t.requires_grad:
        out.requires_grad_(True)
    out.__dict__.update(t.__dict__)
    return out


class FileWriter:
    """One thread writing the files queued to it, in order, each hashed as it is written; the first
    failure is kept (one line, as the synchronous save words it) and the files after it are dropped."""

    def __init__(self):
        self.digests: dict[str, dict] = {}
        self.error: str | None = None
        self._queue: queue.Queue = queue.Queue()
        self._delay = float(os.environ.get(WRITE_DELAY_VARIABLE, "0") or 0)
        threading.Thread(target=self._run, name="strata-checkpoint-writer", daemon=True).start()

    def submit(self, path: Path, state) -> None:
        self._queue.put((path, state))

    def busy(self) -> bool:
        return self._queue.unfinished_tasks > 0

    def wait(self) -> None:
        self._queue.join()

    def _run(self) -> None:
        while True:
            path, state = self._queue.get()
            try:
                if self.error is None:
                    self._write(path, state)
            except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError ("unexpected pos")
                self.error = files.describe_write_error(e)
            finally:
                del state  # the host copy goes as soon as its file is written
                self._queue.task_done()

    def _write(self, path: Path, state) -> None:
        time.sleep(self._delay)
        with files.HashingWriter(path) as f:
            torch.save(state, f)
        self.digests[path.name] = f.digest()


class SnapshotEngine(files.StrataCheckpointEngine):
    """The checkpoint engine DeepSpeed saves through during start(): save() copies the state dict
    into host memory and hands it to the writer, so DeepSpeed's save returns once the copy is made."""

    def __init__(self, writer: FileWriter):
        super().__init__()
        self.writer = writer

    def save(self, state_dict, path: str) -> None:
        snapshot = host_snapshot(state_dict)
        if torch.cuda.is_available():
            torch.cuda.current_stream().synchronize()  # the copies are made before the step goes on
        self.writer.submit(Path(path), snapshot)


@dataclass
class InFlight:
    root: Path
    step: int
    trainer_state: dict
    keep_last: int
    writer: FileWriter

    @property
    def name(self) -> str:
        return files.step_name(self.step)


class BackgroundSaves:
    """The save in flight, if any (at most one), as the module docstring describes."""

    def __init__(self):
        self.in_flight: InFlight | None = None

    def start(self, engine, root: Path, step: int, trainer_state: dict, keep_last: int) -> None:
        """Collective; returns once this rank's state is copied to host memory and queued."""
        if self.in_flight is not None:
            raise RuntimeError(f"a save started while {self.in_flight.name} is in flight; finish() it first")
        files.use_strata_format(engine)
        live = engine.checkpoint_engine
        writer = FileWriter()
        tmp = files.begin_save(root, step)
        engine.checkpoint_engine = SnapshotEngine(writer)
        try:
            error = files.write_rank_files(engine, engine.checkpoint_engine, root, tmp)
        finally:
            engine.checkpoint_engine = live
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, error)
        if any(errors):
            writer.wait()  # nothing may still be writing in the .tmp that is about to be removed
            files.raise_if_any_failed(error, root, tmp, step)
        self.in_flight = InFlight(root, step, trainer_state, keep_last, writer)

    def written_everywhere(self, device: torch.device) -> bool:
        """Collective: every rank's writer is done with the save in flight (False when none is)."""
        if self.in_flight is None:
            return False
        return not _any_rank(self.in_flight.writer.busy(), device)

    def finish(self) -> Path:
        """Collective: waits for the save in flight and commits it; returns its final directory. A
        write that failed on any rank raises files.CheckpointError on every rank."""
        saving, self.in_flight = self.in_flight, None
        saving.writer.wait()
        tmp = saving.root / (saving.name + ".tmp")
        files.raise_if_any_failed(saving.writer.error, saving.root, tmp, saving.step)
        return files.commit_save(saving.root, saving.step, saving.trainer_state, saving.keep_last,
                                 saving.writer.digests)


def _any_rank(flag: bool, device: torch.device) -> bool:
    """Collective: whether `flag` holds on any rank (one small all-reduce)."""
    t = torch.tensor([float(flag)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
