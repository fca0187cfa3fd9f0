"""The linear face model fitted from data, and identity-specific neutral baselines.

d_t = k̃_t − b = B_a (a_t − a_b) + B_g (g_t − g_b) + B_r (sin r_t − sin r_b)   (DESIGN.md, paper §3.2)

k̃_t are pose-normalised keypoints (62×3, IOD units, y up), b an identity's rest keypoints,
a_t the AU proxies the basis can see per frame (AU41 is temporal, see inversion.py), g_t the
signed gaze (horizontal + toward the subject's left, vertical + up), r_t the head pose from the
matrix: rotating MediaPipe's mesh back by Rᵀ leaves pose-dependent shape changes in the eye
region (perspective, mesh fitting), which B_r absorbs (the paper recovers [a_t, r_t] from the
residuals too); pose is known, so the inversion only subtracts that part. The fit is ridge least
squares over the whole dataset from per-clip sufficient statistics, so leave-one-clip-out
(LOCO) fits and their R² come for free.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cogportrait.config import RestSettings
from cogportrait.io.atomic import atomic_path, write_json
from cogportrait.schema import AU_CHANNELS, KEYPOINT_GROUPS, KEYPOINT_INDICES, N_KEYPOINTS, keypoint_slice

log = logging.getLogger("cogportrait.face.model")

MODEL_VERSION = 1
# AU channels the per-frame basis models; AU41 moves the same lid points as AU45 and is
# separated over time afterwards.
FIT_AUS: tuple[str, ...] = tuple(c for c in AU_CHANNELS if c != "AU41")
FIT_AU_INDEX: tuple[int, ...] = tuple(AU_CHANNELS.index(c) for c in FIT_AUS)
GAZE_TERMS: tuple[str, ...] = ("gaze_horizontal", "gaze_vertical")
POSE_TERMS: tuple[str, ...] = ("sin_yaw", "sin_pitch", "sin_roll")  # minus their rest values
REGRESSORS: tuple[str, ...] = FIT_AUS + GAZE_TERMS + POSE_TERMS
N_REG = len(REGRESSORS)
N_DIMS = N_KEYPOINTS * 3


def group_dims(group: str) -> np.ndarray:
    """Flat (62×3) positions of one keypoint group's coordinates."""
    s = keypoint_slice(group)
    return np.arange(s.start * 3, s.stop * 3)


IRIS_DIMS = np.concatenate([group_dims("left_iris"), group_dims("right_iris")])
NON_IRIS_DIMS = np.setdiff1d(np.arange(N_DIMS), IRIS_DIMS)


@dataclass
class Baseline:
    """An identity's neutral rest state: keypoints b, proxy rest values, lid geometry."""

    identity: str
    keypoints: np.ndarray  # 62 x 3 canonical (IOD units)
    au: np.ndarray  # 10 AU proxies at rest (AU41 = 0)
    gaze: np.ndarray  # 2 signed gaze at rest
    lid_above_iris: np.ndarray  # 2 (left, right): c0, rest (upper lid − iris centre)/iris radius
    iris_radius: np.ndarray  # 2, canonical units
    head_pose: np.ndarray = field(default_factory=lambda: np.zeros(3))  # rest yaw, pitch, roll (deg)
    n_rest_frames: int = 0


@dataclass
class ClipStats:
    """Sufficient statistics of one clip for the ridge fit and LOCO R²."""

    n: int
    xtx: np.ndarray  # R x R
    xtd: np.ndarray  # R x D
    dsum: np.ndarray  # D
    dsq: np.ndarray  # D
    xsum: np.ndarray  # R

    @staticmethod
    def of(x: np.ndarray, d: np.ndarray) -> ClipStats:
        return ClipStats(len(x), x.T @ x, x.T @ d, d.sum(axis=0), (d * d).sum(axis=0), x.sum(axis=0))

    def __add__(self, other: ClipStats) -> ClipStats:
        return ClipStats(*(getattr(self, f) + getattr(other, f) for f in STAT_FIELDS))

    def __sub__(self, other: ClipStats) -> ClipStats:
        return ClipStats(*(getattr(self, f) - getattr(other, f) for f in STAT_FIELDS))

    def shifted(self, delta: np.ndarray) -> ClipStats:
        """The same frames with the baseline moved by ``delta`` (D): d' = d − delta."""
        delta = np.asarray(delta, dtype=np.float64).reshape(N_DIMS)
        return ClipStats(
            self.n, self.xtx, self.xtd - np.outer(self.xsum, delta), self.dsum - self.n * delta,
            self.dsq - 2 * delta * self.dsum + self.n * delta**2, self.xsum,
        )

    @staticmethod
    def zero() -> ClipStats:
        return ClipStats(0, np.zeros((N_REG, N_REG)), np.zeros((N_REG, N_DIMS)), np.zeros(N_DIMS), np.zeros(N_DIMS), np.zeros(N_REG))


STAT_FIELDS = ("n", "xtx", "xtd", "dsum", "dsq", "xsum")


def pose_terms(head_pose: np.ndarray, baseline: Baseline) -> np.ndarray:
    """T x 3: sin of each head angle minus sin of the identity's rest angle."""
    return np.sin(np.radians(np.asarray(head_pose, dtype=np.float64))) - np.sin(np.radians(baseline.head_pose))


def raw_features(au: np.ndarray, gaze_signed: np.ndarray, head_pose: np.ndarray) -> np.ndarray:
    """T x R features before the rest values are subtracted (regressors = raw − rest)."""
    return np.concatenate([au[:, list(FIT_AU_INDEX)], gaze_signed, np.sin(np.radians(head_pose))], axis=1)


def rest_features(baseline: Baseline) -> np.ndarray:
    """R rest values of raw_features for an identity."""
    return np.concatenate([baseline.au[list(FIT_AU_INDEX)], baseline.gaze, np.sin(np.radians(baseline.head_pose))])


def regressors(au: np.ndarray, gaze_signed: np.ndarray, head_pose: np.ndarray, baseline: Baseline) -> np.ndarray:
    """T x R design matrix: AU proxies, signed gaze and pose terms minus the identity's rest values."""
    return raw_features(au, gaze_signed, head_pose) - rest_features(baseline)


@dataclass
class ClipMoments:
    """Raw second moments of a clip's features z and canonical keypoints k (no baseline needed).

    The driver turns them into ClipStats for any baseline, so one pass over the frames serves
    baseline estimation, fitting and leave-one-clip-out evaluation.
    """

    n: int
    zz: np.ndarray  # R x R
    zk: np.ndarray  # R x D
    z: np.ndarray  # R
    k: np.ndarray  # D
    kk: np.ndarray  # D

    @staticmethod
    def of(z: np.ndarray, k: np.ndarray) -> ClipMoments:
        return ClipMoments(len(z), z.T @ z, z.T @ k, z.sum(axis=0), k.sum(axis=0), (k * k).sum(axis=0))

    def stats(self, baseline: Baseline) -> ClipStats:
        o = rest_features(baseline)
        b = baseline.keypoints.reshape(N_DIMS)
        n = self.n
        xtx = self.zz - np.outer(self.z, o) - np.outer(o, self.z) + n * np.outer(o, o)
        xtd = self.zk - np.outer(self.z, b) - np.outer(o, self.k) + n * np.outer(o, b)
        return ClipStats(n, xtx, xtd, self.k - n * b, self.kk - 2 * b * self.k + n * b * b, self.z - n * o)


MOMENT_FIELDS = ("n", "zz", "zk", "z", "k", "kk")


def ridge_solve(stats: ClipStats, ridge: float) -> np.ndarray:
    """B (R x D) = (XᵀX + λ n I)⁻¹ XᵀD; λ is per frame so it means the same at any dataset size."""
    lam = ridge * max(stats.n, 1)
    return np.linalg.solve(stats.xtx + lam * np.eye(N_REG), stats.xtd)


def sse(stats: ClipStats, basis: np.ndarray) -> np.ndarray:
    """Per-dimension sum of squared residuals of D − X B from the statistics alone."""
    cross = np.einsum("rd,rd->d", basis, stats.xtd)
    quad = np.einsum("rd,rs,sd->d", basis, stats.xtx, basis)
    return stats.dsq - 2 * cross + quad


@dataclass
class LinearFaceModel:
    """Basis B (regressors x 186) in canonical keypoint space, plus how it was made."""

    basis: np.ndarray
    ridge: float
    version: int = MODEL_VERSION
    meta: dict = field(default_factory=dict)

    @property
    def basis_au(self) -> np.ndarray:
        return self.basis[: len(FIT_AUS)]

    @property
    def basis_gaze(self) -> np.ndarray:
        return self.basis[len(FIT_AUS) : len(FIT_AUS) + len(GAZE_TERMS)]

    @property
    def basis_pose(self) -> np.ndarray:
        return self.basis[len(FIT_AUS) + len(GAZE_TERMS) :]

    @staticmethod
    def fit(stats: ClipStats, ridge: float, meta: dict | None = None) -> LinearFaceModel:
        if stats.n < N_REG:
            raise ValueError(f"cannot fit the face model from {stats.n} frames (need at least {N_REG})")
        return LinearFaceModel(ridge_solve(stats, ridge), ridge, meta=dict(meta or {}))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return x @ self.basis

    def save(self, folder: str | Path, baselines: dict[str, Baseline] | None = None) -> None:
        """model.npz (arrays) + model.json (layout, version, provenance); baselines.npz beside."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "model.npz", ".npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, basis=self.basis.astype(np.float64))
        write_json(
            folder / "model.json",
            {
                "version": self.version,
                "kind": "linear",
                "regressors": list(REGRESSORS),
                "keypoint_indices": list(KEYPOINT_INDICES),
                "keypoint_groups": {k: list(v) for k, v in KEYPOINT_GROUPS.items()},
                "coordinates": "canonical: pose removed (R^T), centred on rigid anchors, IOD units, x right, y up, z toward viewer",
                "ridge": self.ridge,
                "meta": self.meta,
            },
        )
        if baselines is not None:
            save_baselines(folder / "baselines.npz", baselines)

    @staticmethod
    def load(folder: str | Path) -> LinearFaceModel:
        folder = Path(folder)
        info = json.loads((folder / "model.json").read_text())
        if info.get("version") != MODEL_VERSION:
            raise ValueError(f"face model version {info.get('version')} in {folder}; this code reads {MODEL_VERSION}")
        if tuple(info["regressors"]) != REGRESSORS or tuple(info["keypoint_indices"]) != KEYPOINT_INDICES:
            raise ValueError(f"face model in {folder} has a different layout (regressors or keypoints)")
        with np.load(folder / "model.npz", allow_pickle=False) as z:
            basis = z["basis"]
        return LinearFaceModel(basis, float(info["ridge"]), int(info["version"]), info.get("meta", {}))


def save_baselines(path: str | Path, baselines: dict[str, Baseline]) -> None:
    ids = sorted(baselines)
    arrays = {
        "identity": np.array(ids, dtype=str),
        "keypoints": np.stack([baselines[i].keypoints for i in ids]) if ids else np.zeros((0, 62, 3)),
        "au": np.stack([baselines[i].au for i in ids]) if ids else np.zeros((0, 10)),
        "gaze": np.stack([baselines[i].gaze for i in ids]) if ids else np.zeros((0, 2)),
        "lid_above_iris": np.stack([baselines[i].lid_above_iris for i in ids]) if ids else np.zeros((0, 2)),
        "iris_radius": np.stack([baselines[i].iris_radius for i in ids]) if ids else np.zeros((0, 2)),
        "head_pose": np.stack([baselines[i].head_pose for i in ids]) if ids else np.zeros((0, 3)),
        "n_rest_frames": np.array([baselines[i].n_rest_frames for i in ids], dtype=np.int64),
    }
    with atomic_path(path, ".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def load_baselines(path: str | Path) -> dict[str, Baseline]:
    with np.load(path, allow_pickle=False) as z:
        return {
            str(ident): Baseline(
                str(ident), z["keypoints"][i], z["au"][i], z["gaze"][i], z["lid_above_iris"][i], z["iris_radius"][i],
                z["head_pose"][i], int(z["n_rest_frames"][i]),
            )
            for i, ident in enumerate(z["identity"])
        }


def rest_mask(
    au: np.ndarray,
    gaze_signed: np.ndarray,
    head_pose: np.ndarray,
    present: np.ndarray,
    settings: RestSettings,
) -> np.ndarray:
    """Frames at rest: low AU/gaze activity relative to the clip's own medians, near-frontal.

    Activity is the sum over channels of |x − median| / (MAD + 0.02); the lowest ``quantile``
    of present, near-frontal frames are rest. Falls back to all present frames when too few.
    """
    quantile, max_angle_deg, min_frames = settings.quantile, settings.max_angle_deg, settings.min_frames
    t = len(present)
    sig = np.concatenate([au[:, list(FIT_AU_INDEX)], gaze_signed], axis=1)
    ok = present & np.all(np.isfinite(sig), axis=1)
    if ok.sum() == 0:
        return np.zeros(t, dtype=bool)
    med = np.median(sig[ok], axis=0)
    mad = np.median(np.abs(sig[ok] - med), axis=0)
    score = np.full(t, np.inf)
    score[ok] = (np.abs(sig[ok] - med) / (mad + 0.02)).sum(axis=1)
    frontal = ok & np.all(np.abs(head_pose[:, :2]) <= max_angle_deg, axis=1)
    cand = frontal if frontal.sum() >= min_frames else ok
    cut = np.quantile(score[cand], quantile)
    mask = cand & (score <= cut)
    if mask.sum() < min(min_frames, cand.sum()):
        mask = cand
    return mask


def estimate_baseline(
    identity: str,
    canon: np.ndarray,
    au: np.ndarray,
    gaze_signed: np.ndarray,
    lid: dict[str, np.ndarray],
    rest: np.ndarray,
    head_pose: np.ndarray | None = None,
) -> Baseline:
    """Robust (median) rest state from the rest frames of all of an identity's clips."""
    if rest.sum() == 0:
        raise ValueError(f"identity {identity!r} has no rest frame")
    au_b = np.median(au[rest], axis=0)
    au_b[AU_CHANNELS.index("AU41")] = 0.0
    return Baseline(
        identity=identity,
        keypoints=np.median(canon[rest], axis=0),
        au=au_b,
        gaze=np.median(gaze_signed[rest], axis=0),
        lid_above_iris=np.array([np.median(lid["lid_above_iris_left"][rest]), np.median(lid["lid_above_iris_right"][rest])]),
        iris_radius=np.array([np.median(lid["iris_radius_left"][rest]), np.median(lid["iris_radius_right"][rest])]),
        head_pose=np.median(head_pose[rest], axis=0) if head_pose is not None else np.zeros(3),
        n_rest_frames=int(rest.sum()),
    )
