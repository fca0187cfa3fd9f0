"""Recover the 17 controls from pose-normalised keypoints with the linear face model.

Per frame: gaze first from the iris points, then the AUs from lids and brows with the gaze part
removed (the paper's "separately"), each by bounded least squares so that controls stay in
[0, 1]. Then over time: AU41 (lid droop) from the lid-to-iris distance outside blinks, and the
part of the lid closure it explains is taken out of AU45. Head pose comes from the matrix; it and
the nuisance blendshapes (model.NUISANCE_TERMS) are known, so their part is only subtracted.
mapping.py is the exact inverse of these steps.
"""

from __future__ import annotations

import numpy as np

from cogportrait.face.model import (
    FIT_AU_INDEX,
    FIT_AUS,
    IRIS_DIMS,
    N_DIMS,
    NON_IRIS_DIMS,
    Baseline,
    LinearFaceModel,
    nuisance_terms,
    pose_terms,
)
from cogportrait.face.pose import EYE_UPPER_MID
from cogportrait.face.proxies import rectify_gaze
from cogportrait.config import InversionSettings
from cogportrait.schema import CHANNEL_INDEX, N_CHANNELS, keypoint_slice
from cogportrait.timeseries import fill_gaps, moving_average

AU45 = (CHANNEL_INDEX["AU45L"], CHANNEL_INDEX["AU45R"])
AU41 = CHANNEL_INDEX["AU41"]


def row_weights(z_weight: float) -> np.ndarray:
    w = np.ones(N_DIMS)
    w[2::3] = z_weight
    return w


def solve_box_ls(a: np.ndarray, y: np.ndarray, lo: np.ndarray, hi: np.ndarray, iterations: int) -> np.ndarray:
    """min ‖x A − y‖² s.t. lo ≤ x ≤ hi, for every row of y at once (A: k x m, y: N x m).

    The problem is tiny (k ≤ 9) and shares A across frames, so it is solved for all frames
    together: an active-set Newton step (batched k x k solves on each frame's free variables)
    until the active sets settle, then coordinate-descent sweeps that only lower the objective.
    ~10⁴ frames/s, where a per-frame scipy.optimize.lsq_linear call manages ~10³.
    """
    k = a.shape[0]
    h = a @ a.T
    h = h + 1e-9 * np.trace(h) * np.eye(k)
    g = y @ a.T  # N x k
    x = np.clip(np.linalg.solve(h, g.T).T, lo, hi)
    eye = np.eye(k, dtype=bool)
    for _ in range(max(iterations, 1)):
        grad = x @ h - g
        fixed = ((x <= lo + 1e-12) & (grad > 0)) | ((x >= hi - 1e-12) & (grad < 0))
        free = ~fixed
        hb = np.where(free[:, :, None] & free[:, None, :], h[None], 0.0) + np.where(fixed[:, :, None] & eye[None], 1.0, 0.0)
        rhs = np.where(free, g - (np.where(fixed, x, 0.0) @ h), x)
        new = np.clip(np.linalg.solve(hb, rhs[:, :, None])[:, :, 0], lo, hi)
        done = np.abs(new - x).max() < 1e-10 if len(x) else True
        x = new
        if done:
            break
    diag = np.diag(h)
    xh = x @ h
    for _ in range(iterations):  # polish: each sweep can only lower the objective
        for j in range(k):
            new = np.clip(x[:, j] + (g[:, j] - xh[:, j]) / diag[j], lo[j], hi[j])
            step = new - x[:, j]
            xh += step[:, None] * h[j][None, :]
            x[:, j] = new
    return x


def _alternation_fixed_point(ba: np.ndarray, bg: np.ndarray, dv: np.ndarray) -> np.ndarray:
    """AU part of the fixed point of the unbounded alternation (closed form).

    g = (d_iris − a A_iris) P_g and a = (d_rest − g G_rest) P_a with least-squares projectors
    P; substituting gives a (I − A_iris P_g G_rest P_a) = d_rest P_a − d_iris P_g G_rest P_a.
    """
    a_i, a_r = ba[:, IRIS_DIMS], ba[:, NON_IRIS_DIMS]
    g_i, g_r = bg[:, IRIS_DIMS], bg[:, NON_IRIS_DIMS]
    p_g = np.linalg.pinv(g_i)  # iris dims x 2
    p_a = np.linalg.pinv(a_r)  # rest dims x k
    m = p_g @ g_r @ p_a  # iris dims x k
    lhs = np.eye(len(ba)) - a_i @ m
    rhs = dv[:, NON_IRIS_DIMS] @ p_a - dv[:, IRIS_DIMS] @ m
    return np.linalg.solve(lhs.T, rhs.T).T


def lid_au45_gain(model: LinearFaceModel, baseline: Baseline) -> np.ndarray:
    """AU45 units per unit of AU41, per eye: rest lid-iris gap (c0·r) / upper-lid drop per AU45."""
    gains = np.zeros(2)
    for e, side in enumerate(("left", "right")):
        mid = keypoint_slice(f"{side}_eye").start + EYE_UPPER_MID
        drop = -model.basis_au[FIT_AUS.index(f"AU45{side[0].upper()}"), mid * 3 + 1]
        gap = baseline.lid_above_iris[e] * baseline.iris_radius[e]
        gains[e] = gap / drop if drop > 1e-6 else 0.0
    return gains


def solve_frames(
    canon: np.ndarray,
    head_pose: np.ndarray,
    model: LinearFaceModel,
    baseline: Baseline,
    settings: InversionSettings,
    nuisance: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame bounded solve. canon: T x 62 x 3 (NaN rows allowed); head_pose T x 3 and nuisance
    T x len(NUISANCE_TERMS) are known (None: at the identity's rest, as in keypoints made by
    mapping.py, which has no blendshapes; a NaN row is taken as at rest too).

    Returns (fitted AU values T x 9 in [0, 1], signed gaze T x 2 in [-1, 1], residual error T
    = mean keypoint distance to the model's reconstruction, IOD units).
    """
    t = len(canon)
    model = model.for_identity(baseline)
    d = canon.reshape(t, N_DIMS) - baseline.keypoints.reshape(N_DIMS)
    d = d - pose_terms(head_pose, baseline) @ model.basis_pose  # pose is known: remove its part
    if nuisance is not None:  # so are the nuisance blendshapes; a frame without them counts as at rest
        d = d - np.nan_to_num(nuisance_terms(nuisance, baseline)) @ model.basis_nuisance
    ok = np.all(np.isfinite(d), axis=1)
    w = np.sqrt(row_weights(settings.z_weight))
    au = np.full((t, len(FIT_AUS)), np.nan)
    gz = np.full((t, 2), np.nan)
    err = np.full(t, np.nan)
    if not ok.any():
        return au, gz, err
    dv = d[ok] * w
    bg = model.basis_gaze * w
    ba = model.basis_au * w
    # gaze from the iris points, then AUs from lids and brows with the gaze part removed; the
    # iris points also move a little with the lids, so alternate a few rounds (the true
    # controls are the fixed point, which makes this the exact inverse of mapping.py)
    g_lo, g_hi = -1.0 - baseline.gaze, 1.0 - baseline.gaze
    rest_au = baseline.au[list(FIT_AU_INDEX)]
    da = np.clip(_alternation_fixed_point(ba, bg, dv), -rest_au, 1.0 - rest_au)  # start: unconstrained fixed point
    for _ in range(settings.rounds):
        dg = solve_box_ls(bg[:, IRIS_DIMS], (dv - da @ ba)[:, IRIS_DIMS], g_lo, g_hi, settings.iterations)
        resid = dv - dg @ bg
        da = solve_box_ls(ba[:, NON_IRIS_DIMS], resid[:, NON_IRIS_DIMS], -rest_au, 1.0 - rest_au, settings.iterations)
    au[ok] = rest_au + da
    gz[ok] = baseline.gaze + dg
    recon = (da @ model.basis_au + dg @ model.basis_gaze).reshape(-1, 62, 3)
    err[ok] = np.linalg.norm(recon - d[ok].reshape(-1, 62, 3), axis=2).mean(axis=1)
    return au, gz, err


def au41_over_time(
    lid_above_iris: np.ndarray,
    blinking: np.ndarray,
    gaze_down: np.ndarray,
    baseline: Baseline,
    settings: InversionSettings,
) -> np.ndarray:
    """AU41 per frame (T), mean of both eyes: DESIGN.md's clip((c0 − c_t)/c0, 0, 1).

    lid_above_iris: T x 2 (left, right) c_t; computed only where no blink is under way (blink
    frames are interpolated), the part explained by gaze_down regressed out, smoothed ~300 ms.
    """
    t = len(lid_above_iris)
    if t == 0:
        return np.zeros(0)
    c0 = baseline.lid_above_iris
    raw = (c0[None, :] - lid_above_iris) / np.where(np.abs(c0) > 1e-6, c0, 1e-6)[None, :]
    raw = raw.mean(axis=1)
    valid = np.isfinite(raw) & ~blinking
    raw = np.where(valid, raw, np.nan)
    gd = np.nan_to_num(gaze_down)
    if settings.au41_gaze_regress and valid.sum() >= 5 and np.var(gd[valid]) > 1e-6:
        beta = max(0.0, float(np.cov(raw[valid], gd[valid])[0, 1] / np.var(gd[valid])))
        raw = raw - beta * gd
    raw = fill_gaps(raw)
    dz = settings.au41_deadzone
    return np.clip((moving_average(raw, settings.au41_smooth_frames) - dz) / (1.0 - dz), 0.0, 1.0)


def invert_clip(
    canon: np.ndarray,
    head_pose: np.ndarray,
    lid_above_iris: np.ndarray,
    model: LinearFaceModel,
    baseline: Baseline,
    settings: InversionSettings,
    nuisance: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Controls T x 17 (DESIGN order; NaN where no face) and residual error T (IOD units).
    ``nuisance``: the known nuisance blendshapes (solve_frames)."""
    t = len(canon)
    controls = np.full((t, N_CHANNELS), np.nan, dtype=np.float64)
    au, gz, err = solve_frames(canon, head_pose, model, baseline, settings, nuisance)
    ok = np.isfinite(err)
    controls[:, list(FIT_AU_INDEX)] = au
    rect = rectify_gaze(gz)
    controls[:, CHANNEL_INDEX["gaze_left"] : CHANNEL_INDEX["gaze_down"] + 1] = rect
    controls[:, CHANNEL_INDEX["yaw"] :] = head_pose
    if ok.any():
        rest45 = baseline.au[list(AU45)]
        blinking = np.any(au[:, [FIT_AUS.index("AU45L"), FIT_AUS.index("AU45R")]] - rest45 > settings.blink_au45_delta, axis=1)
        blinking = blinking | ~ok
        a41 = au41_over_time(lid_above_iris, blinking, rect[:, 3], baseline, settings)
        gains = lid_au45_gain(model, baseline)
        for e, ch in enumerate(AU45):
            controls[:, ch] = np.clip(controls[:, ch] - gains[e] * a41, 0.0, 1.0)
        controls[:, AU41] = a41
    controls[~ok, :14] = np.nan
    return controls, err
