"""Fitting the linear face model over a dataset and scoring it: baselines, ridge fit, LOIO, gates.

Ray-free maths of the invert job. A dataset is reduced to per-clip ``ClipMoments`` (tiny matrices
that give the ridge statistics for any baseline) and per-identity ``RestData``; ``fit_face_model``
estimates the baselines, fits the basis (the dataset's statistics, their mirror images when
``symmetric``, plus the generic model's statistics as a prior), re-centres the baselines under it
and refits, and fits the exact leave-one-identity-out (LOIO) bases the quality gates are measured
with (and leave-one-clip-out, LOCO, for reference). ``generic_from_fit`` turns a fit into the
shipped ``GenericFaceModel``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from cogportrait.config import InversionSettings, InvertConfig, RestSettings
from cogportrait.face.inversion import invert_clip
from cogportrait.face.mapping import average_baseline
from cogportrait.face.model import (
    FIT_AU_INDEX,
    FIT_AUS,
    N_DIMS,
    N_REG,
    Baseline,
    ClipMoments,
    ClipStats,
    GenericFaceModel,
    LinearFaceModel,
    estimate_baseline,
    group_dims,
    identity_basis,
    raw_features,
    regressors,
    rest_mask,
    ridge_solve,
    sse,
)
from cogportrait.face.signals import LID_KEYS, PROXY_COMPARED, FaceSignals
from cogportrait.schema import CHANNEL_INDEX, KEYPOINT_GROUPS, identity_key

# identity keys of clips without a stated identity start with this (schema.identity_key)
UNLABELLED_PREFIX = identity_key(None, "")

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
    nuisance: np.ndarray  # K x len(NUISANCE_TERMS)

    FIELDS = ("canon", "au", "gaze", "head_pose", "lid", "nuisance")

    @staticmethod
    def of(sig: FaceSignals, idx: np.ndarray) -> RestData:
        return RestData(sig.canon[idx], sig.au[idx], sig.gaze[idx], sig.head_pose[idx], sig.lid_matrix()[idx], sig.nuisance[idx])

    @staticmethod
    def concat(parts: list[RestData]) -> RestData:
        return RestData(*(np.concatenate([getattr(p, f) for p in parts]) for f in RestData.FIELDS))

    def arrays(self) -> dict[str, np.ndarray]:
        return {f: getattr(self, f) for f in self.FIELDS}


def baseline_from_rest(identity: str, rest: RestData) -> Baseline:
    """The identity's baseline: robust (median) statistics of its pooled rest frames."""
    lid = {k: rest.lid[:, i] for i, k in enumerate(LID_KEYS)}
    return estimate_baseline(identity, rest.canon, rest.au, rest.gaze, lid, np.ones(len(rest.canon), dtype=bool), rest.head_pose,
                             rest.nuisance)


def refine_baseline(baseline: Baseline, rest: RestData, basis: np.ndarray) -> Baseline:
    """Move b so that the model has no offset at rest: b += median over rest frames of (d − X B).

    The median rest keypoints carry the little expression left in "rest" frames; under the basis
    that expression is known, so removing it makes b and the proxies' rest values agree.
    """
    x = regressors(rest.au, rest.gaze, rest.head_pose, rest.nuisance, baseline)
    d = rest.canon.reshape(len(x), N_DIMS) - baseline.keypoints.reshape(N_DIMS)
    ok = np.all(np.isfinite(x), axis=1) & np.all(np.isfinite(d), axis=1)
    if not ok.any():
        return baseline
    delta = np.median(d[ok] - x[ok] @ identity_basis(basis, baseline), axis=0)
    return replace(baseline, keypoints=baseline.keypoints + delta.reshape(baseline.keypoints.shape))


def clip_moments(sig: FaceSignals) -> ClipMoments:
    """Baseline-free moments of the clip's usable frames (face present, proxies finite)."""
    t = len(sig.frame)
    z = raw_features(sig.au, sig.gaze, sig.head_pose, sig.nuisance)
    k = sig.canon.reshape(t, N_DIMS)
    ok = sig.present & np.all(np.isfinite(z), axis=1) & np.all(np.isfinite(k), axis=1)
    return ClipMoments.of(z[ok], k[ok])


GROUP_DIMS: dict[str, np.ndarray] = {g: group_dims(g) for g in KEYPOINT_GROUPS}
GROUP_DIMS["iris"] = np.concatenate([GROUP_DIMS["left_iris"], GROUP_DIMS["right_iris"]])
GROUP_DIMS["eyes"] = np.concatenate([GROUP_DIMS["left_eye"], GROUP_DIMS["right_eye"]])
GROUP_DIMS["brows"] = np.concatenate([GROUP_DIMS["left_brow"], GROUP_DIMS["right_brow"]])
GROUP_DIMS["overall"] = np.arange(N_DIMS)


def r2_by_group(stats_by_clip: dict[str, ClipStats], bases: dict[str, np.ndarray], planar: bool = False) -> dict[str, float]:
    """Pooled R² per keypoint group of each clip's data under the basis given for that clip (its
    identity's, ``identity_basis``).

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
        sig.nuisance,
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
    loco: dict[str, tuple[np.ndarray, Baseline]] = field(default_factory=dict)  # clip -> stored basis without it, re-centred baseline
    loco_stats: dict[str, ClipStats] = field(default_factory=dict)
    loio: dict[str, tuple[np.ndarray, Baseline]] = field(default_factory=dict)  # identity -> stored basis without it, its re-centred baseline
    loio_stats: dict[str, ClipStats] = field(default_factory=dict)  # clip -> statistics under its identity's LOIO baseline
    loio_identity: dict[str, str] = field(default_factory=dict)  # clip -> its held-out identity (the clips LOIO scores)
    loio_labelled: bool = True  # False: no clip had a stated identity, LOIO holds out single clips
    identity_of: dict[str, str] = field(default_factory=dict)  # clip -> identity, every fitted clip


def sum_stats(items) -> ClipStats:
    total = ClipStats.zero()
    for s in items:
        total = total + s
    return total


def with_prior(data: ClipStats, prior: ClipStats | None, symmetric: bool) -> ClipStats:
    """What the basis is solved from: the data (and its mirror image) plus the prior (and its)."""
    total = data if prior is None else data + prior
    return total + total.mirrored() if symmetric else total


def loio_identities(identity_of: dict[str, str]) -> tuple[list[str], bool]:
    """The identities leave-one-identity-out holds out, and whether they are stated ones.

    A clip without a stated identity may show anyone, a held-out person included (the sample's
    multi-shot edit repeats four other clips' people), so when some clips have stated identities
    LOIO uses only those: unlabelled clips are neither held out nor in the held-out fits. With no
    stated identity at all, every clip is its own identity (LOIO = LOCO).
    """
    keys = sorted(set(identity_of.values()))
    labelled = [k for k in keys if not k.startswith(UNLABELLED_PREFIX)]
    return (labelled, True) if labelled else (keys, False)


def fit_face_model(
    rest: dict[str, RestData],
    moments: dict[str, ClipMoments],
    identity_of: dict[str, str],
    ridge: float,
    meta: dict | None = None,
    prior: ClipStats | None = None,
    symmetric: bool = False,
) -> FaceModelFit:
    """Baselines from each identity's rest frames, the ridge basis, baselines re-centred under it
    (no offset at rest), the final basis, exact leave-one-identity-out and leave-one-clip-out bases.

    ``moments`` holds only clips whose identity has rest frames. ``prior`` (statistics of other
    people, already weighted; see ``GenericFaceModel.prior``) is added to every fit: shrinkage
    toward the generic basis. A held-out identity's baseline comes from its own rest frames,
    re-centred under the basis fitted without it; the other identities keep their final
    baselines (re-centring each of them per held-out identity would cost O(identities²)).
    """
    first = {ident: baseline_from_rest(ident, r) for ident, r in rest.items()}
    units0 = {c: m.stats(first[identity_of[c]]).in_basis_units(first[identity_of[c]]) for c, m in moments.items()}
    model0 = LinearFaceModel.fit(with_prior(sum_stats(units0.values()), prior, symmetric), ridge)
    baselines = {i: refine_baseline(b, rest[i], model0.basis) for i, b in first.items()}
    stats = {c: m.stats(baselines[identity_of[c]]) for c, m in moments.items()}  # IOD units: what R² is measured in
    units = {c: s.in_basis_units(baselines[identity_of[c]]) for c, s in stats.items()}  # what the basis is fitted from
    total = sum_stats(units.values())
    model = LinearFaceModel.fit(with_prior(total, prior, symmetric), ridge, {
        **(meta or {}), "clips": len(stats), "frames": int(total.n), "identities": len(baselines), "symmetric": symmetric,
        "prior_frames": float(prior.n) if prior is not None else 0.0,
    })
    fit = FaceModelFit(model, baselines, stats, identity_of={c: identity_of[c] for c in stats})
    if len(stats) >= 2:
        for cid, s in units.items():
            fit.loco[cid] = _held_out(total - s, prior, symmetric, ridge, first[identity_of[cid]], rest[identity_of[cid]])
            fit.loco_stats[cid] = moments[cid].stats(fit.loco[cid][1])
    held, fit.loio_labelled = loio_identities({c: identity_of[c] for c in stats})
    if len(held) >= 2:
        pool = sum_stats(s for c, s in units.items() if identity_of[c] in held)
        for ident in held:
            own = sum_stats(s for c, s in units.items() if identity_of[c] == ident)
            fit.loio[ident] = _held_out(pool - own, prior, symmetric, ridge, first[ident], rest[ident])
            for cid in (c for c in stats if identity_of[c] == ident):
                fit.loio_stats[cid] = moments[cid].stats(fit.loio[ident][1])
                fit.loio_identity[cid] = ident
    return fit


def _held_out(train: ClipStats, prior: ClipStats | None, symmetric: bool, ridge: float,
              baseline: Baseline, rest: RestData) -> tuple[np.ndarray, Baseline]:
    """The basis fitted from ``train`` (+ prior), and the held-out identity's baseline re-centred under it."""
    total = with_prior(train, prior, symmetric)
    if total.n < N_REG:
        return np.full((N_REG, N_DIMS), np.nan), baseline
    basis = ridge_solve(total, ridge)
    return basis, refine_baseline(baseline, rest, basis)


def generic_from_fit(fit: FaceModelFit, identity_of: dict[str, str], meta: dict | None = None) -> GenericFaceModel:
    """The generic model of a fit: per-identity statistics (under the final baselines), the
    basis, the baselines and their average."""
    stats: dict[str, ClipStats] = {}
    clips: dict[str, list[str]] = {}
    for cid, s in fit.stats.items():
        ident = identity_of[cid]
        stats[ident] = stats.get(ident, ClipStats.zero()) + s
        clips.setdefault(ident, []).append(cid)
    return GenericFaceModel(fit.model, stats, fit.baselines, average_baseline(fit.baselines), clips, dict(meta or {}))


GATED_CORR_CHANNELS = ("AU1", "AU2L", "AU2R", "AU45L", "AU45R", "gaze_horizontal")
GATED_CORR_CHANNELS_AU4 = ("AU4L", "AU4R")  # the brow lowerers: a lower bar (gate_loio_corr_au4)


def quality_report(fit: FaceModelFit, fit_corr: CorrSums | None, loco_corr: CorrSums | None, loio_corr: CorrSums | None,
                   err_sum: float, err_n: int, cfg: InvertConfig, prior: dict | None = None) -> dict:
    """The face model's quality metrics (R² per keypoint group in-sample, LOCO and LOIO, inverted
    vs proxy correlations) and the gates of ``cfg`` measured on them (LOIO, in-plane xy): how the
    basis carries to a person it has not seen."""
    def corr(total: CorrSums | None) -> dict[str, float | None]:
        return {} if total is None else {name: _round(v) for name, v in zip(PROXY_COMPARED, total.r())}

    def r2(stats: dict[str, ClipStats], bases: dict[str, np.ndarray], planar: bool) -> dict[str, float | None]:
        return _rounded(r2_by_group(stats, bases, planar=planar)) if stats else {}

    bases = {c: identity_basis(fit.model.basis, fit.baselines[fit.identity_of[c]]) for c in fit.stats}
    loco_bases = {c: identity_basis(*held) for c, held in fit.loco.items()}
    loio_bases = {c: identity_basis(*fit.loio[ident]) for c, ident in fit.loio_identity.items()}
    r2_loio_xy = r2(fit.loio_stats, loio_bases, True)
    loio_c = corr(loio_corr)
    gates = {
        "loio_r2_overall": _gate(r2_loio_xy.get("overall"), cfg.gate_loio_r2_overall),
        "loio_r2_iris": _gate(r2_loio_xy.get("iris"), cfg.gate_loio_r2_iris),
    }
    for ch in GATED_CORR_CHANNELS:
        gates[f"loio_corr_{ch}"] = _gate(loio_c.get(ch), cfg.gate_loio_corr)
    for ch in GATED_CORR_CHANNELS_AU4:
        gates[f"loio_corr_{ch}"] = _gate(loio_c.get(ch), cfg.gate_loio_corr_au4)
    fit_c = corr(fit_corr)
    return {
        "face_model": {"version": fit.model.version, "regressors": len(fit.model.basis), "ridge": cfg.ridge,
                       "identities": len(fit.baselines), "symmetric": cfg.symmetric, "prior": prior or {}},
        "loio": {"identities": len(fit.loio), "stated_identities_only": fit.loio_labelled,
                 "clips": len(fit.loio_stats),
                 "note": "each identity scored under the basis fitted from every other one (dataset and prior), its baseline "
                         "re-centred under that basis; clips without a stated identity are left out when any has one"},
        "r2_by_group": {
            "in_sample_xy": r2(fit.stats, bases, True), "loio_xy": r2_loio_xy, "loco_xy": r2(fit.loco_stats, loco_bases, True),
            "in_sample_xyz": r2(fit.stats, bases, False), "loio_xyz": r2(fit.loio_stats, loio_bases, False),
            "loco_xyz": r2(fit.loco_stats, loco_bases, False),
            "note": "xy: in-plane coordinates (what Stage 2 renders; gates use these); xyz adds MediaPipe's relative depth",
        },
        "r2_per_au_in_sample": {k: _round(v * v) if v is not None else None for k, v in fit_c.items() if k in FIT_AUS},
        "corr_inverted_vs_proxy_in_sample": fit_c,
        "corr_inverted_vs_proxy_loio": loio_c,
        "corr_inverted_vs_proxy_loco": corr(loco_corr),
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
