"""extract: curated clips -> per-frame face signals (landmarks, blendshapes, pose, keypoints, proxies).

    clips.parquet ─probe (1:1)─▶ usable clips ─landmark (1:N clip→frames)─▶ frames.parquet
                        └─ unusable ──────────────────────────────────────▶ rejects.parquet

Every input clip ends in exactly one of ``D/clips.parquet`` (with its frames in
``D/frames.parquet``, one row per clip frame, face-lost frames flagged) or ``D/rejects.parquet``.
Ray writes frame parts into a hidden temporary folder; the driver streams them into
``frames.parquet`` (temp file + rename) only after the whole job succeeded, so readers never
see a partial table, and later stages read one file.

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

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from tqdm import tqdm
from pipelines._ray import LARGE_BLOCKS, start_ray
from ray.data import ActorPoolStrategy, TaskPoolStrategy

from cogportrait.config import ExtractConfig
from cogportrait.face.au_backends import make_backend
from cogportrait.face.extract import FRAMES_GLOB, LandmarkerSettings, extract_clip
from cogportrait.face.models import face_landmarker_path
from cogportrait.io.atomic import AtomicParquetWriter, write_json, write_table
from cogportrait.io.video import VideoError, probe_video
from cogportrait.schema import CLIPS_SCHEMA, FRAMES_SCHEMA, REJECTS_SCHEMA, check_reason

log = logging.getLogger("cogportrait.extract")

LIGHT_CPUS = 0.05
# One landmarker actor per worker (pool size = num_workers, so this never oversubscribes); a
# fraction keeps CPUs free for the Parquet write while the pool is alive.
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

    Each call gets one clip and returns all its frames (1:N). A fresh VIDEO-mode landmarker is
    made per clip because tracking state cannot be reset between clips.
    """

    def __init__(self, cfg: ExtractConfig) -> None:
        path = face_landmarker_path(cfg.landmarker_model or None)
        self.settings = LandmarkerSettings(
            str(path), cfg.min_detection_confidence, cfg.min_presence_confidence, cfg.min_tracking_confidence
        )
        self.backend = make_backend(cfg.au_backend, cfg.au_model_dir or None, cfg.gaze_down_blink_coupling)

    def __call__(self, batch: pa.Table) -> pa.Table:
        tables = [FRAMES_SCHEMA.empty_table()]
        for row in batch.to_pylist():
            try:
                tables.append(extract_clip(row["abs_path"], row["clip_id"], bool(row["mirrored"]), self.backend, self.settings))
            except VideoError as err:
                # the driver turns a clip without frames into a reject (decode_error / no_frames)
                log.warning("clip %s: %s", row["clip_id"], err)
        return pa.concat_tables(tables)


def _read_clips(path: Path) -> pa.Table:
    table = pq.read_table(path)
    missing = [n for n in ("clip_id", "clip_path") if n not in table.column_names]
    if missing:
        raise ValueError(f"{path} lacks column(s) {missing}; expected the curate job's clips table")
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
    rows = [
        {"clip_id": r["clip_id"], "abs_path": str((root / r["clip_path"]).resolve()), "mirrored": bool(r["mirrored"])}
        for r in clips.select(["clip_id", "clip_path", "mirrored"]).to_pylist()
    ]
    if len({r["clip_id"] for r in rows}) != len(rows):
        raise ValueError(f"{clips_path} has duplicate clip_id values")

    start_ray(cfg.num_workers, LARGE_BLOCKS)
    n = cfg.num_workers
    parts = Path(tempfile.mkdtemp(prefix=".frames-parts.", dir=out_dir))
    try:
        probed: list[dict] = []
        if rows:
            ds = ray.data.from_items(rows, override_num_blocks=len(rows))
            # 1:1 clip -> clip + reason; opens the file, counts frames            (light CPU)
            ds = ds.map(probe_clip, num_cpus=LIGHT_CPUS, compute=TaskPoolStrategy(size=n))
            probed = ds.take_all()
        usable = [r for r in probed if not r["reason"]]
        if usable:
            ds = ray.data.from_items(usable, override_num_blocks=len(usable))
            # 1:N clip -> frames; sequential decode + FaceLandmarker per frame    (one actor per worker)
            ds = ds.map_batches(
                LandmarkClip,
                fn_constructor_kwargs={"cfg": cfg},
                batch_size=1,
                batch_format="pyarrow",
                compute=ActorPoolStrategy(size=min(n, len(usable))),
                num_cpus=ACTOR_CPUS,
            )
            ds.write_parquet(str(parts), schema=FRAMES_SCHEMA)
        # per-clip frame counts from the parts (two small columns only)
        n_frames: Counter[str] = Counter()
        n_face: Counter[str] = Counter()
        part_files = sorted(parts.glob("*.parquet"))
        for f in part_files:
            t = pq.read_table(f, columns=["clip_id", "face_present"])
            for cid, present in zip(t.column("clip_id").to_pylist(), t.column("face_present").to_pylist()):
                n_frames[cid] += 1
                n_face[cid] += bool(present)
        reasons = {r["clip_id"]: (r["reason"], r["detail"]) for r in probed if r["reason"]}
        for r in usable:
            if n_frames[r["clip_id"]] == 0:
                reasons[r["clip_id"]] = ("decode_error", "no frame could be decoded and landmarked (see the job log)")
        kept_ids = [r["clip_id"] for r in rows if r["clip_id"] not in reasons]
        # publish: stream the parts into one frames.parquet (atomic), clip by clip
        with AtomicParquetWriter(out_dir / "frames.parquet", FRAMES_SCHEMA) as writer:
            for f in tqdm(part_files, desc="frames.parquet", unit="part", disable=None):
                pf = pq.ParquetFile(f)
                for i in range(pf.num_row_groups):
                    # one row group per clip run: invert reads a clip by its clip_id statistics
                    group = pf.read_row_group(i)
                    ids = np.asarray(group.column("clip_id").to_pylist(), dtype=object)
                    cuts = [0, *(np.flatnonzero(ids[1:] != ids[:-1]) + 1).tolist(), len(ids)]
                    for a, b in zip(cuts[:-1], cuts[1:]):
                        writer.write_table(group.slice(a, b - a))
        for old in out_dir.glob(FRAMES_GLOB):  # parts of an older layout would shadow nothing, but confuse
            old.unlink()
    finally:
        shutil.rmtree(parts, ignore_errors=True)

    kept = clips.filter(pa.array([cid in set(kept_ids) for cid in clips.column("clip_id").to_pylist()]))
    rel = [os.path.relpath(root / p, out_dir) for p in kept.column("clip_path").to_pylist()]
    kept = kept.set_column(kept.schema.get_field_index("clip_path"), "clip_path", pa.array(rel, pa.string()))
    if kept.column("audio_path").null_count < kept.num_rows:
        audio = [None if p is None else os.path.relpath(root / p, out_dir) for p in kept.column("audio_path").to_pylist()]
        kept = kept.set_column(kept.schema.get_field_index("audio_path"), "audio_path", pa.array(audio, pa.string()))
    write_table(out_dir / "clips.parquet", kept, CLIPS_SCHEMA)
    reject_rows = []
    for cid, (reason, detail) in reasons.items():
        check_reason("extract", reason)
        path = next(r["abs_path"] for r in rows if r["clip_id"] == cid)
        reject_rows.append({"video_id": cid, "stage": "extract", "reason": reason, "detail": detail, "path": path})
    write_table(out_dir / "rejects.parquet", reject_rows, REJECTS_SCHEMA)

    wall = time.perf_counter() - t_start
    total = int(sum(n_frames.values()))
    faces = int(sum(n_face.values()))
    metrics = {
        "clips_in": len(rows),
        "clips": len(kept_ids),
        "rejects": len(reasons),
        "rejects_by_reason": dict(Counter(f"extract/{r}" for r, _ in reasons.values())),
        "frames": total,
        "frames_with_face": faces,
        "face_present_ratio": round(faces / total, 4) if total else None,
        "clips_with_face_loss": int(sum(1 for c in kept_ids if n_face[c] < n_frames[c])),
        "au_backend": cfg.au_backend,
        "wall_seconds": round(wall, 3),
        "workers": n,
        "frames_per_second": round(total / wall, 1) if wall > 0 else None,
        "frames_per_second_per_core": round(total / wall / n, 1) if wall > 0 else None,
        "peak_rss_mb_driver": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    write_json(out_dir / "metrics.json", metrics)
    log.info("extract: %d clips, %d frames (%d with a face), %d rejects in %.1f s", len(kept_ids), total, faces, len(reasons), wall)
    return metrics


if __name__ == "__main__":
    from cogportrait.cli import main

    raise SystemExit(main(["extract", *os.sys.argv[1:]]))


__all__ = ["LandmarkClip", "probe_clip", "run"]
