"""Cut one clip's control trajectory into prototypes p = {y, c_1..T, k_1..T} (paper §3.2).

Two kinds, both labelled with the clip's label y:
* event-centred: each behaviour event from ``events.parquet`` plus context padding on both sides
  (a blink needs its onset and offset to be reusable); events longer than ``max_event_s`` are cut
  around their apex;
* clip-level windows of ``window_s`` every ``window_hop_s`` (event_type "window"), so that labels
  whose cue is a sustained state (drowsiness, low arousal) are retrievable too.

Pure numpy; the Ray job in ``pipelines/prototypes.py`` maps this over clips.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cogportrait.config import PrototypesConfig
from cogportrait.schema import (
    CHANNEL_INDEX,
    CLIP_FPS,
    HEAD_CHANNELS,
    N_CHANNELS,
    N_KEYPOINTS,
    PROTOTYPE_WINDOW_EVENT,
    make_id,
)
from cogportrait.timeseries import fill_gaps

HEAD_IDX = np.array([CHANNEL_INDEX[c] for c in HEAD_CHANNELS])


@dataclass
class ClipTrajectory:
    """Everything segmentation needs from one clip, frame-aligned at 25 fps."""

    clip_id: str
    controls: np.ndarray  # (T, 17) float32, NaN rows where no face
    present: np.ndarray  # (T,) bool
    keypoints: np.ndarray | None = None  # (T, 62, 2) float32, NaN where missing
    residual: np.ndarray | None = None  # (T,)
    events: list[dict[str, Any]] = field(default_factory=list)
    label: str | None = None
    identity: str | None = None
    video_id: str | None = None


def channel_stats(controls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Channel mean and peak of a (T, 17) trajectory.

    The peak is the max for AU and gaze channels (all >= 0); for the signed head angles it is the
    value of largest magnitude, so a downward nod's peak pitch is negative, as targets state it.
    """
    c = np.asarray(controls, dtype=np.float64)
    mean = c.mean(axis=0)
    peak = c.max(axis=0)
    head = c[:, HEAD_IDX]
    peak[HEAD_IDX] = head[np.argmax(np.abs(head), axis=0), np.arange(len(HEAD_IDX))]
    return mean.astype(np.float32), peak.astype(np.float32)


def _spans(clip: ClipTrajectory, cfg: PrototypesConfig, fps: int) -> list[tuple[str, str, int, int, list[str]]]:
    """(event_type, eyes, start, end exclusive, flags) of every candidate prototype."""
    n = len(clip.controls)
    pad = int(round(cfg.context_pad_s * fps))
    max_len = max(1, int(round(cfg.max_event_s * fps)))
    out: list[tuple[str, str, int, int, list[str]]] = []
    for ev in clip.events:
        s, e = int(ev["start_frame"]), int(ev["end_frame"]) + 1  # events: inclusive end
        flags: list[str] = []
        if e - s > max_len:
            apex = int(ev.get("apex_frame") if ev.get("apex_frame") is not None else (s + e) // 2)
            s = min(max(s, apex - max_len // 2), e - max_len)
            e = s + max_len
            flags.append("truncated")
        s2, e2 = s - pad, e + pad
        if s2 < 0 or e2 > n:
            flags.append("clipped_context")
        s2, e2 = max(0, s2), min(n, e2)
        if e2 > s2:
            out.append((str(ev["event_type"]), str(ev.get("eyes") or ""), s2, e2, flags))
    win = max(1, int(round(cfg.window_s * fps)))
    hop = max(1, int(round(cfg.window_hop_s * fps)))
    if n <= win:
        starts = [0]
    else:
        starts = list(range(0, n - win + 1, hop))
        if starts[-1] + win < n:
            starts.append(n - win)
    for s in starts:
        out.append((PROTOTYPE_WINDOW_EVENT, "", s, min(n, s + win), []))
    return out


def segment_clip(clip: ClipTrajectory, cfg: PrototypesConfig, fps: int = CLIP_FPS) -> list[dict[str, Any]]:
    """Every candidate span of one clip as a PROTOTYPE_CANDIDATES_SCHEMA row: the prototypes
    (``drop_reason`` None; the flat stat columns are derived when the table is written) and the
    dropped candidates with their reason (ids and span only), so that counts come from the rows."""
    n = len(clip.controls)
    if n == 0:
        return []
    present = np.asarray(clip.present, dtype=bool) & np.isfinite(clip.controls).all(axis=1)
    controls = fill_gaps(np.nan_to_num(clip.controls, nan=0.0), present)
    if clip.keypoints is not None and len(clip.keypoints) == n:
        kp_valid = np.isfinite(clip.keypoints.reshape(n, -1)).all(axis=1)
        keypoints = fill_gaps(np.nan_to_num(clip.keypoints, nan=0.0), kp_valid)
    else:
        kp_valid = np.zeros(n, dtype=bool)
        keypoints = np.zeros((n, N_KEYPOINTS, 2), dtype=np.float32)
    residual = clip.residual if clip.residual is not None else np.full(n, np.nan)
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for event_type, eyes, s, e, flags in _spans(clip, cfg, fps):
        length = e - s
        pid = make_id("prototype", clip.clip_id, event_type, eyes, s, e)
        coverage = float(present[s:e].mean()) if length else 0.0
        reason = ("short" if length < cfg.min_frames else "low_face_coverage" if coverage < cfg.min_face_coverage
                  else "duplicate" if pid in seen else None)
        if reason is not None:
            rows.append({"prototype_id": pid, "event_type": event_type, "clip_id": clip.clip_id, "start_frame": s,
                         "end_frame": e, "T": length, "drop_reason": reason})
            continue
        seen.add(pid)
        flags = list(flags)
        if coverage < 1.0:
            flags.append("face_gaps")
        res = residual[s:e][present[s:e]]
        mean_res = float(np.nanmean(res)) if res.size and np.isfinite(res).any() else float("nan")
        if np.isfinite(mean_res) and mean_res > cfg.max_residual_error:
            flags.append("high_residual")
        if not kp_valid[s:e].any():
            flags.append("no_keypoints")
        ctrl = controls[s:e]
        mean, peak = channel_stats(ctrl)
        rows.append(
            {
                "prototype_id": pid,
                "label": clip.label,
                "event_type": event_type,
                "clip_id": clip.clip_id,
                "video_id": clip.video_id,
                "identity": clip.identity,
                "start_frame": s,
                "end_frame": e,
                "T": length,
                "controls": ctrl.astype(np.float32).tolist(),
                "keypoints": keypoints[s:e].reshape(length, N_KEYPOINTS * 2).astype(np.float32).tolist(),
                "channel_mean": mean.tolist(),
                "channel_max": peak.tolist(),
                "face_coverage": coverage,
                "mean_residual_error": mean_res,
                "quality_flags": sorted(set(flags)),
                "drop_reason": None,
            }
        )
    return rows


def kept_prototypes(candidates: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], Counter[str]]:
    """Split segment_clip's candidates into prototype rows and counts of the dropped ones by reason."""
    kept = [{k: v for k, v in r.items() if k != "drop_reason"} for r in candidates if r["drop_reason"] is None]
    return kept, Counter(r["drop_reason"] for r in candidates if r["drop_reason"] is not None)


assert N_CHANNELS == 17
