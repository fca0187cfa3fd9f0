"""Stage-1 metrics of the paper (§4.1): AU-F1 (Eq. 6), AU-Temp (Eq. 7) and Eye-LMD.

All three compare a predicted control/keypoint sequence with a reference one (in the
leave-one-clip-out evaluation: the compiled sequence against the clip's real one). Pure numpy.

Choices the paper leaves open, fixed here:

- **Activation above rest.** Eq. 6 reads a_u = 1[max_t A_u(t) > τ_u]. Our controls rest well above
  0 and differently per identity (DESIGN.md: eyeBlink rest 0.01–0.41), so activation is measured
  above the identity's rest: a_u = 1[max_t (A_u(t) − rest_u) > τ_u]. ``rest=None`` means rest 0,
  the paper's literal definition. Head angles are signed, so a head channel counts as active when
  it leaves its rest by more than τ in *either* direction (``two_sided``).
- **AU-F1 degenerate cases.** Nothing active on either side: 1.0 (the prediction agrees that
  nothing happens). Exactly one side empty: 0.0 (precision or recall is 0/0 and the other is 0).
- **DTW.** Cost |a_i − b_j|, steps (1,0), (0,1), (1,1), the minimal total cost divided by
  max(len a, len b): a mean absolute deviation per step of the longer sequence, in the signal's
  units. For equal lengths it never exceeds the frame-wise mean |a_t − b_t| (the diagonal is one
  admissible path). Unconstrained by default, as in the paper; ``window`` adds a Sakoe–Chiba band
  (in frames of the longer sequence) when timing should count, not only shape.
- **Z_u of AU-Temp.** Z_u = DTW(flat at mean(ref_u), ref_u) with the flat sequence as long as the
  reference, so a perfect copy scores exactly 1 and a flat prediction at the reference's mean
  (of the reference's length, or shorter) scores exactly 0. That DTW has a closed form: every
  reference frame is matched at least once and a flat sequence costs the same wherever it is
  matched, so Z_u = mean_t |ref_u(t) − mean(ref_u)| (tested against the DP).
  Each channel's score is floored at 0 before the mean (``floor``): a prediction no closer than a
  flat line earns nothing on that channel, but cannot take away what the other channels earned.
  Unfloored, a reference channel that barely moves (small Z_u) turns any motion into a large
  negative number (−4 on a sample clip whose brows never move) that swamps the mean; the
  unfloored mean is reported beside it (``au_temp_unclipped``) and ``floor=None`` gives it. A channel whose reference is flat (Z_u ≤ ``z_min``) has no trajectory to
  follow: it scores 1 if the prediction's DTW to it is also ≤ ``z_min``, else 0.
- **Missing frames.** Real clips carry NaN where no face was found: activations use the finite
  frames, DTW drops non-finite frames per channel (DTW needs no equal lengths), Eye-LMD averages
  over frames finite in both sequences.
- **Eye-LMD.** Mean L2 distance over the 62 keypoints, x and y only, in crop units [0, 1]
  (DESIGN.md), over frame-aligned sequences: different lengths raise ValueError (keypoints are not
  time-warped; the compiler produces exactly the clip's frame count).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from cogportrait.face.model import Baseline
from cogportrait.face.proxies import rectify_gaze
from cogportrait.schema import AU_CHANNELS, CHANNEL_INDEX, CONTROL_CHANNELS, HEAD_CHANNELS, N_CHANNELS, N_KEYPOINTS

Z_MIN = 1e-6  # below this a reference channel counts as flat (units of the channel)


# ----------------------------------------------------------------------------------------------
# AU-F1 (Eq. 6)
# ----------------------------------------------------------------------------------------------
def au_activations(
    traj: np.ndarray,
    rest: np.ndarray | None,
    thresholds: np.ndarray,
    two_sided: np.ndarray | None = None,
) -> np.ndarray:
    """Binary activations a_u = 1[max_t (A_u(t) − rest_u) > τ_u] of a T x U trajectory -> (U,) bool.

    ``rest=None`` is rest 0 (the paper's literal definition). ``two_sided`` (U,) marks signed
    channels (head angles) that are active when |A_u(t) − rest_u| exceeds τ_u. Non-finite frames
    are ignored; a channel with no finite frame is inactive.
    """
    a = np.asarray(traj, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"trajectory must be T x U, got shape {a.shape}")
    tau = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if tau.shape[0] != a.shape[1]:
        raise ValueError(f"{tau.shape[0]} thresholds for {a.shape[1]} channels")
    r = np.zeros(a.shape[1]) if rest is None else np.asarray(rest, dtype=np.float64).reshape(-1)
    if r.shape[0] != a.shape[1]:
        raise ValueError(f"rest has {r.shape[0]} values for {a.shape[1]} channels")
    dev = a - r[None, :]
    if two_sided is not None:
        both = np.asarray(two_sided, dtype=bool).reshape(-1)
        dev[:, both] = np.abs(dev[:, both])
    dev = np.where(np.isfinite(dev), dev, -np.inf)
    peak = dev.max(axis=0) if len(dev) else np.full(a.shape[1], -np.inf)
    return peak > tau


def f1_from_activations(pred: np.ndarray, ref: np.ndarray) -> float:
    """Eq. 6 on two (U,) bool vectors; both empty -> 1.0, one side empty -> 0.0."""
    p, r = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    n_pred, n_ref, hits = int(p.sum()), int(r.sum()), int((p & r).sum())
    if n_pred == 0 and n_ref == 0:
        return 1.0
    if hits == 0:  # covers one side empty: P or R is 0/0 and the other 0
        return 0.0
    precision, recall = hits / n_pred, hits / n_ref
    return 2 * precision * recall / (precision + recall)


def au_f1(
    pred: np.ndarray,
    ref: np.ndarray,
    rest_pred: np.ndarray | None,
    rest_ref: np.ndarray | None,
    thresholds: np.ndarray,
    two_sided: np.ndarray | None = None,
) -> float:
    """AU-F1 (Eq. 6) over the U channels of T x U trajectories (lengths may differ)."""
    return f1_from_activations(
        au_activations(pred, rest_pred, thresholds, two_sided), au_activations(ref, rest_ref, thresholds, two_sided)
    )


# ----------------------------------------------------------------------------------------------
# DTW and AU-Temp (Eq. 7)
# ----------------------------------------------------------------------------------------------
def _band(n_rows: int, n_cols: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Sakoe–Chiba band around the (scaled) diagonal: per row the first and last allowed column."""
    if n_rows == 1:
        centre = np.zeros(1)
    else:
        centre = np.arange(n_rows) * (n_cols - 1) / (n_rows - 1)
    lo = np.clip(np.floor(centre - window), 0, n_cols - 1).astype(int)
    hi = np.clip(np.ceil(centre + window), 0, n_cols - 1).astype(int)
    return lo, hi


def dtw_total(a: np.ndarray, b: np.ndarray, window: int | None = None) -> float:
    """Minimal total |a_i − b_j| cost of a DTW path from (0, 0) to (n−1, m−1).

    One numpy pass per row: with m_j = min(D[i−1, j], D[i−1, j−1]) and S the row's cumulative
    cost, D[i, j] = min_{k ≤ j} (m_k + S_j − S_{k−1}) = S_j + cummin(m − S_prev)_j, so the
    in-row dependency D[i, j−1] becomes a running minimum (1500 x 1500 in a few tens of ms).
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.size == 0 or b.size == 0:
        raise ValueError("DTW of an empty sequence")
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise ValueError("DTW needs finite values")
    if a.size < b.size:  # rows = the longer sequence: fewer, longer numpy passes
        a, b = b, a
    n, m = a.size, b.size
    inf = np.inf
    if window is not None:
        if window < 0:
            raise ValueError(f"window must be >= 0, got {window}")
        lo, hi = _band(n, m, window)
    cols = np.arange(m)
    cost = np.abs(b[None, :] - a[:, None]) if n * m <= 4_000_000 else None
    row_cost = (lambda i: cost[i]) if cost is not None else (lambda i: np.abs(b - a[i]))
    prev = np.cumsum(row_cost(0))
    if window is not None:
        prev[cols > hi[0]] = inf
    shifted = np.empty(m)
    for i in range(1, n):
        c = row_cost(i)
        shifted[0] = inf
        shifted[1:] = prev[:-1]
        mk = np.minimum(prev, shifted)
        if window is not None:
            mk[(cols < lo[i]) | (cols > hi[i])] = inf
        s = np.cumsum(c)
        prev = s + np.minimum.accumulate(mk - (s - c))
        if window is not None:
            prev[(cols < lo[i]) | (cols > hi[i])] = inf
    return float(prev[-1])


def dtw_distance(a: np.ndarray, b: np.ndarray, window: int | None = None) -> float:
    """DTW distance: minimal total |a_i − b_j| path cost / max(len a, len b) (see module docstring).

    ``window`` (frames, optional) is a Sakoe–Chiba band around the length-scaled diagonal.
    """
    total = dtw_total(a, b, window)
    return total / max(np.size(a), np.size(b))


def flat_dtw(ref: np.ndarray) -> float:
    """Z = DTW(flat at mean(ref), ref) for a flat sequence of ref's length: mean |ref − mean(ref)|."""
    r = np.asarray(ref, dtype=np.float64).reshape(-1)
    return float(np.mean(np.abs(r - r.mean())))


def _finite(x: np.ndarray) -> np.ndarray:
    return x[np.isfinite(x)]


def au_temp_per_channel(
    pred: np.ndarray,
    ref: np.ndarray,
    channels: Sequence[int],
    rest_pred: np.ndarray | None = None,
    rest_ref: np.ndarray | None = None,
    window: int | None = None,
    z_min: float = Z_MIN,
) -> np.ndarray:
    """Per-channel 1 − DTW(pred_u, ref_u)/Z_u for u in ``channels`` (T1 x U and T2 x U inputs).

    Rests, when given, are subtracted first so that two identities' different rest levels do not
    count as a trajectory error (Z_u is unchanged by the shift).
    """
    p = np.asarray(pred, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    if p.ndim != 2 or r.ndim != 2 or p.shape[1] != r.shape[1]:
        raise ValueError(f"pred and ref must be T x U with the same U, got {p.shape} and {r.shape}")
    if rest_pred is not None:
        p = p - np.asarray(rest_pred, dtype=np.float64).reshape(1, -1)
    if rest_ref is not None:
        r = r - np.asarray(rest_ref, dtype=np.float64).reshape(1, -1)
    scores = np.empty(len(channels))
    for k, u in enumerate(channels):
        pu, ru = _finite(p[:, u]), _finite(r[:, u])
        if ru.size == 0 or pu.size == 0:
            raise ValueError(f"channel {u} has no finite frame in the {'reference' if ru.size == 0 else 'prediction'}")
        d = dtw_distance(pu, ru, window)
        z = flat_dtw(ru)
        scores[k] = (1.0 if d <= z_min else 0.0) if z <= z_min else 1.0 - d / z
    return scores


def au_temp(
    pred: np.ndarray,
    ref: np.ndarray,
    channels: Sequence[int],
    rest_pred: np.ndarray | None = None,
    rest_ref: np.ndarray | None = None,
    window: int | None = None,
    z_min: float = Z_MIN,
    floor: float | None = 0.0,
) -> float:
    """AU-Temp (Eq. 7): 1 − mean_{u ∈ S_y} DTW(pred_u, ref_u)/Z_u; 1 = perfect copy, 0 = flat at the mean.

    Each channel's term is floored at ``floor`` (module docstring); ``floor=None`` leaves worse than
    flat negative. An empty S_y raises ValueError.
    """
    if len(channels) == 0:
        raise ValueError("AU-Temp needs at least one target channel (S_y is empty)")
    return au_temp_mean(au_temp_per_channel(pred, ref, channels, rest_pred, rest_ref, window, z_min), floor)


def au_temp_mean(per_channel: np.ndarray, floor: float | None = 0.0) -> float:
    """Eq. 7's mean over S_y of the per-channel terms, each floored at ``floor`` (None: unfloored)."""
    per = np.asarray(per_channel, dtype=np.float64)
    return float(np.mean(per if floor is None else np.maximum(per, floor)))


# ----------------------------------------------------------------------------------------------
# Eye-LMD
# ----------------------------------------------------------------------------------------------
def eye_lmd(pred: np.ndarray, ref: np.ndarray, centred: bool = False) -> float:
    """Mean L2 distance over the 62 keypoints (x, y only, crop units), frame-aligned.

    Frames non-finite in either sequence are skipped; no comparable frame raises ValueError.
    ``centred`` first moves each frame's 62 points to a common centroid. Why: the face drifts
    inside a real clip's smoothed crop (measured on the sample: Π of a clip's own controls is
    0.05 off in crop units, 0.004-0.010 centred), and no control channel carries that drift, so
    the centred distance is the one that measures the eye-region shape, gaze and rotation.
    """
    p = np.asarray(pred, dtype=np.float64)
    r = np.asarray(ref, dtype=np.float64)
    for name, x in (("pred", p), ("ref", r)):
        if x.ndim != 3 or x.shape[1] != N_KEYPOINTS or x.shape[2] not in (2, 3):
            raise ValueError(f"{name} keypoints must be T x {N_KEYPOINTS} x 2|3, got {x.shape}")
    if len(p) != len(r):
        raise ValueError(f"Eye-LMD compares frame-aligned sequences: {len(p)} predicted frames vs {len(r)} reference frames")
    p, r = p[..., :2], r[..., :2]
    if centred:
        p = p - p.mean(axis=1, keepdims=True)
        r = r - r.mean(axis=1, keepdims=True)
    dist = np.linalg.norm(p - r, axis=-1)  # T x 62
    ok = np.all(np.isfinite(dist), axis=1)
    if not ok.any():
        raise ValueError("Eye-LMD: no frame with finite keypoints in both sequences")
    return float(dist[ok].mean())


# ----------------------------------------------------------------------------------------------
# The three together
# ----------------------------------------------------------------------------------------------
def rest_controls(baseline: Baseline) -> np.ndarray:
    """An identity's rest as a 17-control vector: AU rests, rectified rest gaze, rest head pose."""
    rest = np.zeros(N_CHANNELS)
    rest[: len(AU_CHANNELS)] = np.asarray(baseline.au, dtype=np.float64)[: len(AU_CHANNELS)]
    g0 = CHANNEL_INDEX["gaze_left"]
    rest[g0 : g0 + 4] = rectify_gaze(np.asarray(baseline.gaze, dtype=np.float64))
    h0 = CHANNEL_INDEX["yaw"]
    rest[h0 : h0 + 3] = np.asarray(baseline.head_pose, dtype=np.float64)
    return rest


@dataclass(frozen=True)
class Stage1Scores:
    """AU-F1, AU-Temp and Eye-LMD of one compiled sequence against its reference, with details."""

    au_f1: float
    au_temp: float
    eye_lmd: float
    au_temp_unclipped: float = float("nan")  # the mean without the per-channel floor at 0
    eye_lmd_centred: float = float("nan")  # each frame's points centred first (no crop drift)
    au_temp_channels: dict[str, float] = field(default_factory=dict)  # per target channel
    pred_active: tuple[str, ...] = ()
    ref_active: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        out = asdict(self)
        out["pred_active"], out["ref_active"] = list(self.pred_active), list(self.ref_active)
        return out


def _channel_indices(names: Sequence[str | int]) -> list[int]:
    out = []
    for name in names:
        if isinstance(name, (int, np.integer)):
            if not 0 <= int(name) < N_CHANNELS:
                raise ValueError(f"channel index {name} outside 0..{N_CHANNELS - 1}")
            out.append(int(name))
        elif name in CHANNEL_INDEX:
            out.append(CHANNEL_INDEX[name])
        else:
            raise ValueError(f"unknown channel {name!r}; channels: {', '.join(CONTROL_CHANNELS)}")
    return out


def score_stage1(
    pred_controls: np.ndarray,
    ref_controls: np.ndarray,
    pred_kps: np.ndarray,
    ref_kps: np.ndarray,
    target_channels: Sequence[str | int],
    thresholds: Mapping[str, float],
    rest_pred: np.ndarray | None = None,
    rest_ref: np.ndarray | None = None,
    dtw_window: int | None = None,
) -> Stage1Scores:
    """Score T x 17 controls and T x 62 x 2|3 keypoints against a reference.

    ``target_channels`` is S_y (AU-Temp); ``thresholds`` maps each channel of AU-F1's set U to its
    τ_u (U = the mapping's keys, so the category data decides which channels count); rests are
    17-vectors (``rest_controls``) or None (rest 0). An empty S_y gives AU-Temp NaN (nothing to
    score) rather than an error, so one free-text clip does not stop an evaluation.
    """
    pc = np.asarray(pred_controls, dtype=np.float64).reshape(-1, N_CHANNELS)
    rc = np.asarray(ref_controls, dtype=np.float64).reshape(-1, N_CHANNELS)
    rp = None if rest_pred is None else np.asarray(rest_pred, dtype=np.float64).reshape(N_CHANNELS)
    rr = None if rest_ref is None else np.asarray(rest_ref, dtype=np.float64).reshape(N_CHANNELS)
    names = list(thresholds)
    u = _channel_indices(names)
    tau = np.array([float(thresholds[n]) for n in names])
    two_sided = np.array([CONTROL_CHANNELS[i] in HEAD_CHANNELS for i in u], dtype=bool)
    act_p = au_activations(pc[:, u], None if rp is None else rp[u], tau, two_sided)
    act_r = au_activations(rc[:, u], None if rr is None else rr[u], tau, two_sided)
    s = _channel_indices(target_channels)
    per = au_temp_per_channel(pc, rc, s, rp, rr, dtw_window)
    return Stage1Scores(
        au_f1=f1_from_activations(act_p, act_r),
        au_temp=au_temp_mean(per, floor=0.0) if len(s) else float("nan"),
        au_temp_unclipped=au_temp_mean(per, floor=None) if len(s) else float("nan"),
        eye_lmd=eye_lmd(pred_kps, ref_kps),
        eye_lmd_centred=eye_lmd(pred_kps, ref_kps, centred=True),
        au_temp_channels={CONTROL_CHANNELS[i]: float(v) for i, v in zip(s, per)},
        pred_active=tuple(CONTROL_CHANNELS[i] for i, on in zip(u, act_p) if on),
        ref_active=tuple(CONTROL_CHANNELS[i] for i, on in zip(u, act_r) if on),
    )
