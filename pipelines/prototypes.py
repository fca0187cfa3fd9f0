"""DVC stage ``prototypes``: invert's controls/events/frames -> LIB/prototypes.parquet (Ray Data).

Linear DAG, one row per clip until segmentation fans out:

    clip rows ─segment (1:N clip → candidate spans)─▶ prototypes ─▶ driver: write (sorted, fingerprinted)
                                                  └─ dropped candidates (reason) ─▶ counts in metrics

One step: loading a clip and cutting it share the clip's arrays, and a second step would ship the
whole trajectory between workers for nothing. The maths lives in ``cogportrait.behavior.segment``
(Ray-free); candidates travel as typed Arrow rows (PROTOTYPE_CANDIDATES_SCHEMA). write_prototypes
sorts rows by (label, event type, id), so reruns write the same file (and fingerprint).
"""

from __future__ import annotations

import logging
import resource
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data import TaskPoolStrategy

from cogportrait.behavior.segment import segment_clip
from cogportrait.behavior.sources import clip_ids, clip_meta, clip_rows, load_clip, read_clip_meta
from pipelines._ray import ONE_ROW_PER_BLOCK, start_ray
from cogportrait.config import PrototypesConfig
from cogportrait.io.atomic import write_json
from cogportrait.schema import PROTOTYPE_CANDIDATES_SCHEMA, PROTOTYPES_SCHEMA
from prototype_store import write_prototypes
from prototype_store.table import PARQUET_NAME

log = logging.getLogger("cogportrait.prototypes")

LIGHT_CPUS = 0.25  # Parquet reads and numpy on one clip: light, bounded by the task pool size


def segment_batch(batch: pa.Table, cfg: PrototypesConfig) -> pa.Table:
    """1:N clips -> every candidate span (prototypes, and dropped candidates with their reason)."""
    rows: list[dict[str, Any]] = []
    for clip in batch.to_pylist():
        meta = clip_meta(clip)
        rows += segment_clip(load_clip(cfg.controls, clip["clip_id"], meta, cfg.frames), cfg)
    return pa.Table.from_pylist(rows, schema=PROTOTYPE_CANDIDATES_SCHEMA)




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
    candidates = PROTOTYPE_CANDIDATES_SCHEMA.empty_table()
    if ids:
        ds = ray.data.from_items(clip_rows(ids, meta), override_num_blocks=len(ids))
        # 1:N clip -> candidate spans; Parquet reads filtered on clip_id + numpy   (light CPU)
        ds = ds.map_batches(segment_batch, fn_kwargs={"cfg": cfg}, batch_format="pyarrow", batch_size=1,
                            num_cpus=LIGHT_CPUS, compute=TaskPoolStrategy(size=cfg.num_workers))
        candidates = pa.concat_tables([candidates, *ds.iter_batches(batch_format="pyarrow", batch_size=None)])
    kept = pc.is_null(candidates.column("drop_reason"))
    table = candidates.filter(kept).select(PROTOTYPES_SCHEMA.names).cast(PROTOTYPES_SCHEMA)
    dropped = Counter(candidates.filter(pc.invert(kept)).column("drop_reason").to_pylist())
    fingerprint = write_prototypes(out_dir / PARQUET_NAME, table, cfg.row_group_size)
    flags = Counter(f for fl in table.column("quality_flags").to_pylist() for f in fl)
    wall = time.perf_counter() - t0
    metrics = {
        "clips": len(ids),
        "clips_without_metadata": len(missing_meta),
        "prototypes": table.num_rows,
        "by_event_type": dict(sorted(Counter(table.column("event_type").to_pylist()).items())),
        "by_label": dict(sorted(Counter(str(v) for v in table.column("label").to_pylist()).items())),
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
