"""DVC stage ``prototypes``: invert's controls/events/frames -> LIB/prototypes.parquet (Ray Data).

Linear DAG, one row per clip until segmentation fans out:

    clip ids ─load (1:1)─▶ clip signals ─segment (1:N)─▶ prototype rows ─▶ driver: sort, write

The maths lives in ``cogportrait.behavior.segment`` (Ray-free); this module only wires it up. Rows are
sorted by (label, event type, deterministic id), so reruns write the same file (and fingerprint).
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from pipelines._ray import ONE_ROW_PER_BLOCK, start_ray
from ray.data import TaskPoolStrategy

from cogportrait.config import PrototypesConfig
from cogportrait.io.atomic import write_json
from cogportrait.schema import PROTOTYPES_SCHEMA
from cogportrait.behavior.segment import ClipSignals, segment_clip
from cogportrait.behavior.sources import clip_ids, load_clip, read_clip_meta
from prototype_store.store import PARQUET_NAME, write_prototypes

log = logging.getLogger("cogportrait.prototypes")

LIGHT_CPUS = 0.25  # Parquet reads and numpy on one clip: light, bounded by the task pool size

Row = dict[str, Any]


def load_step(row: Row, cfg: PrototypesConfig) -> Row:
    """1:1 clip id -> the clip's frame-aligned arrays (events as JSON text: no pickled objects)."""
    meta = json.loads(row["meta"]) if row["meta"] else None
    clip = load_clip(cfg.controls, row["clip_id"], meta, cfg.frames)
    return {
        "clip_id": clip.clip_id,
        "controls": clip.controls,
        "present": clip.present,
        "keypoints": clip.keypoints if clip.keypoints is not None else np.zeros((0, 62, 2), np.float32),
        "residual": clip.residual,
        "events": json.dumps(clip.events),
        "label": clip.label or "",
        "identity": clip.identity or "",
        "video_id": clip.video_id or "",
    }


def segment_step(row: Row, cfg: PrototypesConfig) -> list[Row]:
    """1:N clip -> prototype rows (event-centred + clip-level windows), plus one tally row."""
    controls = np.asarray(row["controls"], dtype=np.float32)
    keypoints = np.asarray(row["keypoints"], dtype=np.float32)
    clip = ClipSignals(
        clip_id=row["clip_id"],
        controls=controls,
        present=np.asarray(row["present"], dtype=bool),
        keypoints=keypoints if len(keypoints) == len(controls) else None,
        residual=np.asarray(row["residual"], dtype=np.float32),
        events=json.loads(row["events"]),
        label=row["label"] or None,
        identity=row["identity"] or None,
        video_id=row["video_id"] or None,
    )
    rows, dropped = segment_clip(clip, cfg)
    # One JSON payload per row keeps Arrow type inference out of the nested T x 17 lists.
    out = [{"kind": "prototype", "payload": json.dumps(r)} for r in rows]
    out.append({"kind": "tally", "payload": json.dumps(dropped)})
    return out


def run(cfg: PrototypesConfig) -> dict[str, Any]:
    """Run the job; returns the counts also written to ``LIB/prototypes_metrics.json``."""
    t0 = time.perf_counter()
    out_dir = Path(cfg.out)
    ids = clip_ids(cfg.controls)
    meta = read_clip_meta(cfg.clips)
    missing_meta = [c for c in ids if c not in meta]
    if meta and missing_meta:
        log.warning("%d clips have no row in %s (no label/identity)", len(missing_meta), cfg.clips)
    start_ray(cfg.num_workers, ONE_ROW_PER_BLOCK)
    n = cfg.num_workers
    rows_in = [{"clip_id": c, "meta": json.dumps(meta[c]) if c in meta else ""} for c in ids]
    records: list[Row] = []
    dropped: Counter[str] = Counter()
    if rows_in:
        ds = ray.data.from_items(rows_in, override_num_blocks=max(1, len(rows_in)))
        # 1:1 clip -> arrays; Parquet reads filtered on clip_id                 (light CPU)
        ds = ds.map(load_step, fn_kwargs={"cfg": cfg}, num_cpus=LIGHT_CPUS, compute=TaskPoolStrategy(size=n))
        # 1:N clip -> prototypes + a tally row; numpy only                      (light CPU)
        ds = ds.flat_map(segment_step, fn_kwargs={"cfg": cfg}, num_cpus=LIGHT_CPUS, compute=TaskPoolStrategy(size=n))
        for row in ds.iter_rows():
            payload = json.loads(row["payload"])
            if row["kind"] == "tally":
                dropped.update(payload)
            else:
                records.append(payload)
    table = pa.Table.from_pylist(records, schema=PROTOTYPES_SCHEMA)
    fingerprint = write_prototypes(out_dir / PARQUET_NAME, table, cfg.row_group_size)
    per_type = Counter(r["event_type"] for r in records)
    per_label = Counter(str(r["label"]) for r in records)
    flags = Counter(f for r in records for f in r["quality_flags"])
    wall = time.perf_counter() - t0
    metrics = {
        "clips": len(ids),
        "clips_without_metadata": len(missing_meta),
        "prototypes": table.num_rows,
        "by_event_type": dict(sorted(per_type.items())),
        "by_label": dict(sorted(per_label.items())),
        "quality_flags": dict(sorted(flags.items())),
        "dropped": dict(sorted(dropped.items())),
        "fingerprint": fingerprint,
        "wall_seconds": round(wall, 3),
        "workers": cfg.num_workers,
        "peak_rss_mb_driver": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    write_json(out_dir / "prototypes_metrics.json", metrics)
    log.info("prototypes: %d from %d clips in %.1f s", table.num_rows, len(ids), wall)
    return metrics
