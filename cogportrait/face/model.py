"""The linear face model fitted from data, and identity-specific neutral baselines.

d_t = k̃_t − b = B_a (a_t − a_b) + B_g (g_t − g_b) + B_r (sin r_t − sin r_b) + B_n (n_t − n_b)   (DESIGN.md, paper §3.2)

k̃_t are pose-normalised keypoints (62×3, IOD units, y up), b an identity's rest keypoints,
a_t the AU proxies the basis can see per frame (AU41 is temporal, see inversion.py), g_t the
signed gaze (horizontal + toward the subject's left, vertical + up), r_t the head pose from the
matrix: rotating MediaPipe's mesh back by Rᵀ leaves pose-dependent shape changes in the eye
region (perspective, mesh fitting), which B_r absorbs (the paper recovers [a_t, r_t] from the
residuals too); pose is known, so the inversion only subtracts that part. n_t are nuisance
blendshapes of the lower face (smiling, the upper lip raised): a smile's cheek raise pushes the
lower lids up and narrows the eyes, which a basis without them blames on AU4/AU7 of people who
smile a lot. They are known per frame from MediaPipe too, so, like pose, they are fitted in the
basis and only subtracted in the inversion, never solved for. Each keypoint group is fitted
only on the regressors that can move it (``group_regressors``: a one-sided control moves its own
side, the brows ignore gaze, AU5 and the mouth). The fit is ridge least
squares over the whole dataset from per-clip sufficient statistics, so leave-one-clip-out
(LOCO) and leave-one-identity-out (LOIO) fits and their R² come for free; optionally each
identity's mirror image is added (a symmetric basis) and the shipped generic model's
per-identity statistics are added as a prior (``GenericFaceModel``: shrinkage toward a basis
fitted on many people, so that a dataset with few clips still gets a good one).

One part of B depends on the person: how far the brows travel. The brows' vertical rows are stored
for a face whose brows sit ``REFERENCE_BROW_GAP`` above the eyes and are scaled by each identity's
own gap (``displacement_scale``); ``LinearFaceModel.for_identity`` is the basis one identity's
keypoints are made from and inverted with.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cogportrait.config import RestSettings
from cogportrait.face.pose import MIRROR_KEYPOINTS
from cogportrait.io.atomic import atomic_path, write_json
from cogportrait.schema import (
    AU_CHANNELS,
    KEYPOINT_GROUPS,
    KEYPOINT_INDICES,
    N_KEYPOINTS,
    keypoint_slice,
)

log = logging.getLogger("cogportrait.face.model")

MODEL_VERSION = 3  # 2: nuisance regressors (NUISANCE_TERMS) after the pose terms; baselines carry their rest values
# 3: the brows' vertical rows are per REFERENCE_BROW_GAP, scaled to each identity (displacement_scale)
# AU channels the per-frame basis models; AU41 moves the same lid points as AU45 and is
# separated over time afterwards.
FIT_AUS: tuple[str, ...] = tuple(c for c in AU_CHANNELS if c != "AU41")
FIT_AU_INDEX: tuple[int, ...] = tuple(AU_CHANNELS.index(c) for c in FIT_AUS)
GAZE_TERMS: tuple[str, ...] = ("gaze_horizontal", "gaze_vertical")
POSE_TERMS: tuple[str, ...] = ("sin_yaw", "sin_pitch", "sin_roll")  # minus their rest values
# MediaPipe blendshapes (subject's own left/right) that move the eye region without being a
# control: known per frame, minus their rest values. cheekSquintLeft/Right, the cheek raiser itself,
# would be the obvious choice, but MediaPipe never activates them (≤ 1e-4 on every frame we have);
# the smile and the upper-lip raiser carry the cheek raise instead. Each pair lifted
# leave-one-identity-out R² by ~0.01 and AU4L's correlation by 0.12-0.16 (README).
NUISANCE_TERMS: tuple[str, ...] = ("mouthSmileLeft", "mouthSmileRight", "mouthUpperUpLeft", "mouthUpperUpRight")
REGRESSORS: tuple[str, ...] = FIT_AUS + GAZE_TERMS + POSE_TERMS + NUISANCE_TERMS
N_REG = len(REGRESSORS)
N_DIMS = N_KEYPOINTS * 3


def group_dims(group: str) -> np.ndarray:
    """Flat (62×3) positions of one keypoint group's coordinates."""
    s = keypoint_slice(group)
    return np.arange(s.start * 3, s.stop * 3)


IRIS_DIMS = np.concatenate([group_dims("left_iris"), group_dims("right_iris")])
NON_IRIS_DIMS = np.setdiff1d(np.arange(N_DIMS), IRIS_DIMS)


def _dims_mirror() -> tuple[np.ndarray, np.ndarray]:
    """The mirror image of a flat 62×3 vector as v'[j] = sign[j] · v[perm[j]]: x → −x, and every
    point moved to its mirror twin's place (pose.MIRROR_KEYPOINTS; test_face_model checks the map
    on a real face)."""
    return (MIRROR_KEYPOINTS[:, None] * 3 + np.arange(3)).ravel(), np.tile([-1.0, 1.0, 1.0], N_KEYPOINTS)


_SIDE_SUFFIXES = (("Left", "left", "Right"), ("Right", "right", "Left"), ("L", "left", "R"), ("R", "right", "L"))


def _side_and_twin(name: str) -> tuple[str, str] | None:
    """("left" or "right", the other side's regressor) for a one-sided regressor, else None."""
    for suffix, side, other in _SIDE_SUFFIXES:
        twin = name[: -len(suffix)] + other
        if name.endswith(suffix) and twin in REGRESSORS:
            return side, twin
    return None


def regressor_side(name: str) -> str | None:
    """The side ("left" or "right") of a one-sided regressor (AU2L, mouthSmileRight: the subject's
    own side, as the keypoint groups); None for one of both sides (AU1, gaze, pose)."""
    found = _side_and_twin(name)
    return found[0] if found else None


def _regressors_mirror() -> tuple[np.ndarray, np.ndarray]:
    """The mirror image of a regressor vector: L/R channels (AU2L/AU2R, mouthSmileLeft/Right) swap,
    horizontal gaze, yaw and roll flip sign."""
    perm = np.array([REGRESSORS.index(found[1]) if (found := _side_and_twin(name)) else i for i, name in enumerate(REGRESSORS)])
    sign = np.array([-1.0 if name in ("gaze_horizontal", "sin_yaw", "sin_roll") else 1.0 for name in REGRESSORS])
    return perm, sign


DIMS_MIRROR = _dims_mirror()
REGRESSORS_MIRROR = _regressors_mirror()


def mirror_basis(basis: np.ndarray) -> np.ndarray:
    """The basis of the mirror-image face: B'[r, d] = s_r t_d B[p_r, q_d]. A symmetric fit gives B' = B."""
    (q, t), (p, s) = DIMS_MIRROR, REGRESSORS_MIRROR
    return s[:, None] * basis[np.ix_(p, q)] * t[None, :]


class FaceModelError(ValueError):
    """A face model or generic model folder this code cannot read: another version or layout, or
    edited since it was written. The user's fix is to rerun invert (or fit-generic)."""


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
    nuisance: np.ndarray = field(default_factory=lambda: np.zeros(len(NUISANCE_TERMS)))  # NUISANCE_TERMS at rest


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

    def mirrored(self) -> ClipStats:
        """The statistics of the same frames seen in a mirror (x' = S x, d' = M d, signed permutations).

        Faces are close to mirror-symmetric, so adding every identity's mirror image doubles the
        data of each lateral channel (AU2L learns from AU2R's frames) and makes the basis exactly
        symmetric; the identity's own asymmetry stays in its baseline.
        """
        (q, t), (p, s) = DIMS_MIRROR, REGRESSORS_MIRROR
        return ClipStats(
            self.n,
            s[:, None] * self.xtx[np.ix_(p, p)] * s[None, :],
            s[:, None] * self.xtd[np.ix_(p, q)] * t[None, :],
            t * self.dsum[q],
            self.dsq[q],
            s * self.xsum[p],
        )

    def scaled(self, weight: float) -> ClipStats:
        """Every frame counted ``weight`` times (n becomes fractional): a prior's strength."""
        return ClipStats(*(getattr(self, f) * weight for f in STAT_FIELDS))

    def in_basis_units(self, baseline: Baseline) -> ClipStats:
        """The same frames with d divided by the identity's ``displacement_scale``: what the shared
        basis is fitted from, so that each identity's brows count in units of its own gap."""
        scale = displacement_scale(baseline)
        return ClipStats(self.n, self.xtx, self.xtd / scale, self.dsum / scale, self.dsq / scale**2, self.xsum)

    def arrays(self) -> dict[str, np.ndarray]:
        return {f: np.asarray(getattr(self, f), dtype=np.float64) for f in STAT_FIELDS}

    @staticmethod
    def zero() -> ClipStats:
        return ClipStats(0, np.zeros((N_REG, N_REG)), np.zeros((N_REG, N_DIMS)), np.zeros(N_DIMS), np.zeros(N_DIMS), np.zeros(N_REG))


STAT_FIELDS = ("n", "xtx", "xtd", "dsum", "dsq", "xsum")


def pose_terms(head_pose: np.ndarray, baseline: Baseline) -> np.ndarray:
    """T x 3: sin of each head angle minus sin of the identity's rest angle."""
    return np.sin(np.radians(np.asarray(head_pose, dtype=np.float64))) - np.sin(np.radians(baseline.head_pose))


def nuisance_terms(nuisance: np.ndarray, baseline: Baseline) -> np.ndarray:
    """T x len(NUISANCE_TERMS): the nuisance blendshapes minus the identity's rest values."""
    return np.asarray(nuisance, dtype=np.float64) - baseline.nuisance


# IOD units: the brow–eye gap of the face the stored basis describes (a typical one; the sample's
# identities span 0.27–0.47)
REFERENCE_BROW_GAP = 0.35


def brow_gaps(keypoints: np.ndarray) -> np.ndarray:
    """(left, right): how far the brow's mean height is above the eye contour's, canonical IOD units."""
    kp = np.asarray(keypoints, dtype=np.float64).reshape(N_KEYPOINTS, 3)
    return np.array([kp[keypoint_slice(f"{side}_brow"), 1].mean() - kp[keypoint_slice(f"{side}_eye"), 1].mean()
                     for side in ("left", "right")])


def displacement_scale(baseline: Baseline) -> np.ndarray:
    """D factors from the stored basis to this identity's displacements: each brow's y rows scaled
    by its gap over ``REFERENCE_BROW_GAP``, every other coordinate 1.

    Why: across people, the same brow raise or lowering moves the brows in proportion to the skin
    between brow and eye, and that gap differs by a factor of 1.8 between the sample's people in
    IOD units (0.27-0.47). One basis in IOD units over- or under-shoots every face that is not
    average; scaled per identity, a control means the same relative travel on every face, which is
    also what animating a new portrait needs (its brows move by its own gap). Leave-one-identity-
    out on the sample (with the support of ``group_regressors``): R² of the brows 0.698 → 0.730,
    overall 0.793 → 0.801; the brow controls follow MediaPipe's proxies a little less (AU2L/R
    0.95/0.96 → 0.93/0.93: the proxies are read off absolute geometry). Scaling the lids by the
    eye aperture, or x by the eye's width, made held-out R² worse, so only the brows' y is scaled.
    """
    gaps = brow_gaps(baseline.keypoints)
    if not np.all(np.isfinite(gaps) & (gaps > 0)):
        raise ValueError(f"identity {baseline.identity!r}: brow–eye gaps {gaps} are not positive; its baseline keypoints are not a face")
    scale = np.ones(N_DIMS)
    for side, gap in zip(("left", "right"), gaps):
        scale[group_dims(f"{side}_brow")[1::3]] = gap / REFERENCE_BROW_GAP
    return scale


def identity_basis(basis: np.ndarray, baseline: Baseline) -> np.ndarray:
    """A stored basis (R x D) as one identity's: its columns times ``displacement_scale``."""
    return basis * displacement_scale(baseline)[None, :]


def raw_features(au: np.ndarray, gaze_signed: np.ndarray, head_pose: np.ndarray, nuisance: np.ndarray) -> np.ndarray:
    """T x R features before the rest values are subtracted (regressors = raw − rest)."""
    return np.concatenate([au[:, list(FIT_AU_INDEX)], gaze_signed, np.sin(np.radians(head_pose)), nuisance], axis=1)


def rest_features(baseline: Baseline) -> np.ndarray:
    """R rest values of raw_features for an identity."""
    return np.concatenate([baseline.au[list(FIT_AU_INDEX)], baseline.gaze, np.sin(np.radians(baseline.head_pose)), baseline.nuisance])


def regressors(au: np.ndarray, gaze_signed: np.ndarray, head_pose: np.ndarray, nuisance: np.ndarray, baseline: Baseline) -> np.ndarray:
    """T x R design matrix: AU proxies, signed gaze, pose and nuisance terms minus the identity's rest values."""
    return raw_features(au, gaze_signed, head_pose, nuisance) - rest_features(baseline)


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


# What cannot move the brows: the eyeballs (gaze), the upper lid's own lifter (AU5, the levator,
# which the brow does not follow) and the mouth (the nuisance terms).
NOT_MOVING_BROWS: tuple[str, ...] = GAZE_TERMS + ("AU5",) + NUISANCE_TERMS


def group_regressors(group: str) -> np.ndarray:
    """Indices of the regressors a keypoint group is fitted on; its basis entries for the others are 0.

    Why: a one-sided control moves only its own side (the left eye's blink cannot move the right
    eye), and the brows do not move with ``NOT_MOVING_BROWS``. People do both at once, though: they
    blink both eyes together, glance up while raising their brows, smile while squinting. A free
    fit learns those habits of the people it saw as geometry: it splits a blink between AU45L and
    AU45R on both eyes, and reads a wink, or brows held still while the eyes move, of someone new
    as the wrong control. Leave-one-identity-out on the sample, this support alone (before the
    brows were scaled by their gap): xy R² 0.782 → 0.793, inverted-vs-proxy correlation AU4R
    0.78 → 0.88, AU45L/R 0.92/0.91 → 0.96/0.94, AU2L/R 0.94/0.93 → 0.95/0.96 (README). The lids
    keep every same-side control: the brows, gaze and the cheek (smile) all move them.
    """
    side = group.split("_")[0]
    brow = group.endswith("brow")
    return np.array([r for r, name in enumerate(REGRESSORS)
                     if regressor_side(name) in (None, side) and not (brow and name in NOT_MOVING_BROWS)])


GROUP_REGRESSORS: dict[str, np.ndarray] = {g: group_regressors(g) for g in KEYPOINT_GROUPS}


def ridge_solve(stats: ClipStats, ridge: float) -> np.ndarray:
    """B (R x D): per keypoint group, (XᵀX + λ n I)⁻¹ XᵀD over the regressors that can move it
    (``group_regressors``), zero for the others; λ is per frame so it means the same at any dataset size."""
    lam = ridge * max(stats.n, 1)
    basis = np.zeros((N_REG, N_DIMS))
    for group, regs in GROUP_REGRESSORS.items():
        dims = group_dims(group)
        gram = stats.xtx[np.ix_(regs, regs)] + lam * np.eye(len(regs))
        basis[np.ix_(regs, dims)] = np.linalg.solve(gram, stats.xtd[np.ix_(regs, dims)])
    return basis


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
    scale: np.ndarray | None = None  # None: the stored basis; else the displacement_scale it was multiplied by

    def for_identity(self, baseline: Baseline) -> LinearFaceModel:
        """The basis of one identity (its brows scaled by its gap, ``displacement_scale``); a model
        already scaled for this baseline is returned as it is, so callers may pass either."""
        scale = displacement_scale(baseline)
        if self.scale is not None:
            if not np.array_equal(self.scale, scale):
                raise ValueError(f"this face model is already scaled for another baseline than {baseline.identity!r}'s")
            return self
        return replace(self, basis=identity_basis(self.basis, baseline), scale=scale)

    @property
    def basis_au(self) -> np.ndarray:
        return self.basis[: len(FIT_AUS)]

    @property
    def basis_gaze(self) -> np.ndarray:
        return self.basis[len(FIT_AUS) : len(FIT_AUS) + len(GAZE_TERMS)]

    @property
    def basis_pose(self) -> np.ndarray:
        start = len(FIT_AUS) + len(GAZE_TERMS)
        return self.basis[start : start + len(POSE_TERMS)]

    @property
    def basis_nuisance(self) -> np.ndarray:
        return self.basis[len(FIT_AUS) + len(GAZE_TERMS) + len(POSE_TERMS) :]

    @staticmethod
    def fit(stats: ClipStats, ridge: float, meta: dict | None = None) -> LinearFaceModel:
        if stats.n < N_REG:
            raise ValueError(f"cannot fit the face model from {stats.n} frames (need at least {N_REG})")
        return LinearFaceModel(ridge_solve(stats, ridge), ridge, meta=dict(meta or {}))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return x @ self.basis

    def save(self, folder: str | Path, baselines: dict[str, Baseline] | None = None) -> None:
        """model.npz (arrays) + model.json (layout, version, provenance); baselines.npz beside."""
        if self.scale is not None:
            raise ValueError("a face model scaled for one identity is not saved; save the shared one")
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
            raise FaceModelError(f"face model version {info.get('version')} in {folder}; this code reads {MODEL_VERSION}: rerun invert")
        if tuple(info["regressors"]) != REGRESSORS or tuple(info["keypoint_indices"]) != KEYPOINT_INDICES:
            raise FaceModelError(f"face model in {folder} has a different layout (regressors or keypoints): rerun invert")
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
        "nuisance": np.stack([baselines[i].nuisance for i in ids]) if ids else np.zeros((0, len(NUISANCE_TERMS))),
    }
    with atomic_path(path, ".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def load_baselines(path: str | Path) -> dict[str, Baseline]:
    with np.load(path, allow_pickle=False) as z:
        if "nuisance" not in z.files or z["nuisance"].shape[1:] != (len(NUISANCE_TERMS),):
            raise FaceModelError(f"baselines in {path} predate face model version {MODEL_VERSION} (no rest values of "
                             f"{', '.join(NUISANCE_TERMS)}); rerun invert")
        return {
            str(ident): Baseline(
                str(ident), z["keypoints"][i], z["au"][i], z["gaze"][i], z["lid_above_iris"][i], z["iris_radius"][i],
                z["head_pose"][i], int(z["n_rest_frames"][i]), z["nuisance"][i],
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
    nuisance: np.ndarray | None = None,
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
        nuisance=np.median(nuisance[rest], axis=0) if nuisance is not None else np.zeros(len(NUISANCE_TERMS)),
    )


# ----------------------------------------------------------------------------------------------
# The shipped generic face model: a prior for datasets with few clips or identities
# ----------------------------------------------------------------------------------------------
GENERIC_VERSION = 3  # 2: face model version 2 (nuisance regressors); 3: version 3 (brows per identity gap)
GENERIC_FOLDER = Path(__file__).parent / "generic"  # shipped with the package (pyproject package-data)
SHIPPED = "shipped"  # InvertConfig.generic_model's word for GENERIC_FOLDER


def arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    """Content hash of named arrays (names, dtypes, shapes, bytes): independent of the npz container."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


@dataclass
class GenericFaceModel:
    """A face model fitted on many identities, kept as *per-identity* sufficient statistics.

    ``stats[i]`` are identity i's ridge statistics under its own baseline, in IOD units (not mirrored), so a
    dataset's fit can add any subset of them as a prior and drop an identity exactly, e.g. one
    that is also in the dataset or the one held out by leave-one-identity-out. ``model`` is the
    basis of all of them (loadable like any invert ``face_model/``), ``average`` their mean rest
    state: the baseline for a face with no frames of its own.
    """

    model: LinearFaceModel
    stats: dict[str, ClipStats]
    baselines: dict[str, Baseline]
    average: Baseline
    clips: dict[str, list[str]]  # identity -> the clip ids its statistics come from
    meta: dict = field(default_factory=dict)

    def prior(self, exclude_identities: set[str], exclude_clips: set[str], frames: float) -> tuple[ClipStats, list[str]]:
        """The statistics of every identity not excluded (by name, or by sharing a clip), scaled so
        that they count as ``frames`` frames; and the identities used."""
        used = [i for i in sorted(self.stats) if i not in exclude_identities and not exclude_clips.intersection(self.clips.get(i, ()))]
        total = ClipStats.zero()
        for i in used:
            total = total + self.stats[i].in_basis_units(self.baselines[i])
        if total.n <= 0 or frames <= 0:
            return ClipStats.zero(), []
        return total.scaled(frames / total.n), used

    def arrays(self) -> dict[str, np.ndarray]:
        ids = sorted(self.stats)
        out = {"identity": np.array(ids, dtype=str), "basis": self.model.basis.astype(np.float64)}
        for f in STAT_FIELDS:
            out[f"stats_{f}"] = np.stack([np.asarray(getattr(self.stats[i], f), dtype=np.float64) for i in ids])
        return out

    def save(self, folder: str | Path) -> str:
        """model.json/model.npz/baselines.npz (a face model folder), average_baseline.npz,
        generic.npz (per-identity statistics) and generic.json (version, fitting set, content hash).
        Returns the content hash."""
        folder = Path(folder)
        self.model.save(folder, self.baselines)
        save_baselines(folder / "average_baseline.npz", {self.average.identity: self.average})
        arrays = self.arrays()
        with atomic_path(folder / "generic.npz", ".npz") as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
        digest = generic_content_sha256(folder)
        write_json(folder / "generic.json", {
            "version": GENERIC_VERSION, "kind": "generic", "content_sha256": digest,
            "regressors": list(REGRESSORS), "keypoint_indices": list(KEYPOINT_INDICES),
            "identities": {i: {"clips": sorted(self.clips.get(i, [])), "frames": int(round(self.stats[i].n))} for i in sorted(self.stats)},
            **self.meta,
        })
        return digest

    @staticmethod
    def load(folder: str | Path) -> GenericFaceModel:
        folder = Path(folder)
        if not (folder / "generic.json").is_file():
            raise FileNotFoundError(f"no generic face model at {folder} (make one with `cogportrait face fit-generic`)")
        info = json.loads((folder / "generic.json").read_text())
        if info.get("version") != GENERIC_VERSION:
            raise FaceModelError(f"generic face model version {info.get('version')} in {folder}; this code reads {GENERIC_VERSION}: "
                                 "refit it with `cogportrait face fit-generic`")
        if tuple(info["regressors"]) != REGRESSORS or tuple(info["keypoint_indices"]) != KEYPOINT_INDICES:
            raise FaceModelError(f"generic face model in {folder} has a different layout (regressors or keypoints): "
                                 "refit it with `cogportrait face fit-generic`")
        digest = generic_content_sha256(folder)
        if digest != info.get("content_sha256"):
            raise FaceModelError(f"generic face model in {folder}: content sha256 {digest} != {info.get('content_sha256')} in generic.json")
        model = LinearFaceModel.load(folder)
        with np.load(folder / "generic.npz", allow_pickle=False) as z:
            ids = [str(i) for i in z["identity"]]
            stats = {i: ClipStats(*(z[f"stats_{f}"][k] for f in STAT_FIELDS)) for k, i in enumerate(ids)}
        [average] = load_baselines(folder / "average_baseline.npz").values()
        clips = {i: list(v.get("clips", [])) for i, v in info.get("identities", {}).items()}
        meta = {k: v for k, v in info.items() if k not in ("version", "kind", "content_sha256", "regressors", "keypoint_indices", "identities")}
        return GenericFaceModel(model, stats, load_baselines(folder / "baselines.npz"), average, clips, meta)


def generic_content_sha256(folder: Path) -> str:
    """One hash over every array of a generic model folder (basis, statistics, baselines)."""
    arrays: dict[str, np.ndarray] = {}
    for name in ("model.npz", "generic.npz", "baselines.npz", "average_baseline.npz"):
        with np.load(folder / name, allow_pickle=False) as z:
            arrays.update({f"{name}:{k}": z[k] for k in z.files})
    return arrays_sha256(arrays)


def resolve_generic(path: str) -> Path | None:
    """InvertConfig.generic_model -> a folder: "shipped" is the package's own, "" none."""
    if not path:
        return None
    return GENERIC_FOLDER if path == SHIPPED else Path(path)
