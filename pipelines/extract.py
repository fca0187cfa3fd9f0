"""extract: curated clips -> per-frame face signals (landmarks, blendshapes, pose, keypoints, proxies).

    clips.parquet ─probe (1:1)─▶ clip rows ─landmark (1:1, frames to a part file)─▶ frames.parquet
                                                 └─ rows with a reason ─────────────▶ rejects.parquet

Every input clip ends in exactly one of ``D/clips.parquet`` (with its frames in
``D/frames.parquet``, one row per clip frame, face-lost frames flagged) or ``D/rejects.parquet``.
One row per clip flows through both steps and comes back to the driver: the probe's reason, or
the landmark step's (a ``VideoError`` raised while decoding, with its own reason and detail), or
the frame counts. A rejected row passes the landmark step untouched. The landmark step writes
each clip's frames into its own part file in a hidden temporary folder; the driver streams them
into ``frames.parquet`` (temp file + rename) only after the whole job succeeded, so readers never
see a partial table, and later stages read one file.

Deterministic output (a rerun on the same inputs writes byte-identical tables): ``frames.parquet``
holds the kept clips in the input table's order, frames ascending within a clip, one row group
per clip; ``clips.parquet`` and ``rejects.parquet`` follow the input table's order as well. No
wall-clock value is stored in a table (timings go to ``metrics.json``).

Run: ``cogportrait extract --clips data/curate/clips.parquet --out data/extract``.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy, TaskPoolStrategy
from tqdm import tqdm

from cogportrait.config import ExtractConfig
from cogportrait.face.au_backends import make_backend
from cogportrait.face.extract import FRAMES_GLOB, extract_clip
from cogportrait.face.model_files import face_landmarker_path
from cogportrait.io.atomic import AtomicParquetWriter, write_json, write_table
from cogportrait.io.video import VideoError, probe_video
from cogportrait.schema import CLIPS_SCHEMA, FRAMES_SCHEMA, REJECTS_SCHEMA, TableError, check_reason
from pipelines._ray import LARGE_BLOCKS, start_ray

log = logging.getLogger("cogportrait.extract")

LIGHT_CPUS = 0.05
# One landmarker actor per worker (pool size = num_workers, so this never oversubscribes); a
# fraction keeps CPUs free for the probe tasks while the pool is alive.
ACTOR_CPUS = 0.5


def probe_clip(row: dict) -> dict:
    """Open the clip with decord and count its frames: unusable clips get a reject reason."""
    import decord
    from decord._ffi.base import DECORDError

    path = Path(row["abs_path"])
    row = dict(row, reason="", detail="", n_src_frames=0)
    if not path.is_file():
        return dict(row, reason="missing_file", detail=f"no file at {path}")
    if path.stat().st_size == 0:
        return dict(row, reason="empty_file", detail=f"{path.name} has zero bytes")
    try:
        n = len(decord.VideoReader(str(path), num_threads=1))
    except (RuntimeError, DECORDError) as err:  # its message does not say why; ask PyAV
        reason, detail = _classify_unreadable(path, str(err).splitlines()[0][:200])
        return dict(row, reason=reason, detail=detail)
    if n == 0:
        return dict(row, reason="no_frames", detail=f"{path.name} decodes to zero frames")
    return dict(row, n_src_frames=n)


def _classify_unreadable(path: Path, decord_msg: str) -> tuple[str, str]:
    """Reason for a clip decord cannot open: a container with no frame at all is ``no_frames``."""
    try:
        probe_video(path)
    except VideoError as err:
        if err.reason == "no_video_stream" or "yields no frame" in err.detail:
            return "no_frames", f"{path.name} holds no video frame ({err.detail})"
        return err.reason, err.detail
    return "undecodable", f"{path.name}: {decord_msg}"


class LandmarkClip:
    """Ray actor step: verifies the FaceLandmarker bundle and builds the AU backend once.

    Each call gets one clip row and returns it (1:1): with its frame counts, all its frames
    written to the row's ``part_path`` (FRAMES_SCHEMA, atomically); or, when decoding fails
    (the file broke, vanished or decodes to nothing after probing), with the ``VideoError``'s
    reason and detail. A row the probe rejected passes through untouched. A fresh VIDEO-mode
    landmarker is made per clip because tracking state cannot be reset between clips.
    """

    def __init__(self, cfg: ExtractConfig) -> None:
        face_landmarker_path(cfg.landmarker_model or None)  # verified once per actor
        self.cfg = cfg
        self.backend = make_backend(cfg.au_backend, cfg.au_model_dir or None, cfg.gaze_down_blink_coupling)

    def __call__(self, row: dict) -> dict:
        if row["reason"]:
            return row
        try:
            frames = extract_clip(row["abs_path"], row["clip_id"], bool(row["mirrored"]), self.backend, self.cfg)
        except VideoError as err:
            log.warning("clip %s: %s", row["clip_id"], err)
            return dict(row, reason=err.reason, detail=err.detail)
        write_table(row["part_path"], frames.sort_by("frame"), FRAMES_SCHEMA)
        n_face = pc.sum(frames.column("face_present")).as_py() or 0
        return dict(row, n_frames=frames.num_rows, n_face=int(n_face))


def _read_clips(path: Path) -> pa.Table:
    table = pq.read_table(path)
    missing = [n for n in ("clip_id", "clip_path") if n not in table.column_names]
    if missing:
        raise TableError(f"{path} lacks column(s) {missing}; expected the curate job's clips table")
    for name in CLIPS_SCHEMA.names:
        if name not in table.column_names:
            table = table.append_column(name, pa.nulls(table.num_rows, CLIPS_SCHEMA.field(name).type))
    return table.select(CLIPS_SCHEMA.names).cast(CLIPS_SCHEMA)


def run(cfg: ExtractConfig) -> dict:
    """Run the job; returns the counts also written to ``metrics.json``."""
    t_start = time.perf_counter()
    clips_path = Path(cfg.clips).resolve()
    root = clips_path.parent
    out_dir = Path(cfg.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    clips = _read_clips(clips_path)
    face_landmarker_path(cfg.landmarker_model or None)  # fail before starting Ray if the bundle is bad
    start_ray(cfg.num_workers, LARGE_BLOCKS)
    n = cfg.num_workers
    parts = Path(tempfile.mkdtemp(prefix=".frames-parts.", dir=out_dir))
    # one row per input clip, every key present from the start (scalars only: one block schema)
    rows = [
        {"index": i, "clip_id": r["clip_id"], "abs_path": str((root / r["clip_path"]).resolve()), "mirrored": bool(r["mirrored"]),
         "part_path": str(parts / f"{i:08d}.parquet"), "reason": "", "detail": "", "n_src_frames": 0, "n_frames": 0, "n_face": 0}
        for i, r in enumerate(clips.select(["clip_id", "clip_path", "mirrored"]).to_pylist())
    ]
    try:
        if len({r["clip_id"] for r in rows}) != len(rows):
            raise TableError(f"{clips_path} has duplicate clip_id values")
        results: list[dict] = []
        if rows:
            ds = ray.data.from_items(rows, override_num_blocks=len(rows))
            # 1:1 clip -> clip + reason; opens the file, counts frames                  (light CPU)
            ds = ds.map(probe_clip, num_cpus=LIGHT_CPUS, compute=TaskPoolStrategy(size=n))
            # 1:1 clip -> clip + frame counts, or its VideoError's reason; sequential decode +
            # FaceLandmarker per frame, frames to the clip's part file                 (one actor per worker)
            ds = ds.map(LandmarkClip, fn_constructor_kwargs={"cfg": cfg}, compute=ActorPoolStrategy(size=min(n, len(rows))), num_cpus=ACTOR_CPUS)
            results = sorted(ds.take_all(), key=lambda r: r["index"])  # back to the input order
        for r in results:
            if not r["reason"] and r["n_frames"] == 0:  # extract_clip raises first; kept for the invariant
                r.update(reason="no_frames", detail=f"{Path(r['abs_path']).name} gave no frame")
        kept_rows = [r for r in results if not r["reason"]]
        # publish: the parts into one frames.parquet (atomic), in input order, one row group per clip
        # (invert reads a clip by its clip_id statistics)
        with AtomicParquetWriter(out_dir / "frames.parquet", FRAMES_SCHEMA) as writer:
            for r in tqdm(kept_rows, desc="frames.parquet", unit="clip", disable=None):
                writer.write_table(pq.read_table(r["part_path"], schema=FRAMES_SCHEMA).combine_chunks())
        for old in out_dir.glob(FRAMES_GLOB):  # parts of an older layout would shadow nothing, but confuse
            old.unlink()
    finally:
        shutil.rmtree(parts, ignore_errors=True)

    kept_ids = {r["clip_id"] for r in kept_rows}
    rejected_rows = [r for r in results if r["reason"]]
    kept = clips.filter(pa.array([cid in kept_ids for cid in clips.column("clip_id").to_pylist()]))
    rel = [os.path.relpath(root / p, out_dir) for p in kept.column("clip_path").to_pylist()]
    kept = kept.set_column(kept.schema.get_field_index("clip_path"), "clip_path", pa.array(rel, pa.string()))
    if kept.column("audio_path").null_count < kept.num_rows:
        audio = [None if p is None else os.path.relpath(root / p, out_dir) for p in kept.column("audio_path").to_pylist()]
        kept = kept.set_column(kept.schema.get_field_index("audio_path"), "audio_path", pa.array(audio, pa.string()))
    write_table(out_dir / "clips.parquet", kept, CLIPS_SCHEMA)
    for r in rejected_rows:
        check_reason("extract", r["reason"])
    reject_recs = [
        {"video_id": r["clip_id"], "stage": "extract", "reason": r["reason"], "detail": r["detail"], "path": r["abs_path"]}
        for r in rejected_rows
    ]
    write_table(out_dir / "rejects.parquet", reject_recs, REJECTS_SCHEMA)

    wall = time.perf_counter() - t_start
    total = sum(r["n_frames"] for r in kept_rows)
    faces = sum(r["n_face"] for r in kept_rows)
    metrics = {
        "clips_in": len(rows),
        "clips": len(kept_rows),
        "rejects": len(rejected_rows),
        "rejects_by_reason": dict(sorted(Counter(f"extract/{r['reason']}" for r in rejected_rows).items())),
        "frames": total,
        "frames_with_face": faces,
        "face_present_ratio": round(faces / total, 4) if total else None,
        "clips_with_face_loss": sum(1 for r in kept_rows if r["n_face"] < r["n_frames"]),
        "au_backend": cfg.au_backend,
        "wall_seconds": round(wall, 3),
        "workers": n,
        "frames_per_second": round(total / wall, 1) if wall > 0 else None,
        "frames_per_second_per_core": round(total / wall / n, 1) if wall > 0 else None,
        "peak_rss_mb_driver": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    write_json(out_dir / "metrics.json", metrics)
    log.info("extract: %d clips, %d frames (%d with a face), %d rejects in %.1f s", len(kept_rows), total, faces, len(rejected_rows), wall)
    return metrics


__all__ = ["LandmarkClip", "probe_clip", "run"]
