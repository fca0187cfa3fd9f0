"""curate: raw videos -> clean 512² 25 fps face clips (+ 16 kHz mono audio), nothing lost.

    manifest ─validate─▶ probe ─▶ scenes ─▶ face track ─▶ text ─▶ quality/motion ─▶ crop+encode
                                                                                         │
              clips.parquet ◀── kept rows ──┴── rejected rows ──▶ rejects.parquet ◀───────┘

Every manifest row and every span ends in exactly one of ``clips.parquet`` or
``rejects.parquet``: rejected rows keep flowing through later steps untouched and are
split off at the end. Outputs are written atomically; clip ids are uuid5(video_id, span), so a
rerun rewrites the same files and rows.

Run: ``cogportrait curate --manifest datasets/sample/manifest.csv --out data/curate``.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from collections import Counter
from pathlib import Path

import numpy as np
import ray
from pipelines._ray import ONE_ROW_PER_BLOCK, start_ray
from ray.data import ActorPoolStrategy, TaskPoolStrategy

from cogportrait.config import CurateConfig
from cogportrait.curate.manifest import read_manifest
from cogportrait.curate.steps import (
    STEP_TIMERS,
    Row,
    clip_record,
    crop_step,
    filter_step,
    new_row,
    probe_step,
    reject_record,
    rejected,
    scenes_step,
    single_threaded,
    text_step,
    track_step,
)
from cogportrait.curate.text import TextDetector
from cogportrait.curate.tracking import FaceTracker
from cogportrait.io.atomic import AtomicParquetWriter, write_json
from cogportrait.schema import CLIPS_SCHEMA, REJECTS_SCHEMA

log = logging.getLogger("cogportrait.curate")

# Logical CPUs per step. The two heavy stages (decode + scenes + faces, and decode + crop +
# encode) cost about the same per frame and each may use every worker; at 0.45 CPU one of each
# plus the light steps fit on a single CPU, so the job streams (no stage waits for another to
# drain) even on a 1-CPU cluster, and at most ~2 heavy processes share a core.
HEAVY_CPUS = 0.45
LIGHT_CPUS = 0.05


class TrackFaces:
    """Ray actor step: holds one MediaPipe face detector for its lifetime."""

    def __init__(self, cfg: CurateConfig) -> None:
        self.cfg = cfg
        single_threaded()
        self.tracker = FaceTracker(cfg.face_min_confidence, cfg.min_face_px, cfg.multi_face_area_ratio)

    def __call__(self, row: Row) -> list[Row]:
        return track_step(row, self.cfg, self.tracker)


class DetectText:
    """Ray actor step: holds one RapidOCR detection session for its lifetime."""

    def __init__(self, cfg: CurateConfig) -> None:
        self.cfg = cfg
        self.detector = TextDetector(cfg.text_det_side_px, threads=1)

    def __call__(self, row: Row) -> Row:
        return text_step(row, self.cfg, self.detector)


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
    ds = ray.data.from_items([new_row(r) for r in valid], override_num_blocks=max(1, len(valid)))
    # 1:1 video -> video; opens the file, decodes one frame                  (light)
    ds = ds.map(probe_step, fn_kwargs={"cfg": cfg}, num_cpus=LIGHT_CPUS, compute=TaskPoolStrategy(size=n))
    # 1:N video -> shots, cut to 3-20 s; one full decode at 256 px          (heavy; Ray fuses it into the next actor)
    ds = ds.flat_map(scenes_step, fn_kwargs={"cfg": cfg}, num_cpus=HEAVY_CPUS, compute=TaskPoolStrategy(size=heavy))
    # 1:N shot -> face runs + rejected gaps; decode + MediaPipe at 5 Hz     (heavy actor: detector loaded once)
    ds = ds.flat_map(TrackFaces, fn_constructor_kwargs={"cfg": cfg}, compute=ActorPoolStrategy(min_size=1, max_size=heavy), num_cpus=HEAVY_CPUS)
    # 1:1 span -> span; RapidOCR detection on 3 frames kept by the track pass (light actor: model loaded once)
    ds = ds.map(DetectText, fn_constructor_kwargs={"cfg": cfg}, compute=ActorPoolStrategy(min_size=1, max_size=heavy), num_cpus=LIGHT_CPUS)
    # 1:1 span -> span; thresholds on sharpness, exposure, motion           (no decode)
    ds = ds.map(filter_step, fn_kwargs={"cfg": cfg}, num_cpus=LIGHT_CPUS, compute=TaskPoolStrategy(size=n))
    # 1:1 span -> clip; decode, crop, resample to 25 fps, x264; audio wav   (heavy)
    ds = ds.map(crop_step, fn_kwargs={"cfg": cfg, "out_dir": str(out_dir)}, num_cpus=HEAVY_CPUS, compute=TaskPoolStrategy(size=heavy))

    counts: Counter[str] = Counter()
    timers = dict.fromkeys(STEP_TIMERS, 0.0)
    seconds_in: dict[str, float] = {}
    frames_in: dict[str, int] = {}
    seconds_out = 0.0
    kept: set[str] = set()
    with (
        AtomicParquetWriter(out_dir / "clips.parquet", CLIPS_SCHEMA) as clips_writer,
        AtomicParquetWriter(out_dir / "rejects.parquet", REJECTS_SCHEMA) as rejects_writer,
    ):
        rejects_writer.write_rows(
            [
                {"video_id": r.video_id, "stage": "manifest", "reason": r.reason, "detail": r.detail,
                 "manifest_row": r.manifest_row, "path": r.path}
                for r in manifest_rejects
            ]
        )
        counts.update(f"manifest/{r.reason}" for r in manifest_rejects)
        clip_buf: list[Row] = []
        reject_buf: list[Row] = []
        for row in ds.iter_rows():
            for key in STEP_TIMERS:
                timers[key] += float(row[key])
            if np.isfinite(row["duration_s"]):
                seconds_in[row["video_id"]] = float(row["duration_s"])
                frames_in[row["video_id"]] = int(row["n_src_frames"])
            if rejected(row):
                counts[f"{row['reject_stage']}/{row['reject_reason']}"] += 1
                reject_buf.append(reject_record(row))
            else:
                kept.add(row["clip_id"])
                seconds_out += row["n_frames"] / 25.0
                clip_buf.append(clip_record(row))
            if len(clip_buf) >= 256:
                clips_writer.write_rows(clip_buf)
                clip_buf = []
            if len(reject_buf) >= 256:
                rejects_writer.write_rows(reject_buf)
                reject_buf = []
        clips_writer.write_rows(clip_buf)
        rejects_writer.write_rows(reject_buf)
        n_clips, n_rejects = clips_writer.num_rows, rejects_writer.num_rows

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


if __name__ == "__main__":
    from cogportrait.cli import main

    raise SystemExit(main(["curate", *os.sys.argv[1:]]))
