"""One clip's face signals after pose normalisation: what the face model is fitted on and inverted from.

``prepare_frames`` turns a clip's extract rows into a ``FaceSignals`` (canonical keypoints, lid
geometry, proxies, head pose, nuisance blendshapes); the invert job carries these arrays between its Ray steps as typed
tensor columns (``to_row`` / ``from_row``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cogportrait.face.extract import list_column
from cogportrait.face.model import FIT_AU_INDEX, NUISANCE_TERMS
from cogportrait.face.pose import NORMALISE_INDICES, canonical_clip, lid_features
from cogportrait.face.proxies import BS, mirror_blendshapes, signed_gaze
from cogportrait.schema import AU_CHANNELS, N_BLENDSHAPES
from cogportrait.timeseries import running_median

LID_KEYS = (
    "aperture_left", "aperture_right", "lid_above_iris_left", "lid_above_iris_right", "iris_radius_left", "iris_radius_right",
)


@dataclass
class FaceSignals:
    """One clip's pose-normalised face signals, frame-aligned (the invert job's unit of work)."""

    clip_id: str
    identity: str
    frame: np.ndarray  # T
    present: np.ndarray  # T bool
    canon: np.ndarray  # T x 62 x 3 canonical keypoints (NaN where no face)
    lid: dict[str, np.ndarray]  # LID_KEYS -> T
    au: np.ndarray  # T x 10 proxies
    gaze: np.ndarray  # T x 2 signed proxies
    head_pose: np.ndarray  # T x 3 degrees
    iod_px: float
    nuisance: np.ndarray  # T x len(NUISANCE_TERMS) blendshapes, subject's own left/right

    def lid_matrix(self) -> np.ndarray:
        return np.stack([self.lid[k] for k in LID_KEYS], axis=1) if len(self.frame) else np.zeros((0, len(LID_KEYS)))

    def to_row(self) -> dict[str, Any]:
        """Typed columns for a Ray row: one numpy array per field (lid as a T x 6 matrix)."""
        row: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        row["lid"] = self.lid_matrix()
        row["canon"] = self.canon.astype(np.float32)
        return row

    @staticmethod
    def from_row(row: dict[str, Any]) -> FaceSignals:
        lid = np.asarray(row["lid"], dtype=np.float64).reshape(-1, len(LID_KEYS))
        return FaceSignals(
            clip_id=row["clip_id"], identity=row["identity"], frame=np.asarray(row["frame"], dtype=np.int64),
            present=np.asarray(row["present"], dtype=bool), canon=np.asarray(row["canon"], dtype=np.float64),
            lid={k: lid[:, i] for i, k in enumerate(LID_KEYS)}, au=np.asarray(row["au"], dtype=np.float64),
            gaze=np.asarray(row["gaze"], dtype=np.float64), head_pose=np.asarray(row["head_pose"], dtype=np.float64),
            iod_px=float(row["iod_px"]),
            nuisance=np.asarray(row["nuisance"], dtype=np.float64).reshape(-1, len(NUISANCE_TERMS)),
        )


def select_normalise_points(landmarks_flat: np.ndarray) -> np.ndarray:
    """T x 1434 landmarks -> T x (62 + anchors) x 3: only what pose normalisation needs."""
    return landmarks_flat.reshape(-1, 478, 3)[:, list(NORMALISE_INDICES), :]


def nuisance_blendshapes(blendshapes: np.ndarray, mirrored: bool) -> np.ndarray:
    """T x 52 blendshapes as MediaPipe reported them -> T x len(NUISANCE_TERMS), subject's own left/right.

    extract stores blendshapes unmirrored (only its proxies follow the subject), so a mirrored
    clip's Left/Right pairs are swapped here, as the keypoints are by ``canonical_clip``.
    """
    bs = np.asarray(blendshapes, dtype=np.float64)
    if mirrored:
        bs = mirror_blendshapes(bs)
    return bs[:, [BS[name] for name in NUISANCE_TERMS]]


def prepare_clip(table: pa.Table, identity: str, mirrored: bool, refine: str, smooth_frames: int = 1) -> FaceSignals:
    """One clip's frames (sorted by frame) -> pose-normalised signals.

    ``table`` holds clip_id, frame, face_present, points (T x 78·3 selected landmarks), transform,
    au, gaze, head_pose, blendshapes, width, height. ``smooth_frames`` > 1: the canonical keypoints and the
    proxies both pass the same running median (``denoise``) before anything is measured on them.
    """
    table = table.sort_by("frame")
    t = table.num_rows
    clip_id = table.column("clip_id")[0].as_py()
    present = np.asarray(table.column("face_present").to_numpy(zero_copy_only=False), dtype=bool)
    pts = list_column(table, "points", len(NORMALISE_INDICES) * 3).reshape(t, -1, 3)
    tr = list_column(table, "transform", 16)
    au = list_column(table, "au", 10).astype(np.float64)
    gz4 = list_column(table, "gaze", 4).astype(np.float64)
    pose = list_column(table, "head_pose", 3).astype(np.float64)
    nuisance = nuisance_blendshapes(list_column(table, "blendshapes", N_BLENDSHAPES), mirrored)
    width = int(table.column("width")[0].as_py())
    height = int(table.column("height")[0].as_py())
    present = present & np.all(np.isfinite(pts.reshape(t, -1)), axis=1) & np.all(np.isfinite(tr), axis=1)
    canon, _, iod = canonical_clip(pts, tr, width, height, present, mirrored=mirrored, refine=refine)
    raw = FaceSignals(
        clip_id=clip_id,
        identity=identity,
        frame=table.column("frame").to_numpy().astype(np.int64),
        present=present,
        canon=canon,
        lid=lid_features(canon),
        au=au,
        gaze=signed_gaze(gz4),
        head_pose=pose,
        iod_px=iod,
        nuisance=nuisance,
    )
    return smoothed(raw, smooth_frames)


def smoothed(raw: FaceSignals, frames: int) -> FaceSignals:
    """Unfiltered signals (``prepare_clip`` with ``smooth_frames=1``) through ``denoise`` over
    ``frames`` frames: one pose normalisation can serve several filters (the fit's and the inversion's)."""
    if frames <= 1:
        return raw
    canon, au, gaze, nuisance = denoise(raw.canon, raw.au, raw.gaze, raw.nuisance, raw.present, frames)
    return replace(raw, canon=canon, lid=lid_features(canon), au=au, gaze=gaze, nuisance=nuisance)


def denoise(
    canon: np.ndarray, au: np.ndarray, gaze: np.ndarray, nuisance: np.ndarray, present: np.ndarray, frames: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The same running median over ``frames`` frames on the keypoints, the proxies and the nuisance blendshapes.

    MediaPipe's landmarks and blendshapes jitter from frame to frame; filtering both sides of the
    fit alike keeps them aligned in time (a filter on one side only would shift its edges against
    the other's). The median keeps blinks (3-8 frames at 25 fps) at full depth.
    """
    if frames <= 1:
        return canon, au, gaze, nuisance
    t = len(canon)
    ok = present & np.all(np.isfinite(canon.reshape(t, -1)), axis=1)
    au = au.copy()
    au[:, list(FIT_AU_INDEX)] = running_median(au[:, list(FIT_AU_INDEX)], frames, ok & np.all(np.isfinite(au[:, list(FIT_AU_INDEX)]), axis=1))
    gaze = running_median(gaze, frames, ok & np.all(np.isfinite(gaze), axis=1))
    nuisance = running_median(nuisance, frames, ok & np.all(np.isfinite(nuisance), axis=1))
    return running_median(canon, frames, ok), au, gaze, nuisance


def prepare_frames(table: pa.Table, identity: str, mirrored: bool, refine: str, smooth_frames: int = 1) -> FaceSignals:
    """prepare_clip on FRAMES_SCHEMA rows: keeps only the landmarks pose normalisation needs."""
    lm = list_column(table, "landmarks", 478 * 3)
    pts = select_normalise_points(lm).reshape(table.num_rows, -1).astype(np.float32)
    present = table.column("face_present").combine_chunks()
    points = pa.FixedSizeListArray.from_arrays(pa.array(pts.ravel()), pts.shape[1], mask=pc.invert(present))
    return prepare_clip(table.drop_columns(["landmarks"]).append_column("points", points), identity, mirrored, refine, smooth_frames)


# channels compared with their proxies (AU41 has none)
PROXY_COMPARED: tuple[str, ...] = tuple(c for c in AU_CHANNELS if c != "AU41") + ("gaze_horizontal", "gaze_vertical")


def proxy_matrix(sig: FaceSignals) -> np.ndarray:
    """T x len(PROXY_COMPARED): the proxies the inverted channels are compared with."""
    return np.concatenate([sig.au[:, list(FIT_AU_INDEX)], sig.gaze], axis=1)
