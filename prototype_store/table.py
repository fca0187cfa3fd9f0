"""``prototypes.parquet``: the library folder's layout, writing the table, reading its features.

Layout of a library folder ``LIB``::

    LIB/prototypes.parquet      one row per prototype (PROTOTYPES_SCHEMA), fingerprint in metadata
    LIB/index/                  written by ``index.py`` (meta.json, faiss.index, and the controls
                                sidecar below: controls.f32 + controls_offsets.npy)

The file is sorted by (label, event type, id) and carries every channel statistic twice: as the
``channel_mean``/``channel_max`` lists and as flat ``mean_<channel>``/``peak_<channel>`` columns
(cheap filters straight on the Parquet). Its content fingerprint (``fingerprint.py``) is stored in
the file's key-value metadata.

The controls sidecar exists for fetch latency: Parquet can only decode whole row groups of the
nested ``controls`` list column (~2 ms per 256-row group at 32 frames), while the composer needs
the controls of five rows per query. The sidecar holds every row's controls concatenated in file
order as raw float32 (frames x 17), plus int64 frame offsets (N + 1), so a fetch is a slice of a
memory map. It is derived from the Parquet by ``build_index`` inside the index folder's atomic
swap, recorded (rows, frames, sha256) in meta.json, and therefore stale exactly when the index is.
Keypoints get no sidecar: they are 7x larger and the composer does not read them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cogportrait.io.atomic import atomic_path
from cogportrait.schema import CONTROL_CHANNELS, N_CHANNELS, PROTOTYPES_SCHEMA
from prototype_store.errors import LibraryError, StaleIndexError
from prototype_store.fingerprint import FINGERPRINT_KEY, table_fingerprint
from prototype_store.retrieval import N_FEATURES

PARQUET_NAME = "prototypes.parquet"
INDEX_DIR = "index"
CONTROLS_VALUES = "controls.f32"  # raw little-endian float32, (frames, 17), C order
CONTROLS_OFFSETS = "controls_offsets.npy"  # int64 (N + 1): row i is values[off[i]:off[i + 1]]


def library_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(parquet, index folder) for a library folder or its prototypes.parquet."""
    p = Path(path)
    if p.suffix == ".parquet":
        return p, p.parent / INDEX_DIR
    return p / PARQUET_NAME, p / INDEX_DIR


def write_prototypes(path: str | os.PathLike, table: pa.Table, row_group_size: int) -> str:
    """Write prototypes sorted by (label, event type, id), with the content fingerprint in the metadata.

    The sort makes each label a contiguous run of row groups, so a label filter pushed down to
    Parquet skips the other labels' row groups by their min/max statistics; ids make it total.
    """
    table = _with_flat_stats(table).select(PROTOTYPES_SCHEMA.names).cast(PROTOTYPES_SCHEMA)
    if table.num_rows:
        table = table.sort_by([("label", "ascending"), ("event_type", "ascending"), ("prototype_id", "ascending")])
    fingerprint = table_fingerprint([table], PROTOTYPES_SCHEMA.names)
    schema = PROTOTYPES_SCHEMA.with_metadata({FINGERPRINT_KEY: fingerprint.encode()})
    table = table.replace_schema_metadata(schema.metadata)
    with atomic_path(path, ".parquet") as tmp:
        with pq.ParquetWriter(tmp, schema=schema, compression="zstd") as writer:
            writer.write_table(table, row_group_size=row_group_size)
    return fingerprint


def _with_flat_stats(table: pa.Table) -> pa.Table:
    """(Re)derive the flat mean_<channel>/peak_<channel> columns from channel_mean/channel_max."""
    n = table.num_rows
    for stat, source in (("mean", "channel_mean"), ("peak", "channel_max")):
        col = table.column(source).combine_chunks()
        if n and col.null_count == 0:
            values = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(n, N_CHANNELS)
        else:
            values = np.full((n, N_CHANNELS), np.nan, dtype=np.float32)
        for j, name in enumerate(CONTROL_CHANNELS):
            field_name = f"{stat}_{name}"
            arr = pa.array(values[:, j], type=pa.float32())
            if field_name in table.column_names:
                table = table.set_column(table.column_names.index(field_name), field_name, arr)
            else:
                table = table.append_column(field_name, arr)
    return table


def read_features(parquet: Path, pf: pq.ParquetFile | None = None) -> np.ndarray:
    """[channel_mean, channel_max] as an (N, 34) float32 array.

    ``pf``: the file already open, so that its footer is not parsed again (at 10^6 rows in 256-row
    groups the footer is ~21 MB and takes ~0.2 s to parse).
    """
    columns = ["channel_mean", "channel_max"]
    t = pf.read(columns=columns) if pf is not None else pq.read_table(parquet, columns=columns)
    n = t.num_rows
    out = np.empty((n, N_FEATURES), dtype=np.float32)
    for i, name in enumerate(("channel_mean", "channel_max")):
        col = t.column(name).combine_chunks()
        if col.null_count:
            raise LibraryError(f"{parquet}: {col.null_count} rows have no {name}")
        flat = col.flatten().to_numpy(zero_copy_only=False)
        if flat.size != n * N_CHANNELS:
            raise LibraryError(f"{parquet}: {name} must hold {N_CHANNELS} values per row")
        out[:, i * N_CHANNELS : (i + 1) * N_CHANNELS] = flat.reshape(n, N_CHANNELS)
    if not np.isfinite(out).all():
        bad = int((~np.isfinite(out)).any(axis=1).sum())
        raise LibraryError(f"{parquet}: {bad} prototypes have non-finite channel mean/max")
    return out


def list_column_values(col: pa.Array | pa.ChunkedArray, inner: int) -> tuple[np.ndarray, np.ndarray]:
    """A list<fixed_size_list<float32>[inner]> column as (values (F, inner) float32, offsets (n + 1)).

    Row i is ``values[offsets[i]:offsets[i + 1]]``; a null row has no frames. Vectorised, so that
    neither the sidecar build nor a fetch pays per-row pyarrow scalar calls.
    """
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    lengths = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = np.zeros(len(arr) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = pc.list_flatten(pc.list_flatten(arr)).to_numpy(zero_copy_only=False)
    if flat.size != int(offsets[-1]) * inner:
        raise LibraryError(f"a list column holds {flat.size} values for {int(offsets[-1])} frames of {inner}: null frames?")
    return np.asarray(flat, dtype=np.float32).reshape(-1, inner), offsets


def write_controls_sidecar(pf: pq.ParquetFile, folder: Path) -> dict[str, Any]:
    """Write CONTROLS_VALUES and CONTROLS_OFFSETS into ``folder``; returns their meta.json record.

    Streams one row group at a time (the values of 10^6 realistic rows are ~2 GB). The sha256
    covers the values then the offsets, so ``verify="full"`` can detect an edited sidecar; the
    bytes depend only on the Parquet's content, so a rebuild writes the same files.
    """
    n = pf.metadata.num_rows
    offsets = np.zeros(n + 1, dtype=np.int64)
    digest = hashlib.sha256()
    row = 0
    with open(folder / CONTROLS_VALUES, "wb") as f:
        for g in range(pf.num_row_groups):
            values, off = list_column_values(pf.read_row_group(g, columns=["controls"]).column("controls"), N_CHANNELS)
            data = np.ascontiguousarray(values, dtype="<f4").tobytes()
            f.write(data)
            digest.update(data)
            offsets[row + 1 : row + len(off)] = offsets[row] + off[1:]
            row += len(off) - 1
    np.save(folder / CONTROLS_OFFSETS, offsets)
    digest.update(offsets.astype("<i8").tobytes())
    return {"values": CONTROLS_VALUES, "offsets": CONTROLS_OFFSETS, "rows": n, "frames": int(offsets[-1]),
            "sha256": digest.hexdigest()}


class ControlsSidecar:
    """The controls sidecar of an index folder, memory-mapped: a row's controls without Parquet.

    Opening checks the files against the record in meta.json (row and frame counts, file size,
    offsets that only grow; with ``verify="full"`` also the sha256), so a sidecar that does not
    belong to the index is refused like a stale index.
    """

    def __init__(self, folder: Path, info: Mapping[str, Any], n: int, verify: str = "auto") -> None:
        values_path, offsets_path = folder / str(info["values"]), folder / str(info["offsets"])
        rebuild = "; rebuild the index: `cogportrait library build --only index --library LIB`"
        if not values_path.exists() or not offsets_path.exists():
            raise StaleIndexError(f"{folder} lacks the controls sidecar its meta.json records{rebuild}")
        offsets = np.load(offsets_path)
        frames = int(info["frames"])
        size = values_path.stat().st_size
        if (
            int(info["rows"]) != n or offsets.shape != (n + 1,) or offsets.dtype != np.int64
            or int(offsets[0]) != 0 or int(offsets[-1]) != frames or size != frames * N_CHANNELS * 4
            or bool((np.diff(offsets) < 0).any())
        ):
            raise StaleIndexError(
                f"the controls sidecar in {folder} ({size} bytes, {len(offsets) - 1} rows) does not match "
                f"meta.json ({info['rows']} rows, {frames} frames) or the library ({n} rows){rebuild}"
            )
        if verify == "full":
            digest = hashlib.sha256()
            with open(values_path, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
            digest.update(offsets.astype("<i8").tobytes())
            if digest.hexdigest() != info["sha256"]:
                raise StaleIndexError(f"the controls sidecar in {folder} was edited after indexing{rebuild}")
        self.offsets = offsets
        # np.memmap cannot map an empty file: a library of frame-less rows gets an empty array
        self.values = (
            np.memmap(values_path, dtype="<f4", mode="r", shape=(frames, N_CHANNELS)) if frames
            else np.zeros((0, N_CHANNELS), dtype=np.float32)
        )

    def get(self, row: int) -> np.ndarray:
        """Row ``row``'s controls, (T, 17) float32, a copy the caller owns."""
        return np.array(self.values[self.offsets[row] : self.offsets[row + 1]], dtype=np.float32)
