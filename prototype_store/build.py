"""Ray-free library build (tests, benchmarks, small data); the DVC stage runs pipelines/prototypes.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
from tqdm import tqdm

from cogportrait.config import PrototypesConfig
from cogportrait.schema import PROTOTYPES_SCHEMA
from cogportrait.behavior.segment import kept_prototypes, segment_clip
from cogportrait.behavior.sources import clip_ids, load_clip, read_clip_meta
from prototype_store.table import PARQUET_NAME, write_prototypes


def build_prototypes_local(cfg: PrototypesConfig) -> dict[str, Any]:
    """Segment every clip in ``cfg.controls`` into ``cfg.out``/prototypes.parquet, in-process."""
    meta = read_clip_meta(cfg.clips)
    candidates: list[dict[str, Any]] = []
    ids = clip_ids(cfg.controls)
    for cid in tqdm(ids, desc="segment clips", unit="clip", disable=len(ids) < 50):
        candidates += segment_clip(load_clip(cfg.controls, cid, meta.get(cid), cfg.frames), cfg)
    rows, dropped = kept_prototypes(candidates)
    table = pa.Table.from_pylist(rows, schema=PROTOTYPES_SCHEMA)
    fingerprint = write_prototypes(Path(cfg.out) / PARQUET_NAME, table, cfg.row_group_size)
    return {"clips": len(ids), "prototypes": table.num_rows, "dropped": dict(sorted(dropped.items())), "fingerprint": fingerprint}
