"""curate: raw videos -> clean 512² 25 fps face clips (+ 16 kHz mono audio), nothing lost.

    manifest ─validate─▶ probe ─▶ scenes ─▶ face track ─▶ text ─▶ quality/motion ─▶ crop+encode
                                                                                         │
              clips.parquet ◀── kept rows ──┴── rejected rows ──▶ rejects.parquet ◀───────┘

Every manifest row and every span ends in exactly one of ``clips.parquet`` or
``rejects.parquet``: rejected rows keep flowing through later steps untouched and are
split off at the end. Outputs are written atomically; clip ids are uuid5(video_id, span), so a
rerun rewrites the same files and rows.

Rows between steps are Arrow tables of ``steps.ROW_SCHEMA`` (one operator per step, each a
``map_batches`` over one row: a video, then a span), so every block has the same typed columns.

Deterministic output: Ray hands rows back in completion order, so the driver buffers the table
rows (small: scores, spans, the crop track) and sorts them before writing; a rerun on the same
inputs writes byte-identical tables (no wall-clock value is stored in them; timings go to
``metrics.json``), and byte-identical clip and audio files (x264 runs single-threaded).

* ``clips.parquet``: by ``(video_id, start_frame)``.
* ``rejects.parquet``: by ``(manifest_row, start_frame, end_frame, start_s)`` with a whole-input
  reject (no span) before any span of that row, then stage in pipeline order, reason, detail,
  video_id, path (``steps.reject_sort_key``; the later keys only make the order total).

Run: ``cogportrait curate --manifest datasets/sample/manifest.csv --out data/curate``.
"""

from __future__ import annotations

import logging
import resource
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy, TaskPoolStrategy

from cogportrait.config import CurateConfig
from cogportrait.curate.manifest import read_manifest
from cogportrait.curate.steps import (
    CLIPS_SORT_KEYS,
    Row,
    apply_step,
    clip_record,
    crop_step,
    filter_step,
    new_row,
    probe_step,
    reject_record,
    reject_sort_key,
    rejected,
    rows_table,
    scenes_step,
    single_threaded,
    text_step,
    track_step,
)
from cogportrait.curate.text import TextDetector
from cogportrait.curate.tracking import FaceTracker
from cogportrait.io.atomic import write_json, write_table
from cogportrait.schema import CLIP_FPS, CLIPS_SCHEMA, CURATE_STEP_TIMERS as STEP_TIMERS, REJECTS_SCHEMA
from pipelines._ray import ONE_ROW_PER_BLOCK, start_ray

log = logging.getLogger("cogportrait.curate")

# Logical CPUs per step. The two heavy stages (decode + scenes + faces, and decode + crop +
# encode) cost about the same per frame and each may use every worker; at 0.45 CPU one of each
# plus the light steps fit on a single CPU, so the job streams (no stage waits for another to
# drain) even on a 1-CPU cluster, and at most ~2 heavy processes share a core.
HEAVY_CPUS = 0.45
LIGHT_CPUS = 0.05
# every step gets one row (a video or a span) per call, as Arrow, and returns ROW_SCHEMA tables
ROWS = {"batch_size": 1, "batch_format": "pyarrow"}


def per_row(step):
    """A Ray-free row step (row -> row, or row -> rows) as a batch function named after it."""

    def run_step(batch: pa.Table, **kwargs) -> pa.Table:
        return apply_step(step, batch, **kwargs)

    run_step.__name__ = run_step.__qualname__ = step.__name__
    return run_step


class TrackFaces:
    """Ray actor step: holds one MediaPipe face detector for its lifetime."""

    def __init__(self, cfg: CurateConfig) -> None:
        self.cfg = cfg
        single_threaded()
        self.tracker = FaceTracker(cfg.face_min_confidence, cfg.min_face_px, cfg.multi_face_area_ratio)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return apply_step(track_step, batch, cfg=self.cfg, tracker=self.tracker)


class DetectText:
    """Ray actor step: holds one RapidOCR detection session for its lifetime."""

    def __init__(self, cfg: CurateConfig) -> None:
        self.cfg = cfg
        self.detector = TextDetector(cfg.text_det_side_px, threads=1)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return apply_step(text_step, batch, cfg=self.cfg, detector=self.detector)


def run(cfg: CurateConfig) -> dict:
    """Run the job; returns the counts also written to ``metrics.json``."""
    t_start = time.perf_counter()
    out_dir = Path(cfg.out).resolve()
    (out_dir / "clips").mkdir(parents=True, exist_ok=True)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    valid, manifest_rejects, root = read_manifest(cfg.manifest)
    log.info("manifest %s: %d rows usable, %d rejected", cfg.manifest, len(valid), len(manifest_rejects))

    start_ray(cfg.num_workers, ONE_ROW_PER_BLOCK)
    n = cfg.num_workers

    heavy = n  # slots for each of the two heavy stages
    # one block per video, typed by ROW_SCHEMA from the start
    ds = ray.data.from_arrow([rows_table([new_row(r)]) for r in valid] or [rows_table([])])
    # 1:1 video -> video; opens the file, decodes one frame                  (light)
    ds = ds.map_batches(per_row(probe_step), fn_kwargs={"cfg": cfg}, **ROWS, num_cpus=LIGHT_CPUS, compute=TaskPoolStrategy(size=n))
    # 1:N video -> shots, cut to 3-20 s; one full decode at 256 px          (heavy; Ray fuses it into the next actor)
    ds = ds.map_batches(per_row(scenes_step), fn_kwargs={"cfg": cfg}, **ROWS, num_cpus=HEAVY_CPUS, compute=TaskPoolStrategy(size=heavy))
    # 1:N shot -> face runs + rejected gaps; decode + MediaPipe at 5 Hz     (heavy actor: detector loaded once)
    ds = ds.map_batches(TrackFaces, fn_constructor_kwargs={"cfg": cfg}, **ROWS, compute=ActorPoolStrategy(min_size=1, max_size=heavy), num_cpus=HEAVY_CPUS)
    # 1:1 span -> span; RapidOCR detection on 3 frames kept by the track pass (light actor: model loaded once)
    ds = ds.map_batches(DetectText, fn_constructor_kwargs={"cfg": cfg}, **ROWS, compute=ActorPoolStrategy(min_size=1, max_size=heavy), num_cpus=LIGHT_CPUS)
    # 1:1 span -> span; thresholds on sharpness, exposure, motion           (no decode)
    ds = ds.map_batches(per_row(filter_step), fn_kwargs={"cfg": cfg}, **ROWS, num_cpus=LIGHT_CPUS, compute=TaskPoolStrategy(size=n))
    # 1:1 span -> clip; decode, crop, resample to 25 fps, x264; audio wav   (heavy)
    ds = ds.map_batches(per_row(crop_step), fn_kwargs={"cfg": cfg, "out_dir": str(out_dir)}, **ROWS, num_cpus=HEAVY_CPUS, compute=TaskPoolStrategy(size=heavy))

    # every count below comes from the rows themselves
    counts: Counter[str] = Counter(f"manifest/{r.reason}" for r in manifest_rejects)
    timers = dict.fromkeys(STEP_TIMERS, 0.0)
    seconds_in: dict[str, float] = {}
    frames_in: dict[str, int] = {}
    seconds_out = 0.0
    kept: set[str] = set()
    reject_recs: list[Row] = [
        {"video_id": r.video_id, "stage": "manifest", "reason": r.reason, "detail": r.detail,
         "manifest_row": r.manifest_row, "path": r.path}
        for r in manifest_rejects
    ]
    clip_chunks: list[pa.Table] = []  # clip rows as Arrow (the crop track is the bulk), sorted at the end
    clip_buf: list[Row] = []
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.to_pylist():
            for key in STEP_TIMERS:
                timers[key] += row[key]
            if np.isfinite(row["duration_s"]):
                seconds_in[row["video_id"]] = row["duration_s"]
                frames_in[row["video_id"]] = row["n_src_frames"]
            if rejected(row):
                counts[f"{row['reject_stage']}/{row['reject_reason']}"] += 1
                reject_recs.append(reject_record(row))
            else:
                kept.add(row["clip_id"])
                seconds_out += row["n_frames"] / CLIP_FPS
                clip_buf.append(clip_record(row))
            if len(clip_buf) >= 256:
                clip_chunks.append(pa.Table.from_pylist(clip_buf, schema=CLIPS_SCHEMA))
                clip_buf = []
    clip_chunks.append(pa.Table.from_pylist(clip_buf, schema=CLIPS_SCHEMA))
    clips = pa.concat_tables(clip_chunks).sort_by(CLIPS_SORT_KEYS).combine_chunks()
    rejects = pa.Table.from_pylist(sorted(reject_recs, key=reject_sort_key), schema=REJECTS_SCHEMA)
    n_clips = write_table(out_dir / "clips.parquet", clips, CLIPS_SCHEMA)
    n_rejects = write_table(out_dir / "rejects.parquet", rejects, REJECTS_SCHEMA)

    removed = _remove_orphans(out_dir, kept)
    wall = time.perf_counter() - t_start
    video_seconds = sum(seconds_in.values())
    metrics = {
        "manifest_rows": len(valid) + len(manifest_rejects),
        "videos_probed_ok": len(seconds_in),
        "clips": n_clips,
        "rejects": n_rejects,
        "rejects_by_reason": dict(sorted(counts.items())),
        "input_video_seconds": round(video_seconds, 3),
        "input_frames": int(sum(frames_in.values())),
        "output_clip_seconds": round(seconds_out, 3),
        "wall_seconds": round(wall, 3),
        "workers": cfg.num_workers,
        "video_seconds_per_wall_second": round(video_seconds / wall, 3) if wall > 0 else None,
        "video_seconds_per_wall_second_per_core": round(video_seconds / wall / cfg.num_workers, 3) if wall > 0 else None,
        "frames_per_second": round(sum(frames_in.values()) / wall, 1) if wall > 0 else None,
        "step_cpu_seconds": {k[2:]: round(v, 3) for k, v in timers.items()},
        "orphan_files_removed": removed,
        "peak_rss_mb_driver": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    write_json(out_dir / "metrics.json", metrics)
    log.info("curate: %d clips, %d rejects in %.1f s (%s)", n_clips, n_rejects, wall, dict(counts))
    return metrics


def _remove_orphans(out_dir: Path, kept: set[str]) -> int:
    """Delete clip/audio files no row refers to (earlier runs with other params, crashed temps)."""
    removed = 0
    for sub, suffix in (("clips", ".mp4"), ("audio", ".wav")):
        for path in (out_dir / sub).iterdir():
            if path.name.startswith(".") or path.suffix != suffix or path.stem not in kept:
                path.unlink()
                removed += 1
    return removed
