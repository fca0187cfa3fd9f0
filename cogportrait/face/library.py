"""Clip-level steps of the inversion job, as plain functions over numpy arrays.

pipelines/invert.py strings these together with Ray; everything numeric lives here so it can be
tested without Ray. A clip travels between steps as a ``ClipSignals`` (one clip's frames).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cogportrait.face.extract import list_column
from cogportrait.face.inversion import InversionSettings, invert_clip
from cogportrait.face.model import (
    FIT_AU_INDEX,
    FIT_AUS,
    N_DIMS,
    N_REG,
    Baseline,
    ClipMoments,
    ClipStats,
    LinearFaceModel,
    estimate_baseline,
    group_dims,
    raw_features,
    regressors,
    rest_mask,
    ridge_solve,
    sse,
)
from cogportrait.face.pose import NORMALISE_INDICES, canonical_clip, lid_features
from cogportrait.face.proxies import signed_gaze
from cogportrait.schema import AU_CHANNELS, CHANNEL_INDEX, KEYPOINT_GROUPS, N_CHANNELS

LID_KEYS = (
    "aperture_left", "aperture_right", "lid_above_iris_left", "lid_above_iris_right", "iris_radius_left", "iris_radius_right",
)


@dataclass
class ClipSignals:
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

    def lid_matrix(self) -> np.ndarray:
        return np.stack([self.lid[k] for k in LID_KEYS], axis=1) if len(self.frame) else np.zeros((0, len(LID_KEYS)))


def select_normalise_points(landmarks_flat: np.ndarray) -> np.ndarray:
    """T x 1434 landmarks -> T x (62 + anchors) x 3: only what pose normalisation needs."""
    return landmarks_flat.reshape(-1, 478, 3)[:, list(NORMALISE_INDICES), :]


def prepare_clip(table: pa.Table, identity: str, mirrored: bool, refine: str = "similarity") -> ClipSignals:
    """One clip's frames (sorted by frame) -> pose-normalised signals.

    ``table`` holds clip_id, frame, face_present, points (T x 78·3 selected landmarks), transform,
    au, gaze, head_pose, width, height.
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
    width = int(table.column("width")[0].as_py())
    height = int(table.column("height")[0].as_py())
    present = present & np.all(np.isfinite(pts.reshape(t, -1)), axis=1) & np.all(np.isfinite(tr), axis=1)
    canon, _, iod = canonical_clip(pts, tr, width, height, present, mirrored=mirrored, refine=refine)
    return ClipSignals(
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
    )


def prepare_frames(table: pa.Table, identity: str, mirrored: bool, refine: str = "similarity") -> ClipSignals:
    """prepare_clip on FRAMES_SCHEMA rows: keeps only the landmarks pose normalisation needs."""
    lm = list_column(table, "landmarks", 478 * 3)
    pts = select_normalise_points(lm).reshape(table.num_rows, -1).astype(np.float32)
    present = table.column("face_present").combine_chunks()
    points = pa.FixedSizeListArray.from_arrays(pa.array(pts.ravel()), pts.shape[1], mask=pc.invert(present))
    return prepare_clip(table.drop_columns(["landmarks"]).append_column("points", points), identity, mirrored, refine)


@dataclass(frozen=True)
class RestSettings:
    quantile: float = 0.6
    max_angle_deg: float = 20.0
    min_frames: int = 5
    max_frames_per_clip: int = 200


def rest_frames(sig: ClipSignals, settings: RestSettings = RestSettings()) -> np.ndarray:
    """Indices of the clip's rest frames (at most ``max_frames_per_clip``, evenly spread)."""
    mask = rest_mask(sig.au, sig.gaze, sig.head_pose, sig.present, settings.quantile, settings.max_angle_deg, settings.min_frames)
    idx = np.flatnonzero(mask)
    if len(idx) > settings.max_frames_per_clip:
        idx = idx[np.linspace(0, len(idx) - 1, settings.max_frames_per_clip).astype(int)]
    return idx


@dataclass
class RestData:
    """An identity's rest frames: its baseline is estimated, and re-estimated under a basis, from these."""

    canon: np.ndarray  # K x 62 x 3
    au: np.ndarray  # K x 10
    gaze: np.ndarray  # K x 2
    head_pose: np.ndarray  # K x 3
    lid: np.ndarray  # K x len(LID_KEYS)

    FIELDS = ("canon", "au", "gaze", "head_pose", "lid")

    @staticmethod
    def of(sig: ClipSignals, idx: np.ndarray) -> RestData:
        return RestData(sig.canon[idx], sig.au[idx], sig.gaze[idx], sig.head_pose[idx], sig.lid_matrix()[idx])

    @staticmethod
    def concat(parts: list[RestData]) -> RestData:
        return RestData(*(np.concatenate([getattr(p, f) for p in parts]) for f in RestData.FIELDS))

    def arrays(self) -> dict[str, np.ndarray]:
        return {f: getattr(self, f) for f in self.FIELDS}


def baseline_from_rest(identity: str, rest: RestData) -> Baseline:
    """The identity's baseline: robust (median) statistics of its pooled rest frames."""
    lid = {k: rest.lid[:, i] for i, k in enumerate(LID_KEYS)}
    return estimate_baseline(identity, rest.canon, rest.au, rest.gaze, lid, np.ones(len(rest.canon), dtype=bool), rest.head_pose)


def refine_baseline(baseline: Baseline, rest: RestData, basis: np.ndarray) -> Baseline:
    """Move b so that the model has no offset at rest: b += median over rest frames of (d − X B).

    The median rest keypoints carry the little expression left in "rest" frames; under the basis
    that expression is known, so removing it makes b and the proxies' rest values agree.
    """
    x = regressors(rest.au, rest.gaze, rest.head_pose, baseline)
    d = rest.canon.reshape(len(x), N_DIMS) - baseline.keypoints.reshape(N_DIMS)
    ok = np.all(np.isfinite(x), axis=1) & np.all(np.isfinite(d), axis=1)
    if not ok.any():
        return baseline
    delta = np.median(d[ok] - x[ok] @ basis, axis=0)
    return replace(baseline, keypoints=baseline.keypoints + delta.reshape(baseline.keypoints.shape))


def clip_moments(sig: ClipSignals) -> ClipMoments:
    """Baseline-free moments of the clip's usable frames (face present, proxies finite)."""
    t = len(sig.frame)
    z = raw_features(sig.au, sig.gaze, sig.head_pose)
    k = sig.canon.reshape(t, N_DIMS)
    ok = sig.present & np.all(np.isfinite(z), axis=1) & np.all(np.isfinite(k), axis=1)
    return ClipMoments.of(z[ok], k[ok])


GROUP_DIMS: dict[str, np.ndarray] = {g: group_dims(g) for g in KEYPOINT_GROUPS}
GROUP_DIMS["iris"] = np.concatenate([GROUP_DIMS["left_iris"], GROUP_DIMS["right_iris"]])
GROUP_DIMS["eyes"] = np.concatenate([GROUP_DIMS["left_eye"], GROUP_DIMS["right_eye"]])
GROUP_DIMS["brows"] = np.concatenate([GROUP_DIMS["left_brow"], GROUP_DIMS["right_brow"]])
GROUP_DIMS["overall"] = np.arange(N_DIMS)


def r2_by_group(stats_by_clip: dict[str, ClipStats], bases: dict[str, np.ndarray], planar: bool = False) -> dict[str, float]:
    """Pooled R² per keypoint group of each clip's data under the basis given for that clip.

    ``planar`` scores the x, y coordinates only (what Stage 2 renders); else x, y, z.
    """
    total = ClipStats.zero()
    for s in stats_by_clip.values():
        total = total + s
    if total.n == 0:
        return {g: float("nan") for g in GROUP_DIMS}
    mean = total.dsum / total.n
    sst = total.dsq - total.n * mean**2
    err = np.zeros(N_DIMS)
    for cid, s in stats_by_clip.items():
        if s.n:
            err += sse(s, bases[cid])
    out = {}
    for g, dims in GROUP_DIMS.items():
        if planar:
            dims = dims[dims % 3 != 2]
        out[g] = float(1.0 - err[dims].sum() / sst[dims].sum())
    return out


def loco_bases(stats_by_clip: dict[str, ClipStats], ridge: float) -> dict[str, np.ndarray]:
    """The basis fitted without each clip (needs at least two clips with frames)."""
    total = ClipStats.zero()
    for s in stats_by_clip.values():
        total = total + s
    out = {}
    for cid, s in stats_by_clip.items():
        rest = total - s
        out[cid] = ridge_solve(rest, ridge) if rest.n >= N_REG else np.full((N_REG, N_DIMS), np.nan)
    return out


def invert_signals(
    sig: ClipSignals, model: LinearFaceModel, baseline: Baseline, settings: InversionSettings = InversionSettings()
) -> tuple[np.ndarray, np.ndarray]:
    """Controls T x 17 and residual error T for one clip."""
    return invert_clip(
        sig.canon,
        sig.head_pose,
        np.stack([sig.lid["lid_above_iris_left"], sig.lid["lid_above_iris_right"]], axis=1),
        model,
        baseline,
        settings,
    )


# channels compared with their proxies (AU41 has none)
PROXY_COMPARED: tuple[str, ...] = tuple(c for c in AU_CHANNELS if c != "AU41") + ("gaze_horizontal", "gaze_vertical")


def proxy_matrix(sig: ClipSignals) -> np.ndarray:
    """T x len(PROXY_COMPARED): the proxies the inverted channels are compared with."""
    return np.concatenate([sig.au[:, list(FIT_AU_INDEX)], sig.gaze], axis=1)


def inverted_matrix(controls: np.ndarray) -> np.ndarray:
    """The inverted counterparts of proxy_matrix columns."""
    c = controls
    h = c[:, CHANNEL_INDEX["gaze_left"]] - c[:, CHANNEL_INDEX["gaze_right"]]
    v = c[:, CHANNEL_INDEX["gaze_up"]] - c[:, CHANNEL_INDEX["gaze_down"]]
    return np.concatenate([c[:, list(FIT_AU_INDEX)], h[:, None], v[:, None]], axis=1)


assert N_CHANNELS == 17 and len(FIT_AUS) == 9


def pack_arrays(arrays: dict[str, np.ndarray]) -> bytes:
    """Arrays -> npz bytes (no pickle), to carry one clip's arrays in one Arrow binary cell."""
    import io

    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def unpack_arrays(blob: bytes) -> dict[str, np.ndarray]:
    import io

    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def pack_signals(sig: ClipSignals) -> bytes:
    return pack_arrays(
        {
            "frame": sig.frame, "present": sig.present, "canon": sig.canon.astype(np.float32), "lid": sig.lid_matrix(),
            "au": sig.au, "gaze": sig.gaze, "head_pose": sig.head_pose, "iod_px": np.array(sig.iod_px),
        }
    )


def unpack_signals(clip_id: str, identity: str, blob: bytes) -> ClipSignals:
    a = unpack_arrays(blob)
    return ClipSignals(
        clip_id=clip_id, identity=identity, frame=a["frame"], present=a["present"].astype(bool),
        canon=a["canon"].astype(np.float64), lid={k: a["lid"][:, i] for i, k in enumerate(LID_KEYS)},
        au=a["au"], gaze=a["gaze"], head_pose=a["head_pose"], iod_px=float(a["iod_px"]),
    )


@dataclass
class CorrSums:
    """Running sums for a pooled Pearson correlation per channel (mergeable across clips)."""

    n: np.ndarray
    sx: np.ndarray
    sy: np.ndarray
    sxx: np.ndarray
    syy: np.ndarray
    sxy: np.ndarray

    @staticmethod
    def of(x: np.ndarray, y: np.ndarray) -> CorrSums:
        ok = np.isfinite(x) & np.isfinite(y)
        x, y = np.where(ok, x, 0.0), np.where(ok, y, 0.0)
        return CorrSums(ok.sum(0).astype(float), x.sum(0), y.sum(0), (x * x).sum(0), (y * y).sum(0), (x * y).sum(0))

    def __add__(self, o: CorrSums) -> CorrSums:
        return CorrSums(*(getattr(self, f) + getattr(o, f) for f in ("n", "sx", "sy", "sxx", "syy", "sxy")))

    def as_array(self) -> np.ndarray:
        return np.stack([self.n, self.sx, self.sy, self.sxx, self.syy, self.sxy])

    @staticmethod
    def from_array(a: np.ndarray) -> CorrSums:
        return CorrSums(*a)

    def r(self) -> np.ndarray:
        n = np.maximum(self.n, 1)
        cov = self.sxy / n - self.sx * self.sy / n**2
        vx = self.sxx / n - (self.sx / n) ** 2
        vy = self.syy / n - (self.sy / n) ** 2
        with np.errstate(invalid="ignore", divide="ignore"):
            r = cov / np.sqrt(vx * vy)
        return np.where((vx > 1e-12) & (vy > 1e-12) & (self.n >= 3), r, np.nan)
