"""Synthetic upstream tables (clips, controls, events, frames) with the real schemas.

Why: the library, KTO mining and the benchmark must be testable before (and independently of) the
curate/extract/invert stages. Trajectories contain plausible events (blinks, brow raises, nods,
gaze shifts) with the channel conventions of DESIGN.md; nothing here claims to be real data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cogportrait.io.atomic import write_table
from cogportrait.schema import (
    CHANNEL_INDEX,
    CLIPS_SCHEMA,
    CONTROLS_SCHEMA,
    EVENTS_SCHEMA,
    FRAMES_SCHEMA,
    N_CHANNELS,
    N_KEYPOINTS,
    clip_id_for,
)

C = CHANNEL_INDEX
LABELS = ("drowsiness", "surprise", "cognitive effort", "talking")


def _bump(n: int, start: int, length: int, height: float) -> np.ndarray:
    """A smooth raised-cosine pulse of ``length`` frames."""
    out = np.zeros(n)
    t = np.arange(length)
    shape = 0.5 - 0.5 * np.cos(2 * np.pi * (t + 0.5) / length)
    end = min(n, start + length)
    out[start:end] = height * shape[: end - start]
    return out


def synth_clip(rng: np.random.Generator, n: int, label: str) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One (n, 17) control trajectory and its events."""
    c = np.zeros((n, N_CHANNELS))
    c[:, :10] = rng.uniform(0.0, 0.08, size=10) + rng.normal(0, 0.01, size=(n, 10))
    c[:, 10:14] = rng.uniform(0.0, 0.1, size=4) + rng.normal(0, 0.01, size=(n, 4))
    c[:, 14:17] = rng.normal(0, 3, size=3) + np.cumsum(rng.normal(0, 0.15, size=(n, 3)), axis=0)
    events: list[dict[str, Any]] = []
    t = int(rng.integers(5, 20))
    while t < n - 12:
        kind = rng.choice(["blink", "brow_raise", "head_nod", "saccade", "prolonged_closure"],
                          p=[0.45, 0.15, 0.15, 0.15, 0.1] if label != "drowsiness" else [0.3, 0.05, 0.25, 0.05, 0.35])
        if kind == "blink":
            L, h = int(rng.integers(3, 9)), float(rng.uniform(0.6, 0.95))
            c[:, C["AU45L"]] += _bump(n, t, L, h)
            c[:, C["AU45R"]] += _bump(n, t, L, h * rng.uniform(0.9, 1.0))
            events.append(dict(event_type="blink", start_frame=t, end_frame=t + L - 1, apex_frame=t + L // 2, eyes="both", peak=h, amplitude=h))
        elif kind == "prolonged_closure":
            L, h = int(rng.integers(12, 40)), float(rng.uniform(0.7, 0.95))
            L = min(L, n - t)
            for ch in ("AU45L", "AU45R"):
                c[:, C[ch]] += _bump(n, t, L, h)
            events.append(dict(event_type="prolonged_closure", start_frame=t, end_frame=t + L - 1, apex_frame=t + L // 2, eyes="both", peak=h, amplitude=h))
        elif kind == "brow_raise":
            L, h = int(rng.integers(10, 30)), float(rng.uniform(0.3, 0.8))
            L = min(L, n - t)
            for ch in ("AU1", "AU2L", "AU2R"):
                c[:, C[ch]] += _bump(n, t, L, h)
            events.append(dict(event_type="brow_raise", start_frame=t, end_frame=t + L - 1, apex_frame=t + L // 2, eyes="", peak=h, amplitude=h))
        elif kind == "head_nod":
            L, h = int(rng.integers(10, 25)), float(rng.uniform(-15, -5))
            L = min(L, n - t)
            c[:, C["pitch"]] += _bump(n, t, L, h)
            events.append(dict(event_type="head_nod", start_frame=t, end_frame=t + L - 1, apex_frame=t + L // 2, eyes="", peak=h, amplitude=abs(h)))
        else:
            L, h = int(rng.integers(3, 6)), float(rng.uniform(0.2, 0.6))
            ch = "gaze_left" if rng.random() < 0.5 else "gaze_right"
            c[t:, C[ch]] += h
            events.append(dict(event_type="saccade", start_frame=t, end_frame=t + L - 1, apex_frame=t + L // 2, eyes="", peak=h, amplitude=h))
        t += L + int(rng.integers(8, 40))
    c[:, :14] = np.clip(c[:, :14], 0.0, 1.0)
    return c.astype(np.float32), events


def base_keypoints() -> np.ndarray:
    """A fixed 62-point eye-region layout in the 512 crop, [0, 1] units (rough, for tests)."""
    rng = np.random.default_rng(1234)
    pts = np.empty((N_KEYPOINTS, 2))
    pts[:, 0] = rng.uniform(0.25, 0.75, N_KEYPOINTS)
    pts[:, 1] = rng.uniform(0.3, 0.45, N_KEYPOINTS)
    return pts


def write_synthetic_upstream(
    root: str | Path,
    n_clips: int = 12,
    n_frames: int = 150,
    n_identities: int = 6,
    seed: int = 0,
    drop_face_frames: int = 3,
) -> dict[str, Path]:
    """Write curate/clips.parquet and invert/{controls,events,frames}.parquet under ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    kp0 = base_keypoints()
    clips, controls, events, frames = [], [], [], []
    for i in range(n_clips):
        video_id = f"synth{i:03d}"
        cid = clip_id_for(video_id, 0, n_frames)
        label = LABELS[i % len(LABELS)]
        identity = f"person{i % n_identities}"
        ctrl, evs = synth_clip(rng, n_frames, label)
        present = np.ones(n_frames, dtype=bool)
        if drop_face_frames:
            gap = int(rng.integers(0, n_frames - drop_face_frames))
            present[gap : gap + drop_face_frames] = False
        clips.append(
            dict(clip_id=cid, video_id=video_id, clip_path=f"clips/{cid}.mp4", audio_path=f"audio/{cid}.wav",
                 has_audio=True, start_s=0.0, end_s=n_frames / 25, start_frame=0, end_frame=n_frames, fps=25.0,
                 n_frames=n_frames, label=label, identity=identity, mirrored=False, source="synthetic", license="CC0")
        )
        for f in range(n_frames):
            kp = kp0 + 0.01 * ctrl[f, 8] * np.array([0.0, 1.0]) + 0.001 * ctrl[f, 14]
            controls.append(dict(clip_id=cid, frame=f, face_present=bool(present[f]),
                                 controls=ctrl[f].tolist() if present[f] else None,
                                 residual_error=float(rng.uniform(0.01, 0.05)) if present[f] else None))
            kp3 = np.concatenate([kp, np.zeros((N_KEYPOINTS, 1))], axis=1).reshape(-1)
            frames.append(dict(clip_id=cid, frame=f, face_present=bool(present[f]),
                               keypoints=kp3.astype(np.float32).tolist() if present[f] else None,
                               head_pose=ctrl[f, 14:17].tolist() if present[f] else None))
        for ev in evs:
            events.append(dict(clip_id=cid, **ev))
    clips_path = root / "curate" / "clips.parquet"
    inv = root / "invert"
    write_table(clips_path, clips, CLIPS_SCHEMA)
    write_table(inv / "controls.parquet", controls, CONTROLS_SCHEMA)
    write_table(inv / "events.parquet", events, EVENTS_SCHEMA)
    write_table(inv / "frames.parquet", frames, FRAMES_SCHEMA)
    return {"clips": clips_path, "controls": inv}


def perturb_prototypes(
    source: pa.Table, n: int, seed: int = 0, frames: int = 8, keypoint_frames: int = 0
) -> pa.Table:
    """``n`` prototypes made by perturbing ``source`` rows (PROTOTYPES_SCHEMA), vectorised.

    Each new row takes a random source row's controls resampled to ``frames`` frames, adds a
    per-channel offset (AU/gaze sd 0.05, clipped to [0, 1]; head sd 3°) and per-frame noise, and
    recomputes mean and peak. Keypoints keep ``keypoint_frames`` frames (0 keeps the table small:
    index and query costs do not depend on them). Labels, event types and identities are inherited.
    """
    from cogportrait.schema import CONTROL_CHANNELS, HEAD_CHANNELS, PROTOTYPES_SCHEMA, make_id

    rng = np.random.default_rng(seed)
    m = source.num_rows
    src_ctrl = source.column("controls").to_pylist()
    base = np.empty((m, frames, N_CHANNELS), dtype=np.float32)
    for i, c in enumerate(src_ctrl):
        arr = np.asarray(c, dtype=np.float32)
        idx = np.linspace(0, len(arr) - 1, frames).round().astype(int)
        base[i] = arr[idx]
    pick = rng.integers(0, m, size=n)
    head = np.array([CHANNEL_INDEX[h] for h in HEAD_CHANNELS])
    sd = np.full(N_CHANNELS, 0.05, dtype=np.float32)
    sd[head] = 3.0
    ctrl = base[pick] + (rng.standard_normal((n, 1, N_CHANNELS)).astype(np.float32) * sd)
    ctrl += rng.standard_normal((n, frames, N_CHANNELS)).astype(np.float32) * (sd * 0.1)
    ctrl[:, :, :14] = np.clip(ctrl[:, :, :14], 0.0, 1.0)
    mean = ctrl.mean(axis=1)
    peak = ctrl.max(axis=1)
    h = ctrl[:, :, head]
    arg = np.abs(h).argmax(axis=1)
    peak[:, head] = np.take_along_axis(h, arg[:, None, :], axis=1)[:, 0, :]

    def nested(values: np.ndarray, inner: int, per_row: int) -> pa.Array:
        flat = pa.array(values.reshape(-1), type=pa.float32())
        innerarr = pa.FixedSizeListArray.from_arrays(flat, inner)
        offsets = pa.array(np.arange(n + 1, dtype=np.int32) * per_row)
        return pa.ListArray.from_arrays(offsets, innerarr)

    kp_src = source.column("keypoints").to_pylist()
    if keypoint_frames:
        kp = np.empty((m, keypoint_frames, N_KEYPOINTS * 2), dtype=np.float32)
        for i, k in enumerate(kp_src):
            arr = np.asarray(k, dtype=np.float32).reshape(-1, N_KEYPOINTS * 2)
            idx = np.linspace(0, len(arr) - 1, keypoint_frames).round().astype(int)
            kp[i] = arr[idx]
        kp_arr = nested(kp[pick], N_KEYPOINTS * 2, keypoint_frames)
    else:
        kp_arr = nested(np.zeros((n, 0, N_KEYPOINTS * 2), dtype=np.float32), N_KEYPOINTS * 2, 0)
    src_ids = np.asarray(source.column("prototype_id").to_pylist())
    ids = [make_id("perturbed", seed, i, src_ids[p]) for i, p in enumerate(pick)]

    def take(name: str) -> pa.Array:
        return source.column(name).combine_chunks().take(pa.array(pick))

    cols = {
        "prototype_id": pa.array(ids, type=pa.string()),
        "label": take("label"),
        "event_type": take("event_type"),
        "clip_id": take("clip_id"),
        "video_id": take("video_id"),
        "identity": take("identity"),
        "start_frame": pa.array(np.zeros(n, dtype=np.int32)),
        "end_frame": pa.array(np.full(n, frames, dtype=np.int32)),
        "T": pa.array(np.full(n, frames, dtype=np.int32)),
        "controls": nested(ctrl, N_CHANNELS, frames),
        "keypoints": kp_arr,
        "channel_mean": pa.FixedSizeListArray.from_arrays(pa.array(mean.reshape(-1)), N_CHANNELS),
        "channel_max": pa.FixedSizeListArray.from_arrays(pa.array(peak.reshape(-1)), N_CHANNELS),
        "face_coverage": pa.array(np.ones(n, dtype=np.float32)),
        "mean_residual_error": take("mean_residual_error"),
        "quality_flags": take("quality_flags"),
    }
    for stat, values in (("mean", mean), ("peak", peak)):
        for j, name in enumerate(CONTROL_CHANNELS):
            cols[f"{stat}_{name}"] = pa.array(values[:, j].astype(np.float32))
    return pa.table(cols).select(PROTOTYPES_SCHEMA.names).cast(PROTOTYPES_SCHEMA)
