"""Input discovery and document reading: files, directories, globs, JSONL (plain/.gz/.zst),
Parquet and Arrow (data/tables.py, imported only when such an input is given).

Policies (stated once, tested in tests/data):
- Order: every input argument expands to its files in sorted path order; arguments keep their
  order; a file named twice is read once.
- Documents: a text or source file is one document; a JSONL record's ``text_field`` is one, and
  so is a Parquet or Arrow row's ``text_field`` column. Empty documents (and null values) are
  skipped (they would only add an EOS).
- A directory as ``datasets``' ``save_to_disk`` writes it (``state.json`` and
  ``dataset_info.json`` beside Arrow stream files) stands for the files its state.json lists in
  ``_data_files``, in that order; nothing else in it is read.
- Work is cut into pieces that each know their input bytes (``Piece.nbytes``): the pieces of a
  file add up to its size, so progress and the manifest count every input byte once.
- Invalid UTF-8: undecodable bytes become U+FFFD (Python's errors="replace"); the count of
  affected documents is recorded in the manifest and logged with the first file names.
- Directories skip hidden entries and files that look binary (a NUL byte in the first 8 KiB
  of their content, checked when read); a file named explicitly is always read.
- A file that cannot be read, or a JSONL line that is not a JSON object with a string
  ``text_field``, is a DataError naming the file (and line) and the fix.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import math
import os
import sysconfig
from dataclasses import dataclass
from typing import IO, Iterator

import zstandard

from .config import STDLIB
from .errors import DataError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
TABLE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}  # read by data/tables.py through pyarrow
SAVE_TO_DISK_FILES = ("state.json", "dataset_info.json")  # a directory `datasets`' save_to_disk wrote
TABLE_KINDS = set(TABLE_SUFFIXES.values())
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


@dataclass(frozen=True)
class InputFile:
    path: str
    kind: str        # "text" (one document), "jsonl" (one per line), "parquet" or "arrow" (one per row)
    codec: str       # "", "gz" or "zst"
    size: int
    mtime_ns: int
    skip_binary: bool = False  # found by a directory walk: skipped if it looks binary when read


@dataclass(frozen=True)
class Piece:
    """Part of a work unit: a file, a byte range of an uncompressed JSONL file, or a range of a
    Parquet file's row groups or an Arrow file's record batches."""
    file: InputFile
    start: int       # byte offset (JSONL), first row group / record batch (Parquet, Arrow), else 0
    end: int         # end of the range, exclusive; -1: to the end of the file (text, JSONL)
    nbytes: int      # the input bytes it stands for; a file's pieces add up to its size


def input_bytes(pieces: list[Piece]) -> int:
    """The input bytes of a unit: what progress and the manifest count, each input byte once."""
    return sum(p.nbytes for p in pieces)


def classify(path: str) -> tuple[str, str]:
    name = path.lower()
    codec = ""
    for suffix, kind in TABLE_SUFFIXES.items():
        if name.endswith(suffix):
            return kind, codec
    for suffix, c in ((".gz", "gz"), (".zst", "zst"), (".zstd", "zst")):
        if name.endswith(suffix):
            codec, name = c, name[: -len(suffix)]
    return ("jsonl" if name.endswith(JSONL_SUFFIXES) else "text"), codec


def resolve_inputs(inputs: list[str], stdlib_max_bytes: int) -> list[InputFile]:
    """Expand paths, directories and globs into a deterministic list of files."""
    seen: set[str] = set()
    files: list[InputFile] = []
    for arg in inputs:
        paths = [(p, False) for p in stdlib_files(stdlib_max_bytes)] if arg == STDLIB else _expand(arg)
        for path, walked in paths:
            if path not in seen:
                seen.add(path)
                files.append(_describe(path, walked))
    if not files:
        raise DataError(f"no input files found in {inputs}: check the paths and globs given to --input")
    return files


def _expand(arg: str) -> list[tuple[str, bool]]:
    """(path, found by a directory walk) for one --input argument."""
    if os.path.isdir(arg):
        return _walk(arg)
    if os.path.lexists(arg):
        return [(arg, False)]
    matches = sorted(glob.glob(arg, recursive=True))
    if not matches:
        raise DataError(f"input {arg}: no such file, directory or glob match; fix the path given to --input")
    out: list[tuple[str, bool]] = []
    for m in matches:
        out.extend(_walk(m) if os.path.isdir(m) else [(m, False)])
    return out


def _walk(root: str) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        if all(name in filenames for name in SAVE_TO_DISK_FILES):
            dirnames[:] = []
            out.extend((path, True) for path in saved_dataset_files(dirpath))
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend((os.path.join(dirpath, name), True) for name in sorted(filenames) if not name.startswith("."))
    return out


def saved_dataset_files(directory: str) -> list[str]:
    """The Arrow files of a directory ``datasets``' ``save_to_disk`` wrote, in its state.json's order."""
    state = os.path.join(directory, "state.json")
    try:
        with open(state, encoding="utf-8") as f:
            names = [entry["filename"] for entry in json.load(f)["_data_files"]]
        if not all(isinstance(n, str) and n and not os.path.isabs(n) for n in names):
            raise ValueError("a filename is not a relative path")
    except OSError as exc:
        raise DataError(f"cannot read {state}: {exc.strerror}; fix the file or drop {directory} from --input") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{state} does not list the dataset's files as datasets' save_to_disk writes them "
                        f"(_data_files: [{{filename}}, ...]; {exc}); save the dataset again, or give its .arrow "
                        "files to --input") from exc
    return [os.path.join(directory, name) for name in names]


def stdlib_files(max_bytes: int) -> list[str]:
    """The default corpus: the stdlib's .py files (no site-packages or tests), sorted, capped."""
    root = sysconfig.get_paths()["stdlib"]
    out: list[str] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in STDLIB_SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                path = os.path.join(dirpath, name)
                total += os.path.getsize(path)
                if total > max_bytes:
                    return out
                out.append(path)
    return out


def _describe(path: str, walked: bool) -> InputFile:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise DataError(f"cannot read input {path}: {exc.strerror}; fix the file or drop it from --input") from exc
    kind, codec = classify(path)
    return InputFile(path=path, kind=kind, codec=codec, size=st.st_size, mtime_ns=st.st_mtime_ns, skip_binary=walked)


def open_bytes(f: InputFile) -> IO[bytes]:
    raw = open(f.path, "rb")
    if f.codec == "gz":
        return gzip.GzipFile(fileobj=raw)
    if f.codec == "zst":
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return raw


def decode_text(data: bytes) -> tuple[str, bool]:
    """UTF-8 text of ``data`` and whether invalid bytes had to be replaced by U+FFFD."""
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", errors="replace"), True


def iter_documents(piece: Piece, text_field: str) -> Iterator[tuple[str, bool]]:
    """Yield (text, had_invalid_utf8) for each non-empty document of ``piece``."""
    path = piece.file.path
    if piece.file.kind in TABLE_KINDS:
        yield from _tables(path).iter_texts(path, piece.file.kind, piece.start, piece.end, text_field)
        return
    try:
        with open_bytes(piece.file) as stream:
            if piece.file.kind == "text":
                data = stream.read()
                if piece.file.skip_binary and b"\0" in data[:8192]:
                    return  # sniffed here rather than at listing time: one read per file
                text, bad = decode_text(data)
                if text:
                    yield text, bad
            else:
                yield from _jsonl_documents(stream, piece, text_field)
    except DataError:
        raise
    except (OSError, EOFError, zstandard.ZstdError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise DataError(f"cannot read input {path}: {reason}; fix or replace the file, or drop it from --input") from exc


def _jsonl_documents(stream: IO[bytes], piece: Piece, text_field: str) -> Iterator[tuple[str, bool]]:
    position = piece.start
    if piece.start > 0:
        # Skip the line that straddles the range start: the previous range owns it.
        stream.seek(piece.start - 1)
        position = piece.start - 1 + len(stream.readline())
    line_no = 0
    for line in stream:
        if piece.end >= 0 and position >= piece.end:
            break
        position += len(line)
        line_no += 1
        if not line.strip():
            continue
        text, bad = decode_text(line)
        document = _record_text(text, text_field, piece, line_no)
        if document:
            yield document, bad


def _record_text(line: str, text_field: str, piece: Piece, line_no: int) -> str:
    where = f"{piece.file.path} (line {line_no} after byte {piece.start})" if piece.start else f"{piece.file.path}:{line_no}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON ({exc.msg}); fix or remove the line") from exc
    value = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(value, str):
        raise DataError(f"{where}: no string field {text_field!r}; pass --text-field with the right name")
    return value


def plan_pieces(files: list[InputFile], unit_bytes: int, text_field: str = "text") -> list[list[Piece]]:
    """Group files into work units of about ``unit_bytes`` input, independent of worker count.

    Small files are packed together; an uncompressed JSONL file larger than a unit is split at
    byte ranges (lines are assigned to the range their first byte lies in); a Parquet or Arrow
    file larger than a unit is split into ranges of row groups or record batches (its footer
    and schema are read here, so a damaged file or a missing ``text_field`` column is refused
    before any work); a compressed JSONL file cannot be split without reading it, so it is one
    unit (its shards roll over by size).
    """
    units: list[list[Piece]] = []
    pack: list[Piece] = []
    pack_bytes = 0
    for f in files:
        pieces = _file_pieces(f, unit_bytes, text_field)
        if len(pieces) > 1 or (f.kind == "jsonl" and f.codec):
            if pack:
                units.append(pack)
                pack, pack_bytes = [], 0
            units.extend([p] for p in pieces)
            continue
        pack.extend(pieces)
        pack_bytes += f.size
        if pack_bytes >= unit_bytes:
            units.append(pack)
            pack, pack_bytes = [], 0
    if pack:
        units.append(pack)
    return units


def _file_pieces(f: InputFile, unit_bytes: int, text_field: str) -> list[Piece]:
    """A file cut into pieces of about ``unit_bytes`` where its format allows; their nbytes add up to its size."""
    if f.kind in TABLE_KINDS:
        parts = _share_out(f.size, _tables(f.path).part_sizes(f.path, f.kind, text_field))
        ranges, start, taken = [], 0, 0
        for i, nbytes in enumerate(parts):
            taken += nbytes
            if taken >= unit_bytes or i == len(parts) - 1:
                ranges.append(Piece(f, start, i + 1, taken))
                start, taken = i + 1, 0
        return ranges or [Piece(f, 0, 0, f.size)]
    if f.kind == "jsonl" and not f.codec and f.size > unit_bytes:
        return [Piece(f, s, min(s + unit_bytes, f.size), min(s + unit_bytes, f.size) - s)
                for s in range(0, f.size, unit_bytes)]
    return [Piece(f, 0, -1, f.size)]


def _share_out(total: int, weights: list[int]) -> list[int]:
    """``total`` bytes shared out in proportion to ``weights`` (integers that add up to ``total``):
    a row group or record batch counts the file bytes its share of the data stands for, headers
    and footer included, so the pieces of a file add up to its size."""
    if not weights:
        return []
    weights = weights if sum(weights) > 0 else [1] * len(weights)
    whole, cumulative, out = sum(weights), 0, []
    for w in weights:
        before = total * cumulative // whole
        cumulative += w
        out.append(total * cumulative // whole - before)
    return out


def _tables(path: str):
    """data/tables.py, imported on first use so that text and JSONL inputs never import pyarrow."""
    try:
        from . import tables
    except ImportError as exc:
        if exc.name != "pyarrow" and not str(exc.name).startswith("pyarrow."):
            raise
        raise DataError(f"reading {path} needs pyarrow, which is not installed: pip install pyarrow, "
                        "or drop the file from --input") from exc
    return tables


def sample_lines(units: list[list[Piece]], text_field: str, budget_bytes: int) -> list[str]:
    """A deterministic, bounded tokenizer-training sample spread over the whole input.

    Units are visited in a stride order (a fixed permutation of their indices) so the sample
    covers the corpus rather than its first files; each unit contributes at most an equal share.
    Lines (not whole documents) are the sentences sentencepiece trains on.
    """
    share = max(budget_bytes // max(len(units), 1), 1 << 16)
    lines: list[str] = []
    total = 0
    for index in _stride_order(len(units)):
        taken = 0
        for piece in units[index]:
            for text, _ in iter_documents(piece, text_field):
                for line in text.split("\n"):
                    if line and len(line) < 8000:
                        lines.append(line)
                        taken += len(line) + 1
                if taken >= share:
                    break
            if taken >= share:
                break
        total += taken
        if total >= budget_bytes:
            break
    return lines


def _stride_order(n: int) -> list[int]:
    """A permutation of range(n) that spreads consecutive picks across the range."""
    if n <= 2:
        return list(range(n))
    step = max(1, int(n * 0.6180339887))
    while math.gcd(step, n) != 1:
        step += 1
    return [(i * step) % n for i in range(n)]

