"""Sharded checkpoints: the one module that knows their files, how they are written, verified
and opened. Every rank writes only its own shard; a checkpoint counts only once complete.

Layout under <run_dir>/checkpoints:
    step_00000100/          DeepSpeed's files (names below), written by torch's zipfile format
        rank_00000.pt       this rank's RNG states (plain tensors and ints) and, under ZeRO 0,
                            the names of its optimizer's parameters in state order
        trainer.json        the manifest, written last: step, layout, data cursor, self-guided
                            state, every other file's size and CRC32, and its own CRC32 (of the
                            rest of it, canonical JSON) under "manifest_crc32"
    latest                  the name of the newest complete checkpoint, for people and tools: no
                            reader trusts it (the newest is the highest complete step)
Each checkpoint is written as step_XXXXXXXX.tmp and renamed once every rank has finished; `latest`
is replaced atomically afterwards. A directory without trainer.json, or still named .tmp, is never
loaded; a .tmp left by a kill is removed when the next run starts. Every reader verifies what it
opens against the manifest (`verify`), and the manifest against its own checksum before trusting a
byte of it (`read_manifest`), so a damaged or missing file, the manifest included, is one line naming
it, never a silently wrong model or data position.

DeepSpeed's file names, per model-parallel index mp (stage x tp + tp_rank) and data-parallel rank dp
(deepspeed/runtime/engine.py: _get_ckpt_name, _get_zero_ckpt_name; pipe/module.py: ckpt_layer_path):
    mp_rank_<mp>_model_states.pt                  module (ZeRO 0-2, pp = 1), schedule, counters
    zero_pp_rank_<dp>_mp_rank_<mp>_optim_states.pt ZeRO 1-3 partitions of the fp32 weights and AdamW
                                                  (bf16_zero_pp_rank_... with train.param_dtype=bf16)
    zero_pp_rank_<dp>_mp_rank_<mp>_model_states.pt ZeRO-3's per-rank module record
    layer_<i>-model_<tp_rank>-model_states.pt     pp > 1: one file per pipeline layer and TP rank
A weights-only checkpoint (`strata import`) holds model.safetensors and its manifest.
"""
from __future__ import annotations

import errno
import io
import json
import mmap
import os
import random
import re
import shutil
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from strata.parallel.distributed import decided_by_rank0, long_wait_group, on_every_rank
from strata.parallel.layout import Layout

# DeepSpeed's own plain records inside ZeRO optimizer shards: the only classes a load may build.
DEEPSPEED_RECORDS = [fragment_address, LossScaler, ZeroStageEnum]
STEP_DIR = re.compile(r"^step_(\d{8})$")
MANIFEST = "trainer.json"
FORMAT_VERSION = 3  # 3: the manifest's own checksum (2: every other file's; 1: none)
MANIFEST_CRC = "manifest_crc32"
MODEL_STATES = "mp_rank_{mp:02d}_model_states.pt"
ZERO_OPTIM = "zero_pp_rank_{dp}_mp_rank_{mp:02d}_optim_states.pt"
BF16_PREFIX = "bf16_"  # DeepSpeed's prefix of ZeRO optimizer files in its bf16 mode (engine._get_zero_ckpt_prefix)
ZERO3_MODEL = "zero_pp_rank_{dp}_mp_rank_{mp:02d}_model_states.pt"
ZERO3_MODEL_FILE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
PIPELINE_LAYER = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
RANK_FILE = "rank_{rank:05d}.pt"
WEIGHTS_FILE = "model.safetensors"
DAMAGED_SUFFIX = ".damaged"
HASH_BLOCK = 32 << 20
HASH_THREADS = min(8, os.cpu_count() or 1)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used or written; str() is one line naming it and the fix."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def atomic_write(path: Path, data: str | bytes) -> None:
    """The file holds the old content or the new, whatever kills the process: written beside it,
    synced, renamed over it, and the rename itself synced."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


# ----------------------------------------------------------------------------------------
# RNG
# ----------------------------------------------------------------------------------------

def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
             "python_pos": random.getstate()[2], "numpy": np.random.get_state()[1].copy(),
             "numpy_pos": int(np.random.get_state()[2])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    state["numpy"] = torch.from_numpy(state["numpy"].astype(np.int64))
    state["python"] = torch.tensor(state["python"], dtype=torch.int64)
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), state["python_pos"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------------------
# Finding checkpoints
# ----------------------------------------------------------------------------------------

def complete_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.name)


def newest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint: the highest step (a damaged `latest` could name an older one)."""
    done = complete_checkpoints(root)
    return done[-1] if done else None


def remove_stale_partials(root: Path) -> list[str]:
    """Saves a kill interrupted (step_*.tmp, latest.tmp): never loadable, so they only take disk."""
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.name.endswith(".tmp")]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    return [p.name for p in stale]


def resolve_checkpoint(path: str | Path) -> Path:
    """A complete, verified step directory from a run dir, a run's checkpoints/ dir, or a step dir
    (the single-process readers' way in: export, generate). A damaged one is refused in one line
    naming the file and the newest earlier checkpoint that verifies."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; give a run directory or one of its "
                              "checkpoints/step_XXXXXXXX directories")
    if STEP_DIR.match(path.name) or path.name.endswith(".tmp"):
        if not (path / MANIFEST).is_file() or path.name.endswith(".tmp"):
            raise CheckpointError(f"checkpoint {path} is incomplete (no {MANIFEST}: its save was interrupted); "
                                  "use an earlier complete one or the run directory")
        ckpt = path
    else:
        root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        ckpt = newest_checkpoint(root)
        if ckpt is None:
            raise CheckpointError(f"{path} holds no complete checkpoint (looked for {root}/step_XXXXXXXX with "
                                  f"{MANIFEST}); train first, or give a step directory")
    problems = verify(ckpt)
    if problems:
        raise CheckpointError(damaged_message(ckpt, problems, newest_verified_before(ckpt), "--checkpoint"))
    return ckpt


# ----------------------------------------------------------------------------------------
# The manifest and integrity
# ----------------------------------------------------------------------------------------

def zero_optim_file(layout: Layout, dp: int, mp: int) -> str:
    """The ZeRO optimizer shard of data-parallel rank dp and model-parallel index mp, as the
    layout (its parameter dtype) named it."""
    return (BF16_PREFIX if layout.param_dtype == "bf16" else "") + ZERO_OPTIM.format(dp=dp, mp=mp)


def pipeline_layer_files(ckpt: Path) -> list[tuple[int, int, Path]]:
    """(layer, tp_rank, path) of every per-layer module file DeepSpeed's pipeline wrote (pp > 1)."""
    found = ((PIPELINE_LAYER.match(p.name), p) for p in ckpt.iterdir())
    return sorted((int(m.group(1)), int(m.group(2)), p) for m, p in found if m)


def manifest_text(manifest: dict) -> str:
    """The manifest as written: the fields, then the CRC32 of their canonical JSON (sorted keys, no spaces),
    which read_manifest checks before anything in it is trusted."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_CRC}
    return json.dumps({**body, MANIFEST_CRC: _canonical_crc32(body)}, indent=2)


def _canonical_crc32(body: dict) -> int:
    return zlib.crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def read_manifest(ckpt: Path) -> dict:
    """The manifest's fields, checked against their own checksum (format 3 and later)."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {ckpt} has no readable {MANIFEST} ({e.__class__.__name__}); "
                              "it is incomplete or damaged: delete it, or use an earlier complete checkpoint") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{MANIFEST} is not a manifest (a JSON {type(manifest).__name__})")
    want = manifest.pop(MANIFEST_CRC, None)
    if want is None and manifest.get("format", 0) >= 3:
        raise CheckpointError(f"{MANIFEST} has lost its checksum ({MANIFEST_CRC})")
    if want is not None and want != _canonical_crc32(manifest):
        raise CheckpointError(f"{MANIFEST} fails its checksum (crc32 {_canonical_crc32(manifest)}, "
                              f"recorded {want}): a field of it changed since it was written")
    return manifest


def saved_layout(manifest: dict) -> Layout:
    """The layout that wrote a checkpoint (checkpoints of `strata import` have none: one process)."""
    return Layout.from_record(manifest.get("layout") or {"world_size": 1})


def file_digest(path: Path) -> dict:
    """Size and checksum of a file as it is on disk: the CRC32 of each HASH_BLOCK of it, computed
    by several threads at once (zlib releases the GIL; the file is memory-mapped, so nothing is
    copied), folded into one CRC32 of those block CRCs. What verify() reads; a save gets the same
    digest from HashingWriter without reading anything back. CRC32 catches flipped and truncated
    bytes, which is its job here (hostile files are handled by weights-only loading)."""
    size = path.stat().st_size
    blocks = []
    if size:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            with memoryview(mapped) as view:
                offsets = range(0, size, HASH_BLOCK)
                if len(offsets) == 1:
                    blocks = [zlib.crc32(view)]
                else:
                    with ThreadPoolExecutor(HASH_THREADS) as pool:
                        blocks = list(pool.map(lambda at: zlib.crc32(view[at:at + HASH_BLOCK]), offsets))
    return _fold(size, blocks)


def _fold(size: int, blocks: list[int]) -> dict:
    folded = zlib.crc32(b"".join(crc.to_bytes(4, "little") for crc in blocks))
    return {"bytes": size, "crc32": f"{folded:08x}"}


def digest_files(directory: Path, names: list[str]) -> dict[str, dict]:
    return {name: file_digest(directory / name) for name in names}


def verify(ckpt: Path, rank: int = 0, world: int = 1) -> list[str]:
    """Problems of a checkpoint's files against its manifest: this rank's share (every world-th
    file) of them; [] when all match. A manifest written before checksums existed lists none."""
    try:
        files = read_manifest(ckpt).get("files", {})
    except CheckpointError as e:
        return [str(e)]
    problems = []
    for name in sorted(files)[rank::world]:
        path = ckpt / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        found, want = file_digest(path), files[name]
        if found["bytes"] != want["bytes"]:
            problems.append(f"{name} has {found['bytes']} bytes, the manifest says {want['bytes']} (truncated or replaced)")
        elif found["crc32"] != want["crc32"]:
            problems.append(f"{name} fails its checksum (crc32 {found['crc32']}, manifest {want['crc32']})")
    return problems


def verify_collective(ckpt: Path) -> list[str]:
    """Collective: the ranks share the reading; every rank gets every problem."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return verify(ckpt)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, verify(ckpt, dist.get_rank(), dist.get_world_size()))
    return sorted(p for part in gathered for p in part)


def newest_verified_before(ckpt: Path, check: Callable[[Path], list[str]] = verify) -> Path | None:
    earlier = [p for p in complete_checkpoints(ckpt.parent) if p.name < ckpt.name]
    return next((p for p in reversed(earlier) if not check(p)), None)


def damaged_message(ckpt: Path, problems: list[str], earlier: Path | None, how: str) -> str:
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    if earlier is None:
        fix = "no earlier checkpoint verifies: restore the file from a copy, or start the run anew"
    elif how == "--checkpoint":
        fix = f"the newest earlier checkpoint that verifies is {earlier}: pass --checkpoint {earlier}"
    else:
        fix = (f"the newest earlier checkpoint that verifies is {earlier.name}: resume from it with "
               f"checkpoint.on_corrupt=previous, or restore the file")
    return f"checkpoint {ckpt} is damaged: {problems[0]}{more}; {fix}"


def checkpoint_to_resume(root: Path, on_corrupt: str, is_main: bool) -> tuple[Path | None, list[str]]:
    """Collective. The newest complete checkpoint that verifies, and what was done on the way
    (stale partial saves removed; with on_corrupt='previous', damaged ones set aside as
    step_XXXXXXXX.damaged). With on_corrupt='fail' a damaged newest checkpoint stops the run in
    one line naming the file and the newest earlier one that verifies. Rank 0 decides which checkpoint
    is newest and every rank checks that it sees it: ranks that chose from their own view of the disk
    (node-local or stale storage) would enter different collectives."""
    notes, set_aside_names = [], set()
    if is_main:
        stale = remove_stale_partials(root)
        if stale:
            notes.append(f"removed {len(stale)} unfinished save(s) left by an interrupted run: {', '.join(stale)}")
    ckpt = newest_seen_by_every_rank(root)
    while ckpt is not None:
        problems = verify_collective(ckpt)
        if not problems:
            return ckpt, notes
        if on_corrupt == "fail":
            raise CheckpointError(damaged_message(ckpt, problems, newest_verified_before(ckpt, verify_collective),
                                                  "on_corrupt"))
        if ckpt.name in set_aside_names:  # renamed by the main rank, yet rank 0 still sees it
            raise CheckpointError(f"checkpoint {ckpt.name} was set aside by rank 0 but is still in {root} here; "
                                  "put the run directory on a filesystem every node shares")
        notes.append(f"checkpoint {ckpt.name} is damaged ({problems[0]}): set aside as "
                     f"{ckpt.name}{DAMAGED_SUFFIX}; trying the one before it")
        set_aside(ckpt, is_main)
        set_aside_names.add(ckpt.name)
        ckpt = newest_seen_by_every_rank(root)
    if set_aside_names:
        raise CheckpointError(f"no checkpoint under {root} verifies ({notes[-1]}); restore the files from a "
                              "copy, or move the run directory away to start anew")
    return None, notes


def newest_seen_by_every_rank(root: Path) -> Path | None:
    """Collective: the newest complete checkpoint as rank 0 sees it, on every rank; one that another rank
    cannot see stops every rank in one line naming it and that rank (on_every_rank)."""
    name = decided_by_rank0(lambda: getattr(newest_checkpoint(root), "name", None))
    if name is None:
        return None

    def visible() -> Path:
        if not (root / name / MANIFEST).is_file():
            raise CheckpointError(f"checkpoint {name}, which rank 0 resumes from, is not visible here ({root / name}): "
                                  "is train.run_dir node-local or stale? put it on a filesystem every node shares")
        return root / name

    return on_every_rank(visible)


def set_aside(ckpt: Path, is_main: bool) -> None:
    """A damaged checkpoint is renamed (kept for inspection), so no reader or rotation meets it again."""
    if is_main:
        target = ckpt.with_name(ckpt.name + DAMAGED_SUFFIX)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(ckpt, target)
        latest = ckpt.parent / "latest"
        if latest.is_file() and latest.read_text().strip() == ckpt.name:
            latest.unlink()
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------

def safe_load(path: Path, zero_optimizer: bool = False, mmap: bool = True) -> dict:
    """torch.load without unpickling arbitrary objects (memory-mapped: tensors are read on use).
    ZeRO optimizer files also hold DeepSpeed's plain records, allowed by name with zero_optimizer."""
    allowed = DEEPSPEED_RECORDS if zero_optimizer else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises several types for damaged or hostile files
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise CheckpointError(f"cannot read {path}: {first[:200]}; the file is damaged or not from Strata") from None


def need(path: Path) -> Path:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path.parent} lacks {path.name}; a rank did not finish saving: "
                              "use an earlier complete checkpoint")
    return path


class HashingWriter(io.RawIOBase):
    """A file being written whose file_digest is taken from the bytes as they pass, on a second
    thread while this one writes them (zlib releases the GIL): a save reads nothing back, and the
    hash hides behind the write."""

    OVERLAP_BYTES = 1 << 20  # smaller writes are hashed in line: a hand-off costs more than it hides

    def __init__(self, path: Path):
        super().__init__()
        self._file = open(path, "wb")
        self._hasher: ThreadPoolExecutor | None = None
        self._size, self._crc, self._blocks = 0, 0, []

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if len(view) < self.OVERLAP_BYTES:
            self._hash(view)
            self._file.write(view)
            return len(view)
        self._hasher = self._hasher or ThreadPoolExecutor(1)
        hashed = self._hasher.submit(self._hash, view)
        self._file.write(view)
        hashed.result()
        return len(view)

    def _hash(self, view: memoryview) -> None:
        """The running CRC32 of the current HASH_BLOCK, closed at each block boundary."""
        at = 0
        while at < len(view):
            piece = view[at:at + HASH_BLOCK - self._size % HASH_BLOCK]
            self._crc = zlib.crc32(piece, self._crc)
            self._size += len(piece)
            at += len(piece)
            if self._size % HASH_BLOCK == 0:
                self._blocks.append(self._crc)
                self._crc = 0

    def close(self) -> None:
        if not self.closed:
            self._file.close()
            if self._hasher is not None:
                self._hasher.shutdown()
        super().close()

    def digest(self) -> dict:
        """What file_digest gives for the file written."""
        return _fold(self._size, self._blocks + ([self._crc] if self._size % HASH_BLOCK else []))


class StrataCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch engine, always writing torch's zipfile format (which every reader
    memory-maps), hashing every file as it writes it (`digests`, for the manifest), and loading
    without unpickling arbitrary objects. Installed on every engine before each save and load:
    DeepSpeed's own default depends on how the engine was built."""

    def __init__(self):
        super().__init__(None)
        self.zipfile_serialization = True
        self.digests: dict[str, dict] = {}

    def save(self, state_dict, path: str) -> None:
        with HashingWriter(Path(path)) as f:
            torch.save(state_dict, f)
        self.digests[Path(path).name] = f.digest()

    def load(self, path: str, map_location=None):
        return safe_load(Path(path), zero_optimizer=True, mmap=False)


def use_strata_format(engine) -> None:
    if not isinstance(engine.checkpoint_engine, StrataCheckpointEngine):
        engine.checkpoint_engine = StrataCheckpointEngine()


# ----------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------

def save_checkpoint(engine, root: Path, step: int, trainer_state: dict, keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the final directory. A failure on any rank
    (a full disk, an I/O error) is a CheckpointError on every rank, the partial save removed and
    the previous checkpoints untouched. (parallel/checkpoint/background.py writes the same files in
    the background: begin_save, write_rank_files and commit_save are the steps both take.)"""
    use_strata_format(engine)
    writer = engine.checkpoint_engine
    writer.digests = {}
    tmp = begin_save(root, step)
    error = write_rank_files(engine, writer, root, tmp)
    raise_if_any_failed(error, root, tmp, step)
    return commit_save(root, step, trainer_state, keep_last, writer.digests)


def begin_save(root: Path, step: int) -> Path:
    """Collective: the step's .tmp directory, emptied by rank 0 before any rank writes in it."""
    tmp = root / (step_name(step) + ".tmp")
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    return tmp


def write_rank_files(engine, writer: StrataCheckpointEngine, root: Path, tmp: Path) -> str | None:
    """Collective (DeepSpeed's save): this rank's files through `writer` (the engine's checkpoint
    engine); None, or one line saying why this rank's write failed."""
    error = _try_write(lambda: engine.save_checkpoint(str(root), tag=tmp.name, save_latest=False),
                       deepspeed_save=True)
    rank_file = str(tmp / RANK_FILE.format(rank=dist.get_rank()))
    return error or _try_write(lambda: writer.save({**rng_state(), "optimizer_param_names": optimizer_param_names(engine)},
                                                   rank_file))


def commit_save(root: Path, step: int, trainer_state: dict, keep_last: int, digests: dict[str, dict]) -> Path:
    """Collective, once every rank has written its files (`digests`, as hashed while written): rank 0
    writes the manifest, renames the .tmp directory to its final name, updates `latest` and deletes
    what keep_last no longer keeps."""
    rank, world = dist.get_rank(), dist.get_world_size()
    final, tmp = root / step_name(step), root / (step_name(step) + ".tmp")
    parts = [None] * world
    dist.all_gather_object(parts, digests)
    error = None
    if rank == 0:
        error = _try_write(lambda: _commit(root, tmp, final, {**trainer_state, "format": FORMAT_VERSION,
                                                              "files": _every_file(tmp, parts)}, keep_last))
    raise_if_any_failed(error if rank == 0 else None, root, tmp, step)
    return final


def _every_file(tmp: Path, hashed_while_written: list[dict]) -> dict[str, dict]:
    """Every file of the checkpoint with its digest: those the ranks hashed as they wrote them,
    and any other found in it, read back here (DeepSpeed 0.19 copies its zero_to_fp32.py and
    zero_to_torch.py beside the step directories, not into them: those are not listed)."""
    files = {name: digest for part in hashed_while_written for name, digest in part.items()}
    others = sorted(p.name for p in tmp.iterdir() if p.name not in files)
    return {**files, **digest_files(tmp, others)}


def _commit(root: Path, tmp: Path, final: Path, manifest: dict, keep_last: int) -> None:
    atomic_write(tmp / MANIFEST, manifest_text(manifest))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write(root / "latest", final.name + "\n")
    for old in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _try_write(write: Callable[[], object], deepspeed_save: bool = False) -> str | None:
    """None, or one line saying why this rank's write failed."""
    try:
        write()
        return None
    except (OSError, RuntimeError) as e:  # torch reports a full disk as RuntimeError ("unexpected pos")
        if deepspeed_save and dist.is_initialized():
            dist.barrier()  # the barrier DeepSpeed ends its save with, which this rank did not reach
        return describe_write_error(e)


def describe_write_error(e: Exception) -> str:
    text = str(e).strip().splitlines()[0][:200] if str(e).strip() else e.__class__.__name__
    full = getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e) or "unexpected pos" in str(e)
    return "no space left on device" if full else text


def raise_if_any_failed(error: str | None, root: Path, tmp: Path, step: int) -> None:
    """Collective: every rank learns whether any failed; the partial save is removed. On the long-wait
    group: after a save, the other ranks wait here while rank 0 commits it (manifest, rename, rotation)."""
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error, group=long_wait_group())
    first = next((e for e in errors if e), None)
    if first is None:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    previous = newest_checkpoint(root)
    kept = f"the previous checkpoint {previous.name} is intact" if previous else "no earlier checkpoint exists"
    fix = _room_to_make(root, previous) if first == "no space left on device" else "check the file system"
    free = shutil.disk_usage(root).free / 2**20 if root.exists() else 0.0
    raise CheckpointError(f"cannot write checkpoint {step_name(step)} under {root}: {first} "
                          f"({free:.0f} MiB free); {fix}, then run the same command again: {kept}")


def _room_to_make(root: Path, previous: Path | None) -> str:
    """What frees enough disk for the next save. Not a lower checkpoint.keep_last: old checkpoints are
    deleted only after a new one is complete, so it frees nothing before the save that failed."""
    if previous is None:
        return "free disk space, or give train.run_dir a larger disk"
    need = sum(f.stat().st_size for f in previous.iterdir() if f.is_file()) / 2**20
    older = [p.name for p in complete_checkpoints(root)[:-1]]
    spare = f"remove {', '.join(older)} (older than {previous.name}) from {root}, or " if older else ""
    return f"free at least {need:.0f} MiB (what {previous.name} takes): {spare}free space elsewhere on that disk, " \
           "or give train.run_dir a larger disk"


def optimizer_param_names(engine) -> list[list[str]]:
    """Under ZeRO 0 torch's optimizer state is keyed by position in its param groups; these
    names, in that order, let parallel/checkpoint/reshard.py read it on another layout. Empty under
    ZeRO 1-3, whose files name every parameter's fragment themselves."""
    if engine.zero_optimization_stage() > 0:
        return []
    names = {id(p): n for n, p in engine.module.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in engine.optimizer.param_groups]


def write_weights_only(root: Path, state_dict: dict[str, torch.Tensor], step: int = 0) -> Path:
    """A complete checkpoint under root (a run's checkpoints/ dir) holding only the weights
    (`strata import`): written under a .tmp name, manifest (with the file's checksum) last,
    renamed, then `latest` updated."""
    from safetensors.torch import save_file

    final = root / step_name(step)
    tmp = root / (final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
    manifest = {"step": step, "weights_only": True, "format": FORMAT_VERSION,
                "files": digest_files(tmp, [WEIGHTS_FILE])}
    atomic_write(tmp / MANIFEST, manifest_text(manifest))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write(root / "latest", final.name + "\n")
    return final


# ----------------------------------------------------------------------------------------
# Loading (same layout; parallel/checkpoint/reshard.py reads another)
# ----------------------------------------------------------------------------------------

def load_checkpoint(engine, ckpt: Path, rank: int) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from a verified checkpoint written
    by this same layout; returns the trainer state."""
    use_strata_format(engine)
    path, _ = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                                     load_lr_scheduler_states=True)
    if path is None:
        raise CheckpointError(f"checkpoint {ckpt}: DeepSpeed found no model states for this rank; "
                              "the directory is damaged: delete it to resume from the previous one")
    return load_trainer_state(ckpt, rank)


def load_trainer_state(ckpt: Path, rank: int) -> dict:
    """The manifest, and this rank's RNG where the checkpoint has a file for it (a resharded
    resume on more ranks than wrote it leaves the new ranks' RNG as seeded)."""
    state = read_manifest(ckpt)
    rng_file = ckpt / RANK_FILE.format(rank=rank)
    if rng_file.is_file():
        set_rng_state(safe_load(rng_file, mmap=False))
    return state
