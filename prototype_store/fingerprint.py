"""Content fingerprint of a Parquet table, independent of how the file was chunked or written.

Why: the FAISS index stores row positions and features copied from the Parquet; if anyone rewrites
a row afterwards, the index would silently answer with wrong rows. Index and Parquet therefore both
carry this fingerprint, and opening recomputes it from the data, so a mismatch is an error.

The hash covers every column's values (list lengths at each nesting level, validity, the values)
fed to one hasher per (column, level, part), so row-group and batch boundaries do not matter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

FINGERPRINT_KEY = b"cogportrait.fingerprint"
log = logging.getLogger("cogportrait.prototype_store")


class _Hashers:
    def __init__(self) -> None:
        self._h: dict[str, hashlib._Hash] = {}

    def update(self, key: str, data: bytes) -> None:
        h = self._h.get(key)
        if h is None:
            h = self._h[key] = hashlib.blake2b(digest_size=32)
        h.update(data)

    def digest(self, rows: int, names: Iterable[str]) -> str:
        top = hashlib.sha256()
        top.update(f"rows={rows};cols={','.join(names)}".encode())
        for key in sorted(self._h):
            top.update(key.encode() + b"=" + self._h[key].digest())
        return top.hexdigest()


def _feed(arr: pa.Array, key: str, hashers: _Hashers) -> None:
    t = arr.type
    valid = arr.is_valid().to_numpy(zero_copy_only=False).astype(np.uint8)
    hashers.update(key + "/valid", valid.tobytes())  # one byte per row: chunking cannot shift it
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        hashers.update(key + "/len", lengths.tobytes())
        _feed(pc.list_flatten(arr), key + "/item", hashers)
    elif pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t):
        filled = arr.fill_null("")
        lengths = pc.binary_length(filled).to_numpy(zero_copy_only=False).astype(np.int64)
        hashers.update(key + "/len", lengths.tobytes())
        large = filled.cast(pa.large_binary())
        offsets = np.frombuffer(large.buffers()[1], dtype=np.int64)[large.offset : large.offset + len(large) + 1]
        data = large.buffers()[2]
        if data is not None and len(offsets):
            hashers.update(key + "/data", memoryview(data)[int(offsets[0]) : int(offsets[-1])].tobytes())
    elif pa.types.is_boolean(t):
        hashers.update(key + "/data", arr.fill_null(False).to_numpy(zero_copy_only=False).astype(np.uint8).tobytes())
    else:
        values = arr.fill_null(0).to_numpy(zero_copy_only=False)
        hashers.update(key + "/data", np.ascontiguousarray(values).tobytes())


def table_fingerprint(batches: Iterable[pa.RecordBatch | pa.Table], names: list[str]) -> str:
    """Fingerprint of the rows of ``batches`` (columns ``names``, in that order)."""
    hashers = _Hashers()
    rows = 0
    for batch in batches:
        rows += batch.num_rows
        for name in names:
            col = batch.column(name)
            chunks = col.chunks if isinstance(col, pa.ChunkedArray) else [col]
            for chunk in chunks:
                _feed(chunk, name, hashers)
    return hashers.digest(rows, names)


def parquet_fingerprint(path: str | Path, batch_size: int = 65_536) -> str:
    """Recompute the fingerprint of a Parquet file's content (streamed, bounded memory)."""
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    return table_fingerprint(pf.iter_batches(batch_size=batch_size), names)


def stored_fingerprint(path: str | Path) -> str | None:
    """The fingerprint the writer recorded in the file's key-value metadata (None if absent)."""
    meta = pq.read_schema(path).metadata or {}
    value = meta.get(FINGERPRINT_KEY)
    return value.decode() if value else None


def file_stat(path: str | Path) -> dict[str, int]:
    """What changes whenever a file is rewritten: size, mtime (ns) and inode."""
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _cache_path() -> Path:
    root = os.environ.get("COGPORTRAIT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "cogportrait")
    return Path(root) / "fingerprints.json"


def _cache_key(path: str | Path) -> str:
    st = file_stat(path)
    return f"{os.path.realpath(path)}|{st['size']}|{st['mtime_ns']}|{st['inode']}"


def cached_fingerprint(path: str | Path) -> str:
    """The content fingerprint, recomputed only when the file was rewritten since it was last seen.

    A rewrite (even of one row) changes the file's size, mtime or inode, so an unchanged stat means
    unchanged content; otherwise the content is hashed again and remembered in a per-user cache,
    outside the library, so DVC outputs never hold a file's stat (or any other machine state).
    """
    cache_file = _cache_path()
    key = _cache_key(path)
    cache: dict[str, str] = {}
    if cache_file.exists():
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, ValueError) as exc:
            log.debug("ignoring unreadable fingerprint cache %s: %s", cache_file, exc)
    if key in cache:
        return cache[key]
    fp = parquet_fingerprint(path)
    cache = {k: v for k, v in cache.items() if not k.startswith(os.path.realpath(path) + "|")}
    cache[key] = fp
    try:
        from cogportrait.io.atomic import write_json

        write_json(cache_file, dict(list(cache.items())[-256:]))
    except OSError as exc:
        log.debug("cannot write fingerprint cache %s: %s", cache_file, exc)
    return fp
