"""curate: raw videos -> clean 512² 25 fps face clips (+ 16 kHz mono audio), nothing lost.

    manifest ─validate─▶ probe ─▶ scan (scenes + face track) ─▶ text ─▶ quality/motion ─▶ crop+encode
                                                                                             │
              clips.parquet ◀── kept rows ──┴── rejected rows ──▶ rejects.parquet ◀───────────┘

Every manifest row and every span ends in exactly one of ``clips.parquet`` or
``rejects.parquet``: rejected rows keep flowing through later steps untouched and are
split off at the end. Outputs are written atomically; clip ids are uuid5(video_id, span), so a
rerun rewrites the same files and rows.

Resumable: each video whose rows have all arrived is journalled (``cogportrait/curate/journal.py``);
a rerun, directly or under ``dvc repro`` (the stage's outputs persist), skips the journalled
videos, so an interrupted job carries on where it stopped. ``--fresh`` ignores the journal.

One Ray actor per core runs a video's steps in order (``CurateVideos``): the probe, then the scan,
which streams the video's spans shot by shot (memory stays flat in video length), then text,
quality/motion and crop on each span. A video is the unit of parallelism: the scan and the crop
both decode, and in separate processes they shared each core and paid Ray's hand-off per span
(bench/curate.py, x10 sample on one core: 151-155 s in one process against 166-171 s in two,
and 1.92-1.95x that on two cores); one long video then runs on one core. Rows leave the actor as Arrow
tables of ``steps.ROW_SCHEMA``, so every block has the same typed columns.

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
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
from ray.data import ActorPoolStrategy
from tqdm import tqdm

from cogportrait.config import CurateConfig
from cogportrait.curate.journal import Journal
from cogportrait.curate.manifest import read_manifest
from cogportrait.curate.steps import (
    CLIPS_SORT_KEYS,
    Row,
    clip_record,
    crop_step,
    filter_step,
    new_row,
    probe_step,
    reject_record,
    reject_sort_key,
    rejected,
    rows_table,
    scan_step,
    text_step,
)
from cogportrait.curate.text import TextDetector
from cogportrait.curate.tracking import FaceTracker
from cogportrait.io.atomic import write_json, write_table
from cogportrait.schema import CLIP_FPS, CLIPS_SCHEMA, CURATE_STEP_TIMERS as STEP_TIMERS, REJECTS_SCHEMA
from pipelines._ray import ONE_ROW_PER_BLOCK, one_block_each, start_ray

log = logging.getLogger("cogportrait.curate")

# One actor per worker: the pool's size (num_workers) sets the parallelism, so the logical CPUs asked
# only admit it; half a CPU each lets the job start on a joined cluster with fewer free CPUs.
ACTOR_CPUS = 0.5


class CurateVideos:
    """Ray actor: holds one MediaPipe face detector and one RapidOCR detection session for its
    lifetime, and runs each video through every step, yielding its span rows shot by shot (a
    generator UDF), so a long video never sits whole in a block."""

    def __init__(self, cfg: CurateConfig, out_dir: str) -> None:
        self.cfg, self.out_dir = cfg, out_dir
        self.tracker = FaceTracker(cfg.face_min_confidence, cfg.min_face_px, cfg.multi_face_area_ratio)
        self.text_detector = TextDetector(cfg.text_det_side_px, threads=1)

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:
        for video in batch.to_pylist():
            # 1:1 video -> video; opens the file, decodes one frame
            video = probe_step(video, self.cfg)
            # 1:N video -> spans, streamed per shot; ONE decode: scene cuts (scene_downscale_px) and
            # MediaPipe face samples at 5 Hz, cut to 3-20 s face runs
            for spans in scan_step(video, cfg=self.cfg, tracker=self.tracker):
                yield rows_table([self.finish_span(span) for span in spans])

    def finish_span(self, span: Row) -> Row:
        cfg = self.cfg
        # 1:1 span -> span; RapidOCR on the frames the scan kept: captions and tickers
        span = text_step(span, cfg=cfg, detector=self.text_detector)
        # 1:1 span -> span; thresholds on sharpness, exposure, motion (no decode)
        span = filter_step(span, cfg=cfg)
        # 1:1 span -> clip; decode, crop, resample to 25 fps, x264; audio wav
        return crop_step(span, cfg=cfg, out_dir=self.out_dir)


class Totals:
    """What the tables and metrics gather over videos, whether run now or resumed."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.timers = dict.fromkeys(STEP_TIMERS, 0.0)
        self.seconds_in: dict[str, float] = {}
        self.seconds_run: dict[str, float] = {}  # the videos this job ran (not resumed)
        self.frames_in: dict[str, int] = {}
        self.seconds_out = 0.0
        self.clip_chunks: list[pa.Table] = [CLIPS_SCHEMA.empty_table()]  # concat needs one table
        self.reject_recs: list[Row] = []

    def add(self, video_id: str, clips: pa.Table, rejects: list[Row], summary: dict, timers: dict | None = None) -> None:
        """A finished video; ``timers`` (its seconds per step) only when it ran in this job."""
        self.clip_chunks.append(clips)
        self.seconds_out += sum(clips.column("n_frames").to_pylist()) / CLIP_FPS
        self.reject_recs.extend(rejects)
        self.counts.update(f"{r['stage']}/{r['reason']}" for r in rejects)
        if summary["duration_s"] is not None:
            self.seconds_in[video_id] = summary["duration_s"]
            self.frames_in[video_id] = summary["n_src_frames"]
        if timers is not None:
            self.timers = {k: self.timers[k] + timers[k] for k in STEP_TIMERS}
            if summary["duration_s"] is not None:
                self.seconds_run[video_id] = summary["duration_s"]


class VideoRows:
    """A video's rows as they arrive (any order); complete when the scan's count is reached."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.expected = 0

    def add(self, row: Row) -> bool:
        self.rows.append(row)
        self.expected = max(self.expected, row["video_rows"])
        return len(self.rows) == self.expected

    def tables(self) -> tuple[list[Row], list[Row], dict, dict]:
        """(clip rows, reject rows, summary, seconds per step) of the finished video."""
        clips = sorted((clip_record(r) for r in self.rows if not rejected(r)), key=lambda r: r["start_frame"])
        rejects = sorted((reject_record(r) for r in self.rows if rejected(r)), key=reject_sort_key)
        timed = [r for r in self.rows if np.isfinite(r["duration_s"])]
        summary = {
            "duration_s": timed[0]["duration_s"] if timed else None,
            "n_src_frames": max((r["n_src_frames"] for r in timed), default=0),  # early shots see part of the stream
        }
        return clips, rejects, summary, {k: sum(r[k] for r in self.rows) for k in STEP_TIMERS}


def run(cfg: CurateConfig, fresh: bool = False) -> dict:
    """Run the job (resuming from the journal unless ``fresh``); returns the counts also
    written to ``metrics.json``."""
    t_start = time.perf_counter()
    out_dir = Path(cfg.out).resolve()
    (out_dir / "clips").mkdir(parents=True, exist_ok=True)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    valid, manifest_rejects, root = read_manifest(cfg.manifest)
    log.info("manifest %s: %d rows usable, %d rejected", cfg.manifest, len(valid), len(manifest_rejects))
    journal = Journal(out_dir / "journal", cfg)
    totals = Totals()
    for r in manifest_rejects:  # never reach Ray: no clips, no video seconds
        totals.reject_recs.append({"video_id": r.video_id, "stage": "manifest", "reason": r.reason, "detail": r.detail,
                                   "manifest_row": r.manifest_row, "path": r.path})
        totals.counts[f"manifest/{r.reason}"] += 1
    todo = []
    for r in valid:
        entry = None if fresh else journal.load(r["video_id"], r["path"], out_dir)
        if entry is None:
            todo.append(r)
        else:  # the manifest may have been reordered since: its row number is today's
            totals.add(entry.video_id, entry.clips, [{**rec, "manifest_row": r["manifest_row"]} for rec in entry.rejects.to_pylist()],
                       entry.summary)
    if len(todo) < len(valid):
        log.info("journal: %d of %d videos done already; running %d", len(valid) - len(todo), len(valid), len(todo))
    if todo:
        _run_videos(cfg, todo, out_dir, journal, totals)

    clips = pa.concat_tables(totals.clip_chunks).sort_by(CLIPS_SORT_KEYS).combine_chunks()
    rejects = pa.Table.from_pylist(sorted(totals.reject_recs, key=reject_sort_key), schema=REJECTS_SCHEMA)
    n_clips = write_table(out_dir / "clips.parquet", clips, CLIPS_SCHEMA)
    n_rejects = write_table(out_dir / "rejects.parquet", rejects, REJECTS_SCHEMA)

    removed = _remove_orphans(out_dir, set(clips.column("clip_id").to_pylist()))
    removed += journal.prune({r["video_id"] for r in valid})
    wall = time.perf_counter() - t_start
    video_seconds = sum(totals.seconds_in.values())
    frames = int(sum(totals.frames_in.values()))
    run_seconds = sum(totals.seconds_run.values())  # throughput: what this run decoded, not what it resumed
    run_frames = int(sum(totals.frames_in[v] for v in totals.seconds_run))
    metrics = {
        "manifest_rows": len(valid) + len(manifest_rejects),
        "videos_probed_ok": len(totals.seconds_in),
        "videos_resumed": len(valid) - len(todo),
        "clips": n_clips,
        "rejects": n_rejects,
        "rejects_by_reason": dict(sorted(totals.counts.items())),
        "input_video_seconds": round(video_seconds, 3),
        "input_frames": frames,
        "output_clip_seconds": round(totals.seconds_out, 3),
        "wall_seconds": round(wall, 3),
        "workers": cfg.num_workers,
        "video_seconds_per_wall_second": round(run_seconds / wall, 3) if wall > 0 else None,
        "video_seconds_per_wall_second_per_core": round(run_seconds / wall / cfg.num_workers, 3) if wall > 0 else None,
        "frames_per_second": round(run_frames / wall, 1) if wall > 0 else None,
        "step_cpu_seconds": {k[2:]: round(v, 3) for k, v in totals.timers.items()},
        "orphan_files_removed": removed,
        "peak_rss_mb_driver": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    write_json(out_dir / "metrics.json", metrics)
    log.info("curate: %d clips, %d rejects in %.1f s (%s)", n_clips, n_rejects, wall, dict(totals.counts))
    return metrics


def _run_videos(cfg: CurateConfig, videos: list[Row], out_dir: Path, journal: Journal, totals: Totals) -> None:
    """The Ray Data job over ``videos``; each finished video goes to the journal and the totals."""
    start_ray(cfg.num_workers, ONE_ROW_PER_BLOCK)
    # one block per video, typed by ROW_SCHEMA from the start
    ds = one_block_each([rows_table([new_row(r)]) for r in videos])
    # 1:N video -> its span rows: probe, scan, text, quality/motion, crop      (one actor per core, both
    #                                                                          models loaded once)
    ds = ds.map_batches(CurateVideos, fn_constructor_kwargs={"cfg": cfg, "out_dir": str(out_dir)},
                        batch_size=1, batch_format="pyarrow",
                        compute=ActorPoolStrategy(size=min(cfg.num_workers, len(videos))), num_cpus=ACTOR_CPUS)

    open_videos: dict[str, VideoRows] = {}
    with tqdm(total=len(videos), desc="curate", unit="video", disable=None) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                video = open_videos.setdefault(row["video_id"], VideoRows())
                if not video.add(row):
                    continue
                del open_videos[row["video_id"]]
                clips, rejects, summary, timers = video.tables()
                journal.record(row["video_id"], row["path"], clips, rejects, summary)
                totals.add(row["video_id"], pa.Table.from_pylist(clips, schema=CLIPS_SCHEMA), rejects, summary, timers)
                bar.update()
    if open_videos:  # a step lost rows: a bug, never a silent gap in the tables
        raise RuntimeError(f"curate: rows missing for videos {sorted(open_videos)[:5]}")


def _remove_orphans(out_dir: Path, kept: set[str]) -> int:
    """Delete clip/audio files no row refers to (earlier runs with other params, crashed temps)."""
    removed = 0
    for sub, suffix in (("clips", ".mp4"), ("audio", ".wav")):
        for path in (out_dir / sub).iterdir():
            if path.name.startswith(".") or path.suffix != suffix or path.stem not in kept:
                path.unlink()
                removed += 1
    return removed
