"""``prototypes.parquet``: the library folder's layout, writing the table, reading its features.

Layout of a library folder ``LIB``::

    LIB/prototypes.parquet      one row per prototype (PROTOTYPES_SCHEMA), fingerprint in metadata
    LIB/index/                  written by ``index.py`` (meta.json, faiss.index)

The file is sorted by (label, event type, id) and carries every channel statistic twice: as the
``channel_mean``/``channel_max`` lists and as flat ``mean_<channel>``/``peak_<channel>`` columns
(cheap filters straight on the Parquet). Its content fingerprint (``fingerprint.py``) is stored in
the file's key-value metadata.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cogportrait.io.atomic import atomic_path
from cogportrait.schema import CONTROL_CHANNELS, N_CHANNELS, PROTOTYPES_SCHEMA
from prototype_store.errors import LibraryError
from prototype_store.fingerprint import FINGERPRINT_KEY, table_fingerprint
from prototype_store.retrieval import N_FEATURES

PARQUET_NAME = "prototypes.parquet"
INDEX_DIR = "index"


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


def read_features(parquet: Path) -> np.ndarray:
    """[channel_mean, channel_max] as an (N, 34) float32 array."""
    t = pq.read_table(parquet, columns=["channel_mean", "channel_max"])
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
