"""Fitting the linear face model over a dataset and scoring it: baselines, ridge fit, LOCO, gates.

Ray-free maths of the invert job. A dataset is reduced to per-clip ``ClipMoments`` (tiny matrices
that give the ridge statistics for any baseline) and per-identity ``RestData``; ``fit_face_model``
estimates the baselines, fits the basis, re-centres the baselines under it and refits, and fits
the exact leave-one-clip-out (LOCO) bases the quality gates are measured with.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from cogportrait.config import InversionSettings, InvertConfig, RestSettings
from cogportrait.face.inversion import invert_clip
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
from cogportrait.face.signals import LID_KEYS, PROXY_COMPARED, FaceSignals
from cogportrait.schema import CHANNEL_INDEX, KEYPOINT_GROUPS

def rest_frames(sig: FaceSignals, settings: RestSettings) -> np.ndarray:
    """Indices of the clip's rest frames (at most ``max_frames_per_clip``, evenly spread)."""
    mask = rest_mask(sig.au, sig.gaze, sig.head_pose, sig.present, settings)
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
    def of(sig: FaceSignals, idx: np.ndarray) -> RestData:
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


def clip_moments(sig: FaceSignals) -> ClipMoments:
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
    sig: FaceSignals, model: LinearFaceModel, baseline: Baseline, settings: InversionSettings
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


def inverted_matrix(controls: np.ndarray) -> np.ndarray:
    """The inverted counterparts of ``signals.proxy_matrix`` columns."""
    c = controls
    h = c[:, CHANNEL_INDEX["gaze_left"]] - c[:, CHANNEL_INDEX["gaze_right"]]
    v = c[:, CHANNEL_INDEX["gaze_up"]] - c[:, CHANNEL_INDEX["gaze_down"]]
    return np.concatenate([c[:, list(FIT_AU_INDEX)], h[:, None], v[:, None]], axis=1)


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


@dataclass
class FaceModelFit:
    """The fitted model, its per-identity baselines, and what the quality metrics need."""

    model: LinearFaceModel
    baselines: dict[str, Baseline]
    stats: dict[str, ClipStats]  # each clip's ridge statistics under its identity's final baseline
    loco: dict[str, tuple[np.ndarray, Baseline]] = field(default_factory=dict)  # clip -> basis without it, re-centred baseline
    loco_stats: dict[str, ClipStats] = field(default_factory=dict)


def sum_stats(items) -> ClipStats:
    total = ClipStats.zero()
    for s in items:
        total = total + s
    return total


def fit_face_model(
    rest: dict[str, RestData], moments: dict[str, ClipMoments], identity_of: dict[str, str], ridge: float, meta: dict | None = None
) -> FaceModelFit:
    """Baselines from each identity's rest frames, the ridge basis, baselines re-centred under it
    (no offset at rest), the final basis, and exact leave-one-clip-out bases.

    ``moments`` holds only clips whose identity has rest frames. LOCO needs at least two clips; a
    clip's LOCO baseline is its identity's, re-centred under the basis fitted without the clip.
    """
    first = {ident: baseline_from_rest(ident, r) for ident, r in rest.items()}
    stats0 = {c: m.stats(first[identity_of[c]]) for c, m in moments.items()}
    model0 = LinearFaceModel.fit(sum_stats(stats0.values()), ridge)
    baselines = {i: refine_baseline(b, rest[i], model0.basis) for i, b in first.items()}
    stats = {c: m.stats(baselines[identity_of[c]]) for c, m in moments.items()}
    total = sum_stats(stats.values())
    model = LinearFaceModel.fit(total, ridge, {**(meta or {}), "clips": len(stats), "frames": int(total.n), "identities": len(baselines)})
    fit = FaceModelFit(model, baselines, stats)
    if len(stats) >= 2:
        for cid, basis in loco_bases(stats, ridge).items():
            ident = identity_of[cid]
            b = refine_baseline(baselines[ident], rest[ident], basis) if np.all(np.isfinite(basis)) else baselines[ident]
            fit.loco[cid] = (basis, b)
            fit.loco_stats[cid] = moments[cid].stats(b)
    return fit


GATED_CORR_CHANNELS = ("AU1", "AU2L", "AU2R", "AU45L", "AU45R", "gaze_horizontal")


def quality_report(fit: FaceModelFit, fit_corr: CorrSums | None, loco_corr: CorrSums | None,
                   err_sum: float, err_n: int, cfg: InvertConfig) -> dict:
    """The face model's quality metrics (R² per keypoint group in-sample and LOCO, inverted vs
    proxy correlations) and the gates of ``cfg`` measured on them (LOCO, in-plane xy)."""
    def corr(total: CorrSums | None) -> dict[str, float | None]:
        return {} if total is None else {name: _round(v) for name, v in zip(PROXY_COMPARED, total.r())}

    bases = {c: fit.model.basis for c in fit.stats}
    loco_bases_ = {c: v[0] for c, v in fit.loco.items()}
    r2_loco_xy = r2_by_group(fit.loco_stats, loco_bases_, planar=True) if fit.loco else {}
    fit_c, loco_c = corr(fit_corr), corr(loco_corr)
    gates = {
        "loco_r2_overall": _gate(r2_loco_xy.get("overall"), cfg.gate_loco_r2_overall),
        "loco_r2_iris": _gate(r2_loco_xy.get("iris"), cfg.gate_loco_r2_iris),
    }
    for ch in GATED_CORR_CHANNELS:
        gates[f"loco_corr_{ch}"] = _gate(loco_c.get(ch), cfg.gate_loco_corr)
    return {
        "face_model": {"version": fit.model.version, "regressors": len(fit.model.basis), "ridge": cfg.ridge, "identities": len(fit.baselines)},
        "r2_by_group": {
            "in_sample_xy": _rounded(r2_by_group(fit.stats, bases, planar=True)), "loco_xy": _rounded(r2_loco_xy),
            "in_sample_xyz": _rounded(r2_by_group(fit.stats, bases)),
            "loco_xyz": _rounded(r2_by_group(fit.loco_stats, loco_bases_) if fit.loco else {}),
            "note": "xy: in-plane coordinates (what Stage 2 renders; gates use these); xyz adds MediaPipe's relative depth",
        },
        "r2_per_au_in_sample": {k: _round(v * v) if v is not None else None for k, v in fit_c.items() if k in FIT_AUS},
        "corr_inverted_vs_proxy_in_sample": fit_c,
        "corr_inverted_vs_proxy_loco": loco_c,
        "mean_residual_error_iod": _round(err_sum / err_n) if err_n else None,
        "gates": gates,
    }


def _round(v) -> float | None:
    return None if v is None or not np.isfinite(v) else round(float(v), 4)


def _rounded(d: dict) -> dict:
    return {k: _round(v) for k, v in d.items()}


def _gate(value, threshold: float) -> dict:
    v = _round(value) if value is not None else None
    return {"value": v, "threshold": threshold, "passed": bool(v is not None and v >= threshold)}
