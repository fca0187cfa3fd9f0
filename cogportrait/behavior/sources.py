"""Read invert's outputs one clip at a time (controls, events, keypoints) plus curate's metadata.

Shared by the Ray jobs (prototypes, kto_mine) and by the Ray-free local build used in tests, so
both read the upstream tables the same way. Reads push the clip_id filter down to Parquet.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from cogportrait.schema import N_CHANNELS, N_KEYPOINTS, identity_key
from cogportrait.behavior.segment import ClipTrajectory

log = logging.getLogger("cogportrait.prototype_store")

CLIP_META_COLUMNS = ("clip_id", "video_id", "label", "identity", "audio_path", "clip_path", "has_audio")


def upstream_paths(controls_dir: str | Path, frames: str | Path | None = None) -> dict[str, Path]:
    """controls/events.parquet in invert's folder; keypoints from ``frames`` (extract's
    frames.parquet) or, when that is not given or absent, a frames.parquet beside the controls."""
    d = Path(controls_dir)
    paths = {name: d / f"{name}.parquet" for name in ("controls", "events", "frames")}
    if frames and Path(frames).exists():
        paths["frames"] = Path(frames)
    elif not paths["frames"].exists() and (d.parent / "extract" / "frames.parquet").exists():
        paths["frames"] = d.parent / "extract" / "frames.parquet"  # extract's own output folder
    if not paths["controls"].exists():
        raise FileNotFoundError(f"no controls.parquet in {d}: point --controls at invert's output folder")
    return paths


def clip_ids(controls_dir: str | Path) -> list[str]:
    """Every clip in controls.parquet, sorted (the job's input rows)."""
    t = pq.read_table(upstream_paths(controls_dir)["controls"], columns=["clip_id"])
    return sorted(set(t.column("clip_id").to_pylist()))


def read_clip_meta(clips_path: str | Path | None) -> dict[str, dict[str, Any]]:
    """clip_id -> label, identity, video_id, audio/clip paths (absolute) from curate's clips.parquet."""
    if clips_path is None or not Path(clips_path).exists():
        log.warning("no clips table at %s: labels and identities will be empty", clips_path)
        return {}
    clips_path = Path(clips_path)
    names = pq.read_schema(clips_path).names
    cols = [c for c in CLIP_META_COLUMNS if c in names]
    out = {}
    for row in pq.read_table(clips_path, columns=cols).to_pylist():
        for key in ("audio_path", "clip_path"):
            if row.get(key):
                row[key] = str((clips_path.parent / row[key]).resolve())
        out[row["clip_id"]] = row
    return out


def load_clip(
    controls_dir: str | Path, clip_id: str, meta: dict[str, Any] | None = None, frames: str | Path | None = None
) -> ClipTrajectory:
    """Frame-aligned controls, presence, residuals, keypoints (x, y) and events of one clip."""
    paths = upstream_paths(controls_dir, frames)
    flt = [("clip_id", "=", clip_id)]
    ct = pq.read_table(paths["controls"], filters=flt, columns=["frame", "face_present", "controls", "residual_error"])
    frames_idx = np.asarray(ct.column("frame").to_numpy(zero_copy_only=False), dtype=np.int64)
    n = int(frames_idx.max()) + 1 if len(frames_idx) else 0
    controls = np.full((n, N_CHANNELS), np.nan, dtype=np.float32)
    present = np.zeros(n, dtype=bool)
    residual = np.full(n, np.nan, dtype=np.float32)
    fp = ct.column("face_present").to_pylist()
    res = ct.column("residual_error").to_pylist()
    for f, row, p, r in zip(frames_idx, ct.column("controls").to_pylist(), fp, res):
        if row is not None and len(row) == N_CHANNELS:
            controls[f] = row
            present[f] = bool(p) if p is not None else True
        if r is not None:
            residual[f] = r
    keypoints = None
    if paths["frames"].exists():
        ft = pq.read_table(paths["frames"], filters=flt, columns=["frame", "keypoints"])
        keypoints = np.full((n, N_KEYPOINTS, 2), np.nan, dtype=np.float32)
        for f, kp in zip(ft.column("frame").to_pylist(), ft.column("keypoints").to_pylist()):
            if kp is not None and 0 <= f < n and len(kp) == N_KEYPOINTS * 3:
                keypoints[f] = np.asarray(kp, dtype=np.float32).reshape(N_KEYPOINTS, 3)[:, :2]
    events: list[dict[str, Any]] = []
    if paths["events"].exists():
        et = pq.read_table(paths["events"], filters=flt)
        events = sorted(et.to_pylist(), key=lambda e: (e["start_frame"], e["event_type"]))
    meta = meta or {}
    return ClipTrajectory(
        clip_id=clip_id,
        controls=controls,
        present=present,
        keypoints=keypoints,
        residual=residual,
        events=events,
        label=meta.get("label"),
        identity=identity_key(meta.get("identity"), clip_id),
        video_id=meta.get("video_id"),
    )


def clip_rows(ids: list[str], meta: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The input rows of the per-clip Ray jobs (prototypes, kto_mine): a clip id and curate's metadata
    as typed columns (strings "" where absent: every row has the same Arrow types)."""
    text = [k for k in CLIP_META_COLUMNS if k not in ("clip_id", "has_audio")]
    return [
        {"clip_id": c, **{k: str(meta.get(c, {}).get(k) or "") for k in text},
         "has_audio": bool(meta.get(c, {}).get("has_audio", False)), "has_meta": c in meta}
        for c in ids
    ]


def clip_meta(row: dict[str, Any]) -> dict[str, Any] | None:
    """The metadata dict of a ``clip_rows`` row again (None where the clip had none)."""
    if not row["has_meta"]:
        return None
    return {k: (v if v != "" else None) for k, v in row.items() if k != "has_meta"}
