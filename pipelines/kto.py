"""DVC stage ``kto_mine``: desirable boundary-case windows for KTO -> data/kto/kto.parquet (Ray Data).

Linear DAG:

    clip ids ─mine (1:N)─▶ windows with conditions ─▶ driver: split by identity, write

One step only: loading a clip and mining it share the clip's arrays, and splitting the rows into a
second step would ship the whole trajectory between workers for nothing. The rules are in
``cogportrait/behavior/kto.py`` (Ray-free). Undesirable samples come later, from the generator.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from pipelines._ray import ONE_ROW_PER_BLOCK, start_ray
from ray.data import TaskPoolStrategy

from cogportrait.config import KtoConfig
from cogportrait.io.atomic import write_json, write_table
from cogportrait.behavior.kto import mine_clip, split_identities
from cogportrait.schema import CLIP_FPS, KTO_CATEGORIES, KTO_SCHEMA, N_KEYPOINTS, make_id
from cogportrait.behavior.sources import clip_ids, fallback_identity, load_clip, read_clip_meta

log = logging.getLogger("cogportrait.behavior.kto")

LIGHT_CPUS = 0.25
Row = dict[str, Any]


def _rel(path: str | None) -> str | None:
    return os.path.relpath(path) if path else None


def mine_step(row: Row, cfg: KtoConfig) -> list[Row]:
    """1:N clip -> mined windows, each with its conditions (reference frame, audio span, keypoints, prompt)."""
    meta = json.loads(row["meta"]) if row["meta"] else {}
    clip = load_clip(cfg.controls, row["clip_id"], meta, cfg.frames)
    out = []
    for m in mine_clip(clip.controls, clip.present, cfg):
        kp = clip.keypoints[m.start_frame : m.end_frame] if clip.keypoints is not None else None
        kp_list = (
            np.nan_to_num(kp).reshape(len(kp), N_KEYPOINTS * 2).round(6).tolist() if kp is not None else None
        )
        sample = {
            "sample_id": make_id("kto", clip.clip_id, m.category, m.start_frame, m.end_frame),
            "category": m.category,
            "desirable": True,  # real video; undesirable samples are generated later
            "clip_id": clip.clip_id,
            "identity": fallback_identity(meta) or f"clip:{clip.clip_id}",
            "start_frame": m.start_frame,
            "end_frame": m.end_frame,
            "reference_frame": m.reference_frame,
            "audio_path": _rel(meta.get("audio_path")) if meta.get("has_audio", True) else None,
            "audio_start_s": m.start_frame / CLIP_FPS,  # clip-relative, like the clip's own audio file
            "audio_end_s": m.end_frame / CLIP_FPS,
            "keypoints": kp_list,
            "prompt": m.prompt,
            "video_path": _rel(meta.get("clip_path")),
            "score": m.score,
        }
        out.append({"payload": json.dumps(sample)})
    return out


def run(cfg: KtoConfig) -> dict[str, Any]:
    """Run the job; returns the counts also written to ``metrics.json``."""
    t0 = time.perf_counter()
    out_dir = Path(cfg.out)
    ids = clip_ids(cfg.controls)
    meta = read_clip_meta(cfg.clips)
    start_ray(cfg.num_workers, ONE_ROW_PER_BLOCK)
    samples: list[Row] = []
    if ids:
        rows_in = [{"clip_id": c, "meta": json.dumps(meta[c]) if c in meta else ""} for c in ids]
        ds = ray.data.from_items(rows_in, override_num_blocks=max(1, len(rows_in)))
        # 1:N clip -> boundary-case windows; Parquet reads + numpy rules         (light CPU)
        ds = ds.flat_map(mine_step, fn_kwargs={"cfg": cfg}, num_cpus=LIGHT_CPUS, compute=TaskPoolStrategy(size=cfg.num_workers))
        samples = [json.loads(r["payload"]) for r in ds.iter_rows()]
    split = split_identities([s["identity"] for s in samples], cfg.test_fraction, cfg.seed)
    for s in samples:
        s["split"] = split[s["identity"]]
    samples.sort(key=lambda s: s["sample_id"])
    table = pa.Table.from_pylist(samples, schema=KTO_SCHEMA)
    write_table(out_dir / "kto.parquet", table, KTO_SCHEMA)
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
