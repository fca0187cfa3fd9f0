"""Atomic file writes: write beside the target, then rename, so readers never see half a file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


@contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto the target on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside the target; swap it in place of the target on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json(path: str | os.PathLike, obj: object) -> None:
    with atomic_path(path, ".json") as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_table(path: str | os.PathLike, rows: Iterable[dict] | pa.Table, schema: pa.Schema) -> int:
    """Write rows (dicts or a table) to one Parquet file with the declared schema, atomically."""
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(list(rows), schema=schema)
    table = table.select(schema.names).cast(schema)
    with atomic_path(path, ".parquet") as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return table.num_rows


class AtomicParquetWriter:
    """Stream record batches into one Parquet file that appears only when closed cleanly."""

    def __init__(self, path: str | os.PathLike, schema: pa.Schema) -> None:
        self.schema = schema
        self._ctx = atomic_path(path, ".parquet")
        self._tmp = self._ctx.__enter__()
        self._writer = pq.ParquetWriter(self._tmp, schema, compression="zstd")
        self.num_rows = 0

    def write_rows(self, rows: list[dict]) -> None:
        if rows:
            self.write_table(pa.Table.from_pylist(rows, schema=self.schema))

    def write_table(self, table: pa.Table) -> None:
        table = table.select(self.schema.names).cast(self.schema)
        self._writer.write_table(table)
        self.num_rows += table.num_rows

    def __enter__(self) -> AtomicParquetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._writer.close()
        self._ctx.__exit__(exc_type, exc, tb)


def remove_temporaries(folder: str | os.PathLike) -> int:
    """Delete the hidden temporaries (``.name.*``) that interrupted writes left in ``folder`` and its
    sub-folders one level down (curate's clips/ and audio/); returns how many entries went.

    Every temporary this module makes starts with a dot beside its target, and a stage's output
    folder holds nothing else hidden, so after an interrupted job (workers killed mid-write) this
    leaves only complete files.
    """
    root = Path(folder)
    if not root.is_dir():
        return 0
    removed = 0
    for parent in [root, *(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))]:
        for entry in parent.iterdir():
            if entry.name.startswith("."):
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                removed += 1
    return removed
