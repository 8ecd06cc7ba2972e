"""Parquet and Arrow inputs, read through pyarrow with bounded memory.

Imported by data/sources.py only when an input is a Parquet or Arrow file, so that text and JSONL
users never import pyarrow. Policies (tested in tests/data/test_tables.py):
- A file is a sequence of *parts*, the units of splitting: a Parquet file's row groups, an Arrow
  file's record batches. A piece of work is a range of parts of one file (or a whole file).
- Only the text column is read, one row group (Parquet) or record batch (Arrow, memory-mapped,
  zero-copy) at a time, in slices of about TEXT_SLICE_BYTES of text, so a 10 GB file never sits
  in memory: what a worker holds is one slice of text and the tokens of its shard.
- The column is ``text_field`` and must hold strings (string, large_string, string_view, or a
  dictionary of them); another type is refused in one line. Null values are skipped like empty
  documents. Invalid UTF-8 in a string column becomes U+FFFD as for text files.
- A file pyarrow cannot open or read (bad magic or footer, truncated, damaged pages), or one
  without the column, is a DataError naming the file and the fix.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from .errors import DataError

TEXT_SLICE_BYTES = 1 << 20  # text converted to Python strings at a time
PARQUET_BUFFER_BYTES = 1 << 20  # Parquet pages are read through a buffer of this size
ARROW_FILE_MAGIC = b"ARROW1"  # the IPC file format; without it a .arrow file is an IPC stream (as `datasets` writes)
_BINARY_VIEW = {"string": pa.binary(), "large_string": pa.large_binary()}


def part_sizes(path: str, kind: str, text_field: str) -> list[int]:
    """The byte weights of a file's parts (row groups' compressed sizes, record batches' buffer
    sizes), after checking that it opens and has a string column ``text_field``."""
    with _reading(path, kind):
        if kind == "parquet":
            pf = _parquet(path)
            _check_column(path, pf.schema_arrow, text_field)
            meta = pf.metadata
            return [sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
                    for rg in map(meta.row_group, range(meta.num_row_groups))]
        with pa.memory_map(path) as source:
            reader = _open_arrow(source)
            _check_column(path, reader.schema, text_field)
            return [batch.get_total_buffer_size() for batch in _arrow_batches(reader, 0, None)]


def iter_texts(path: str, kind: str, start: int, end: int, text_field: str) -> Iterator[tuple[str, bool]]:
    """(text, had_invalid_utf8) for each non-null, non-empty value of parts [start, end)."""
    with _reading(path, kind):
        if kind == "parquet":
            yield from _parquet_texts(path, start, end, text_field)
        else:
            with pa.memory_map(path) as source:
                reader = _open_arrow(source)
                column = _check_column(path, reader.schema, text_field)
                for batch in _arrow_batches(reader, start, end):
                    yield from _texts(batch.column(column))


def _parquet(path: str) -> pq.ParquetFile:
    # pre_buffer=False and a read buffer: pages are read as they are decoded, not a row group's
    # column chunks at once; no threads: a prepare worker is one process on one core.
    return pq.ParquetFile(path, buffer_size=PARQUET_BUFFER_BYTES, pre_buffer=False)


def _parquet_texts(path: str, start: int, end: int, text_field: str) -> Iterator[tuple[str, bool]]:
    pf = _parquet(path)
    _check_column(path, pf.schema_arrow, text_field)
    for group in range(start, end):
        meta = pf.metadata.row_group(group)
        text_bytes = sum(meta.column(c).total_uncompressed_size for c in range(meta.num_columns)
                         if meta.column(c).path_in_schema == text_field) or 1
        rows = max(1, min(meta.num_rows, meta.num_rows * TEXT_SLICE_BYTES // text_bytes))
        with _reading(path, "parquet", f" (row group {group})"):
            batches = pf.iter_batches(batch_size=rows, row_groups=[group], columns=[text_field], use_threads=False)
            for batch in batches:
                yield from _texts(batch.column(0))


def _open_arrow(source) -> pa.ipc.RecordBatchStreamReader | pa.ipc.RecordBatchFileReader:
    magic = source.read(len(ARROW_FILE_MAGIC))
    source.seek(0)
    return pa.ipc.open_file(source) if magic == ARROW_FILE_MAGIC else pa.ipc.open_stream(source)


def _arrow_batches(reader, start: int, end: int | None) -> Iterator[pa.RecordBatch]:
    """Record batches [start, end) of an IPC file or stream; skipping a batch of a memory-mapped
    stream reads only its header."""
    if isinstance(reader, pa.ipc.RecordBatchFileReader):
        for i in range(start, reader.num_record_batches if end is None else end):
            yield reader.get_batch(i)
        return
    for i, batch in enumerate(reader):
        if end is not None and i >= end:
            return
        if i >= start:
            yield batch


def _check_column(path: str, schema: pa.Schema, text_field: str) -> int:
    index = schema.get_field_index(text_field)
    if index < 0:
        names = ", ".join(schema.names[:8]) + (", ..." if len(schema.names) > 8 else "")
        raise DataError(f"{path} has no column {text_field!r} (its columns: {names}); "
                        "pass --text-field (data.text_field) with the name of its text column")
    kind = schema.field(index).type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not _is_string(kind):
        raise DataError(f"{path}: column {text_field!r} holds {kind}, not strings; "
                        "pass --text-field (data.text_field) with the name of a string column")
    return index


def _is_string(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def _texts(array: pa.Array) -> Iterator[tuple[str, bool]]:
    """The strings of a column, a slice of about TEXT_SLICE_BYTES at a time; nulls and empties skipped."""
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    rows = max(1, len(array) * TEXT_SLICE_BYTES // max(array.get_total_buffer_size(), 1))
    for offset in range(0, len(array), rows):
        part = array.slice(offset, rows)
        try:
            values = [(v, False) for v in part.to_pylist()]
        except UnicodeDecodeError:  # pyarrow does not validate UTF-8 when reading; same policy as text files
            from .sources import decode_text
            if pa.types.is_string_view(part.type):
                raw = part.cast(pa.binary_view())
            else:
                raw = part.view(_BINARY_VIEW[str(part.type)])
            values = [(None, False) if v is None else decode_text(v) for v in raw.to_pylist()]
        for text, bad in values:
            if text:
                yield text, bad


@contextmanager
def _reading(path: str, kind: str, where: str = "") -> Iterator[None]:
    """Turns pyarrow's errors while reading ``path`` (at ``where``) into one DataError line naming it."""
    try:
        yield
    except (pa.ArrowException, OSError, EOFError) as exc:
        reason = " ".join((getattr(exc, "strerror", None) or str(exc) or type(exc).__name__).split()).rstrip(".")
        what = "Parquet" if kind == "parquet" else "Arrow IPC"
        raise DataError(f"cannot read {what} file {path}{where}: {reason}; the file is damaged or not {what}: "
                        "replace it (e.g. download it again) or drop it from --input") from exc
