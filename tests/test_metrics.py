"""Stage-1 metrics (paper §4.1, Eq. 6 and 7) on hand-computed cases."""

from __future__ import annotations

import time

import numpy as np
import pytest

from cogportrait.face.model import Baseline
from cogportrait.metrics import (
    au_activations,
    au_f1,
    au_temp,
    au_temp_per_channel,
    dtw_distance,
    dtw_total,
    eye_lmd,
    f1_from_activations,
    flat_dtw,
    rest_controls,
    score_stage1,
)
from cogportrait.metrics.stage1 import _band
from cogportrait.schema import CHANNEL_INDEX, N_CHANNELS, N_KEYPOINTS


def _naive_dtw(a, b, window=None):
    """Textbook O(nm) DTW with explicit loops (a is the longer sequence when a window is used)."""
    n, m = len(a), len(b)
    d = np.full((n + 1, m + 1), np.inf)
    d[0, 0] = 0.0
    lo, hi = _band(n, m, window) if window is not None else (np.zeros(n, int), np.full(n, m - 1))
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            if lo[i - 1] <= j - 1 <= hi[i - 1]:
                d[i, j] = abs(a[i - 1] - b[j - 1]) + min(d[i - 1, j], d[i, j - 1], d[i - 1, j - 1])
    return d[n, m]


# -- DTW ---------------------------------------------------------------------------------------
def test_dtw_tiny_sequences_by_hand():
    # cost |a_i - b_j| for a = [0, 1, 2], b = [0, 2]:  rows (0 2) (1 1) (2 0)
    # D: (0 2) (1 1) (3 1): total 1 along (0,0) (1,0) (2,1) — or (1,1) — divided by max(3, 2)
    assert dtw_total([0, 1, 2], [0, 2]) == pytest.approx(1.0)
    assert dtw_distance([0, 1, 2], [0, 2]) == pytest.approx(1 / 3)
    # a repeated sample is warped away at no cost
    assert dtw_distance([0, 0, 1], [0, 1, 1]) == pytest.approx(0.0)
    # reversal: D rows (2 3 3) (3 2 3) (3 3 4) -> total 4
    assert dtw_total([1, 2, 3], [3, 2, 1]) == pytest.approx(4.0)
    assert dtw_distance([1, 2, 3], [3, 2, 1]) == pytest.approx(4 / 3)
    # symmetric, zero on itself, single samples
    assert dtw_total([3, 2, 1], [1, 2, 3]) == pytest.approx(4.0)
    assert dtw_distance([5.0], [2.0, 3.0]) == pytest.approx((3 + 2) / 2)


def test_dtw_matches_the_textbook_recursion():
    rng = np.random.default_rng(0)
    for _ in range(60):
        a = rng.normal(size=rng.integers(1, 25))
        b = rng.normal(size=rng.integers(1, 25))
        assert dtw_total(a, b) == pytest.approx(_naive_dtw(a, b), abs=1e-9)
        long, short = (a, b) if len(a) >= len(b) else (b, a)
        w = int(rng.integers(0, 5))
        assert dtw_total(a, b, window=w) == pytest.approx(_naive_dtw(long, short, w), abs=1e-9)


def test_dtw_window():
    a = np.array([0.0, 0, 0, 1, 0, 0, 0, 0])
    b = np.array([0.0, 0, 0, 0, 0, 0, 1, 0])  # the same peak 3 frames later
    assert dtw_distance(a, b) == pytest.approx(0.0)  # unconstrained DTW forgives the delay
    assert dtw_distance(a, b, window=0) == pytest.approx(2 / 8)  # the diagonal: two unit misses
    assert dtw_distance(a, b, window=3) == pytest.approx(0.0)
    assert dtw_distance(a, b, window=len(a)) == pytest.approx(dtw_distance(a, b))
    with pytest.raises(ValueError):
        dtw_distance(a, b, window=-1)
    with pytest.raises(ValueError):
        dtw_distance([], [1.0])
    with pytest.raises(ValueError):
        dtw_distance([np.nan], [1.0])


def test_dtw_is_fast_enough_for_a_minute():
    rng = np.random.default_rng(1)
    a, b = rng.random(1500), rng.random(1400)
    t0 = time.perf_counter()
    dtw_distance(a, b)
    assert time.perf_counter() - t0 < 1.0


def test_flat_dtw_is_the_closed_form_of_the_dp():
    rng = np.random.default_rng(2)
    for _ in range(20):
        r = rng.normal(size=rng.integers(1, 40))
        assert flat_dtw(r) == pytest.approx(dtw_distance(np.full(len(r), r.mean()), r), abs=1e-12)
        # a shorter flat sequence at the mean costs the same
        k = int(rng.integers(1, len(r) + 1))
        assert flat_dtw(r) == pytest.approx(dtw_distance(np.full(k, r.mean()), r), abs=1e-12)
    assert flat_dtw([1.0, 3.0]) == pytest.approx(1.0)


# -- AU-F1 -------------------------------------------------------------------------------------
def test_activations_above_rest():
    traj = np.array([[0.30, 0.30, 0.30], [0.55, 0.45, 0.35], [0.40, 0.30, 0.30]])
    tau = np.array([0.2, 0.2, 0.2])
    # paper's literal definition (rest 0): every peak is above 0.2
    assert au_activations(traj, None, tau).tolist() == [True, True, True]
    # above a rest of 0.3: peaks 0.25, 0.15, 0.05
    assert au_activations(traj, np.full(3, 0.3), tau).tolist() == [True, False, False]
    # two-sided channels count a drop below rest
    down = np.array([[0.0], [-0.3]])
    assert au_activations(down, None, [0.2]).tolist() == [False]
    assert au_activations(down, None, [0.2], two_sided=[True]).tolist() == [True]
    # NaN frames are ignored; an all-NaN channel is inactive
    nan = np.array([[np.nan, np.nan], [0.5, np.nan]])
    assert au_activations(nan, None, [0.2, 0.2]).tolist() == [True, False]
    with pytest.raises(ValueError):
        au_activations(traj, None, [0.2, 0.2])


def test_au_f1_three_channels_by_hand():
    tau = np.array([0.2, 0.2, 0.2])
    rest = np.full(3, 0.3)
    # pred active on 0, 1 (peaks 0.6, 0.55; channel 2 peaks 0.45 = only 0.15 above rest)
    pred = np.array([[0.3, 0.3, 0.3], [0.6, 0.55, 0.45], [0.3, 0.3, 0.3], [0.3, 0.3, 0.3]])
    # ref active on all three, over 5 frames (lengths may differ)
    ref = np.array([[0.3, 0.3, 0.3], [0.3, 0.6, 0.3], [0.7, 0.3, 0.3], [0.3, 0.3, 0.9], [0.3, 0.3, 0.3]])
    # P = 2/2, R = 2/3, F1 = 2 * 1 * 2/3 / (5/3) = 0.8
    assert au_f1(pred, ref, rest, rest, tau) == pytest.approx(0.8)
    # with the literal rest 0 the prediction's channel 2 (0.45 > 0.2) counts too: P = R = 1
    assert au_f1(pred, ref, None, None, tau) == pytest.approx(1.0)
    # disjoint: pred {0}, ref {1, 2}
    assert f1_from_activations([True, False, False], [False, True, True]) == 0.0
    # P = 1/2, R = 1/2
    assert f1_from_activations([True, True, False], [False, True, True]) == pytest.approx(0.5)


def test_au_f1_degenerate_cases():
    assert f1_from_activations([False, False], [False, False]) == 1.0  # both quiet: agreement
    assert f1_from_activations([True, False], [False, False]) == 0.0  # pred fires, ref does not
    assert f1_from_activations([False, False], [False, True]) == 0.0  # pred misses everything


# -- AU-Temp -----------------------------------------------------------------------------------
def _slow_rise_fast_fall(n=60):
    x = np.zeros(n)
    x[10:30] = np.linspace(0.0, 1.0, 20)  # 0.8 s rise
    x[30:33] = [0.66, 0.33, 0.0]  # 0.12 s fall
    return x


def test_au_temp_perfect_copy_and_flat():
    ref = np.stack([_slow_rise_fast_fall(), np.sin(np.linspace(0, 6, 60))], axis=1)
    assert au_temp(ref, ref, [0, 1]) == pytest.approx(1.0)
    flat = np.broadcast_to(ref.mean(axis=0), ref.shape)
    assert au_temp(flat, ref, [0, 1]) == pytest.approx(0.0, abs=1e-12)
    # the opposite trajectory
    anti = 2 * ref.mean(axis=0) - ref
    assert au_temp(anti, ref, [1], floor=None) < 0.0  # worse than flat: negative unfloored ...
    assert au_temp(anti, ref, [1]) == 0.0  # ... and worth nothing floored


def test_au_temp_time_reversal_scores_lower():
    x = _slow_rise_fast_fall()
    ref = x[:, None]
    rev = x[::-1, None]
    original = au_temp(ref, ref, [0])
    reversed_ = au_temp(rev, ref, [0])
    assert reversed_ < original - 0.05
    # DTW forgives timing, not shape: a delayed copy keeps almost all its score, the reversal does not
    delayed = np.roll(x, 5)[:, None]
    assert au_temp(delayed, ref, [0]) > reversed_
    # a band makes timing count as well
    assert au_temp(rev, ref, [0], window=3) < reversed_


def test_au_temp_rest_offsets_and_lengths():
    x = _slow_rise_fast_fall()
    ref = x[:, None]
    shifted = (x + 0.25)[:, None]  # same movement from another identity's higher rest
    assert au_temp(shifted, ref, [0]) < 1.0
    assert au_temp(shifted, ref, [0], rest_pred=[0.25], rest_ref=[0.0]) == pytest.approx(1.0)
    # twice as slow, same shape: DTW aligns it almost perfectly
    slow = np.repeat(x, 2)[:, None]
    assert au_temp(slow, ref, [0]) > 0.95
    # NaN frames (no face) are dropped per channel
    gappy = ref.copy()
    gappy[40:45] = np.nan
    assert au_temp(gappy, ref, [0]) == pytest.approx(1.0)


def test_au_temp_flat_reference_guard():
    flat_ref = np.full((20, 1), 0.4)
    assert au_temp(flat_ref.copy(), flat_ref, [0]) == 1.0
    assert au_temp(flat_ref + 0.1, flat_ref, [0]) == 0.0
    per = au_temp_per_channel(np.hstack([flat_ref, flat_ref]), np.hstack([flat_ref, flat_ref + 0.0]), [0, 1])
    assert per.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError):
        au_temp(flat_ref, flat_ref, [])


# -- Eye-LMD -----------------------------------------------------------------------------------
def test_eye_lmd_known_shift():
    rng = np.random.default_rng(3)
    ref = rng.random((10, N_KEYPOINTS, 3))
    pred = ref.copy()
    pred[..., 0] += 0.03
    pred[..., 1] -= 0.04
    pred[..., 2] += 0.5  # z is not part of Eye-LMD
    assert eye_lmd(pred, ref) == pytest.approx(0.05)
    assert eye_lmd(pred[..., :2], ref) == pytest.approx(0.05)  # 2-D against 3-D
    # only half the points move by 0.1: mean 0.05
    half = ref.copy()
    half[:, :31, 0] += 0.1
    assert eye_lmd(half, ref) == pytest.approx(0.05)
    # a frame without a face is skipped
    gappy = pred.copy()
    gappy[4] = np.nan
    assert eye_lmd(gappy, ref) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="frame-aligned"):
        eye_lmd(pred[:9], ref)
    with pytest.raises(ValueError):
        eye_lmd(pred[:, :60], ref[:, :60])


# -- together ----------------------------------------------------------------------------------
def test_rest_controls_from_a_baseline():
    b = Baseline("x", np.zeros((N_KEYPOINTS, 3)), np.arange(10) * 0.1, np.array([0.2, -0.1]), np.ones(2), np.ones(2),
                 np.array([5.0, -3.0, 1.0]))
    rest = rest_controls(b)
    assert rest.shape == (N_CHANNELS,)
    assert rest[CHANNEL_INDEX["AU45R"]] == pytest.approx(0.9)
    assert rest[CHANNEL_INDEX["gaze_left"]] == pytest.approx(0.2)  # + horizontal = toward the subject's left
    assert rest[CHANNEL_INDEX["gaze_down"]] == pytest.approx(0.1)
    assert rest[CHANNEL_INDEX["gaze_right"]] == 0.0 and rest[CHANNEL_INDEX["gaze_up"]] == 0.0
    assert rest[CHANNEL_INDEX["pitch"]] == pytest.approx(-3.0)


def test_score_stage1_bundles_the_three():
    t = 60
    ref = np.zeros((t, N_CHANNELS))
    ref[:, CHANNEL_INDEX["AU45L"]] = _slow_rise_fast_fall(t)
    ref[:, CHANNEL_INDEX["AU45R"]] = _slow_rise_fast_fall(t)
    ref[:, CHANNEL_INDEX["pitch"]] = -np.linspace(0, 12, t)  # lowers the head
    pred = ref.copy()
    pred[:, CHANNEL_INDEX["AU1"]] = 0.5  # an extra brow raise the reference lacks
    kps = np.full((t, N_KEYPOINTS, 3), 0.5)
    thresholds = {"AU1": 0.2, "AU45L": 0.3, "AU45R": 0.3, "pitch": 5.0}
    scores = score_stage1(pred, ref, kps + [0.0, 0.01, 0.0], kps, ["AU45L", "AU45R", "pitch"], thresholds)
    assert scores.ref_active == ("AU45L", "AU45R", "pitch")  # pitch: a drop counts (two-sided)
    assert scores.pred_active == ("AU1", "AU45L", "AU45R", "pitch")
    assert scores.au_f1 == pytest.approx(2 * 0.75 * 1.0 / 1.75)
    assert scores.au_temp == pytest.approx(1.0)
    assert scores.eye_lmd == pytest.approx(0.01)
    assert set(scores.au_temp_channels) == {"AU45L", "AU45R", "pitch"}
    d = scores.as_dict()
    assert d["pred_active"] == ["AU1", "AU45L", "AU45R", "pitch"] and d["au_f1"] == scores.au_f1
    # the identity's rest decides activation: a rest of 0.6 on AU1 makes the prediction's 0.5 quiet
    rest = np.zeros(N_CHANNELS)
    rest[CHANNEL_INDEX["AU1"]] = 0.6
    assert score_stage1(pred, ref, kps, kps, [CHANNEL_INDEX["AU45L"]], thresholds, rest_pred=rest).au_f1 == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown channel"):
        score_stage1(pred, ref, kps, kps, ["AU99"], thresholds)
