"""DVC stage ``kto_mine``: desirable boundary-case windows for KTO -> data/kto/kto.parquet (Ray Data).

Linear DAG:

    clip rows ─mine (1:N clip → windows, typed KTO_SCHEMA rows)─▶ driver: sort, split by identity, write

One step only: loading a clip and mining it share the clip's arrays, and splitting the rows into a
second step would ship the whole trajectory between workers for nothing. The rules are in
``cogportrait/behavior/kto.py`` (Ray-free). Undesirable samples come later, from the generator.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.data import TaskPoolStrategy

from cogportrait.behavior.kto import mine_clip, split_identities
from cogportrait.behavior.sources import clip_ids, clip_meta, clip_rows, load_clip, read_clip_meta
from cogportrait.config import KtoConfig
from cogportrait.io.atomic import write_json, write_table
from cogportrait.schema import CLIP_FPS, KTO_CATEGORIES, KTO_SCHEMA, N_KEYPOINTS, make_id
from pipelines._ray import ONE_ROW_PER_BLOCK, start_ray

log = logging.getLogger("cogportrait.kto")

LIGHT_CPUS = 0.25


def _rel(path: str | None) -> str | None:
    return os.path.relpath(path) if path else None


def mine_batch(batch: pa.Table, cfg: KtoConfig) -> pa.Table:
    """1:N clips -> mined windows (KTO_SCHEMA rows, split still empty), each with its conditions:
    reference frame, audio span, keypoints, prompt."""
    out = []
    for row in batch.to_pylist():
        meta = clip_meta(row) or {}
        clip = load_clip(cfg.controls, row["clip_id"], meta, cfg.frames)
        for m in mine_clip(clip.controls, clip.present, clip.events, cfg):
            kp = clip.keypoints[m.start_frame : m.end_frame] if clip.keypoints is not None else None
            out.append({
                "sample_id": make_id("kto", clip.clip_id, m.category, m.start_frame, m.end_frame),
                "category": m.category,
                "desirable": True,  # real video; undesirable samples are generated later
                "split": None,  # by identity, over all clips: the driver sets it
                "clip_id": clip.clip_id,
                "identity": clip.identity,
                "start_frame": m.start_frame,
                "end_frame": m.end_frame,
                "reference_frame": m.reference_frame,
                "audio_path": _rel(meta.get("audio_path")) if meta.get("has_audio", True) else None,
                "audio_start_s": m.start_frame / CLIP_FPS,  # clip-relative, like the clip's own audio file
                "audio_end_s": m.end_frame / CLIP_FPS,
                "keypoints": np.nan_to_num(kp).reshape(len(kp), N_KEYPOINTS * 2).round(6).tolist() if kp is not None else None,
                "prompt": m.prompt,
                "video_path": _rel(meta.get("clip_path")),
                "score": m.score,
            })
    return pa.Table.from_pylist(out, schema=KTO_SCHEMA)


def run(cfg: KtoConfig) -> dict[str, Any]:
    """Run the job; returns the counts also written to ``metrics.json``."""
    t0 = time.perf_counter()
    out_dir = Path(cfg.out)
    ids = clip_ids(cfg.controls)
    meta = read_clip_meta(cfg.clips)
    start_ray(cfg.num_workers, ONE_ROW_PER_BLOCK)
    mined = KTO_SCHEMA.empty_table()
    if ids:
        ds = ray.data.from_items(clip_rows(ids, meta), override_num_blocks=len(ids))
        # 1:N clip -> boundary-case windows; Parquet reads + numpy rules         (light CPU)
        ds = ds.map_batches(mine_batch, fn_kwargs={"cfg": cfg}, batch_format="pyarrow", batch_size=1,
                            num_cpus=LIGHT_CPUS, compute=TaskPoolStrategy(size=cfg.num_workers))
        mined = pa.concat_tables([mined, *ds.iter_batches(batch_format="pyarrow", batch_size=None)])
    mined = mined.sort_by("sample_id")
    split = split_identities(mined.column("identity").to_pylist(), cfg.test_fraction, cfg.seed)
    table = mined.set_column(mined.schema.get_field_index("split"), KTO_SCHEMA.field("split"),
                             pa.array([split[i] for i in mined.column("identity").to_pylist()], pa.string()))
    write_table(out_dir / "kto.parquet", table, KTO_SCHEMA)
    samples = table.select(["category", "split", "identity"]).to_pylist()
    by = Counter((s["category"], s["split"]) for s in samples)
    train_ids = {s["identity"] for s in samples if s["split"] == "train"}
    test_ids = {s["identity"] for s in samples if s["split"] == "test"}
    metrics = {
        "clips": len(ids),
        "samples": len(samples),
        "by_category": {c: {sp: by.get((c, sp), 0) for sp in ("train", "test")} for c in KTO_CATEGORIES},
        "identities": {"train": len(train_ids), "test": len(test_ids), "overlap": len(train_ids & test_ids)},
        "wall_seconds": round(time.perf_counter() - t0, 3),
    }
    write_json(out_dir / "metrics.json", metrics)
    log.info("kto_mine: %d windows from %d clips", len(samples), len(ids))
    return metrics
