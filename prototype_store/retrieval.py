"""Eq. 3 retrieval maths in plain numpy: one scale, channel weights, interval targets.

Why a module of its own: the FAISS index, the exact re-rank, the brute-force test oracle and the
benchmark must all agree on one definition of the distance. Everything here is pure numpy.

Definition (DESIGN.md, paper Eq. 3). Each prototype is described by the feature vector
f = [channel mean (17), channel peak (17)] in native units (AU/gaze 0-1, head angles in degrees).
Channels are put on one scale (head angles / 30°) and weighted AU > gaze > head; the mean and the
peak halves carry the stat weights (default 0.5 each, so a blink's small *mean* AU45 and large
*peak* AU45 both count). A target gives, per channel, a value or a [lo, hi] range; the per-channel
term is the distance from the prototype's statistic to that interval (0 inside it), and channels
the target leaves out weigh 0:

    D(q, p) = sum_{j in target} w_j * (s_mean * dist(mean_j, I_j) + s_peak * dist(peak_j, I_j))

with every quantity on the common scale.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cogportrait.schema import (
    AU_CHANNELS,
    CHANNEL_INDEX,
    CONTROL_CHANNELS,
    GAZE_CHANNELS,
    HEAD_ANGLE_SCALE_DEG,
    HEAD_CHANNELS,
    N_CHANNELS,
)

N_FEATURES = 2 * N_CHANNELS  # [mean, peak]

# Names the composition agent uses for channels that DESIGN.md splits left/right: a target on the
# alias applies to both sides (the paper's "AU4 in [0.10, 0.20]").
CHANNEL_ALIASES: dict[str, tuple[str, ...]] = {
    "AU2": ("AU2L", "AU2R"),
    "AU4": ("AU4L", "AU4R"),
    "AU45": ("AU45L", "AU45R"),
}


class UnknownChannelError(KeyError):
    """A target names a channel outside the 17-channel vocabulary."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class TargetError(ValueError):
    """A target value or range that cannot be used (NaN, lo > hi, unparsable)."""


def channel_scale() -> np.ndarray:
    """Per-channel factor putting every channel on one scale (head angles / 30°)."""
    scale = np.ones(N_CHANNELS, dtype=np.float64)
    for name in HEAD_CHANNELS:
        scale[CHANNEL_INDEX[name]] = 1.0 / HEAD_ANGLE_SCALE_DEG
    return scale


def channel_weights(au: float, gaze: float, head: float) -> np.ndarray:
    """Eq. 3's w_j per channel group; AU > gaze > head is checked by the config, not here."""
    w = np.empty(N_CHANNELS, dtype=np.float64)
    for names, value in ((AU_CHANNELS, au), (GAZE_CHANNELS, gaze), (HEAD_CHANNELS, head)):
        for name in names:
            w[CHANNEL_INDEX[name]] = value
    return w


def feature_weights(au: float, gaze: float, head: float, mean: float, peak: float) -> np.ndarray:
    """Weight of each of the 34 features, the one-scale factor folded in."""
    w = channel_weights(au, gaze, head) * channel_scale()
    return np.concatenate([mean * w, peak * w])


def _alias_text() -> str:
    return ", ".join(f"{alias}={'+'.join(members)}" for alias, members in CHANNEL_ALIASES.items())


def known_target_names() -> list[str]:
    return list(CONTROL_CHANNELS) + sorted(CHANNEL_ALIASES)


_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_RANGE_RE = re.compile(rf"^\s*\[?\s*({_NUM})\s*(?:\.\.|,|:)\s*({_NUM})\s*\]?\s*$")


def parse_target_value(text: str) -> float | tuple[float, float]:
    """Parse "0.6", "0.6..1.0", "-12..-5" or "[0.1, 0.2]" (the CLI and JSON spellings)."""
    m = _RANGE_RE.match(text)
    if m:
        return float(m.group(1)), float(m.group(2))
    try:
        return float(text)
    except ValueError:
        raise TargetError(
            f"cannot read target {text!r}: give a value (0.6) or a range (0.6..1.0, [-12, -5])"
        ) from None


def parse_target_arg(arg: str) -> tuple[str, float | tuple[float, float]]:
    """Split a CLI ``NAME=VALUE`` target."""
    if "=" not in arg:
        raise TargetError(f"target {arg!r} must look like NAME=VALUE or NAME=LO..HI, e.g. AU45L=0.6..1.0")
    name, value = arg.split("=", 1)
    return name.strip(), parse_target_value(value)


@dataclass(frozen=True)
class Intervals:
    """A target as per-channel intervals in native units; ``mask`` marks the channels it sets."""

    lo: np.ndarray  # (17,)
    hi: np.ndarray  # (17,)
    mask: np.ndarray  # (17,) bool


def to_intervals(targets: Mapping[str, object]) -> Intervals:
    """Turn {channel: value | [lo, hi] | "lo..hi"} into intervals, refusing unknown names."""
    if not targets:
        raise TargetError("a query needs at least one target channel; known: " + ", ".join(known_target_names()))
    lo = np.zeros(N_CHANNELS)
    hi = np.zeros(N_CHANNELS)
    mask = np.zeros(N_CHANNELS, dtype=bool)
    for name, value in targets.items():
        if name in CHANNEL_INDEX:
            members: tuple[str, ...] = (name,)
        elif name in CHANNEL_ALIASES:
            members = CHANNEL_ALIASES[name]
        else:
            raise UnknownChannelError(
                f"unknown channel {name!r}; known channels: {', '.join(CONTROL_CHANNELS)}; "
                f"aliases for both sides: {_alias_text()}"
            )
        if isinstance(value, str):
            value = parse_target_value(value)
        if isinstance(value, Sequence) and not isinstance(value, str):
            if len(value) != 2:
                raise TargetError(f"target for {name} must be a value or [lo, hi], got {value!r}")
            a, b = float(value[0]), float(value[1])
        else:
            a = b = float(value)  # type: ignore[arg-type]
        if not (math.isfinite(a) and math.isfinite(b)):
            raise TargetError(f"target for {name} is not finite: {value!r}")
        if a > b:
            raise TargetError(f"target range for {name} has lo > hi: [{a}, {b}]")
        for member in members:
            j = CHANNEL_INDEX[member]
            lo[j], hi[j], mask[j] = a, b, True
    return Intervals(lo=lo, hi=hi, mask=mask)


@dataclass(frozen=True)
class WeightedQuery:
    """A target in the weighted feature space: interval [a, b] on the masked features."""

    a: np.ndarray  # (34,)
    b: np.ndarray  # (34,)
    mask: np.ndarray  # (34,) bool

    @property
    def mid(self) -> np.ndarray:
        return 0.5 * (self.a + self.b)

    @property
    def slack(self) -> float:
        """H = sum of half-widths: D >= L1-to-midpoint - H bounds every prototype."""
        return float(np.sum(0.5 * (self.b - self.a)[self.mask]))


def weighted_query(intervals: Intervals, fweights: np.ndarray) -> WeightedQuery:
    """Map native-unit intervals to the weighted space in which the index stores features."""
    lo = np.concatenate([intervals.lo, intervals.lo]) * fweights
    hi = np.concatenate([intervals.hi, intervals.hi]) * fweights
    mask = np.concatenate([intervals.mask, intervals.mask]) & (fweights > 0)
    return WeightedQuery(a=np.minimum(lo, hi), b=np.maximum(lo, hi), mask=mask)


def interval_distance(weighted: np.ndarray, query: WeightedQuery) -> np.ndarray:
    """Exact Eq. 3 distance of each weighted feature row (N x 34) to the query, float64."""
    cols = np.flatnonzero(query.mask)
    x = np.asarray(weighted[:, cols], dtype=np.float64)
    gap = np.maximum(0.0, np.maximum(query.a[cols] - x, x - query.b[cols]))
    return gap.sum(axis=1)


def midpoint_l1(weighted: np.ndarray, query: WeightedQuery) -> np.ndarray:
    """L1 distance to the interval midpoints on the masked features (the tie-break and bound)."""
    cols = np.flatnonzero(query.mask)
    return np.abs(np.asarray(weighted[:, cols], dtype=np.float64) - query.mid[cols]).sum(axis=1)


def rank(distance: np.ndarray, tiebreak: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k best by (distance, midpoint L1, id): one total order everywhere.

    Values are compared rounded to 1e-9 so float noise never decides an order. Large inputs are
    cut down with partitions first (many exact ties at 0 are common with range targets).
    """
    if len(distance) == 0:
        return np.zeros(0, dtype=np.int64)
    d = np.round(distance, 9)
    t = np.round(tiebreak, 9)
    if len(d) > 4 * k + 64:
        kth = np.partition(d, k - 1)[k - 1]
        sel = np.flatnonzero(d <= kth)
        if len(sel) > 4 * k + 64:
            sure = sel[d[sel] < kth]
            border = sel[d[sel] == kth]
            need = k - len(sure)
            tb = t[border]
            tk = np.partition(tb, need - 1)[need - 1]
            sel = np.concatenate([sure, border[tb <= tk]])
        order = sel[np.lexsort((ids[sel], t[sel], d[sel]))]
        return order[:k]
    return np.lexsort((ids, t, d))[:k]


def brute_force(
    channel_mean: np.ndarray,
    channel_peak: np.ndarray,
    targets: Mapping[str, object],
    fweights: np.ndarray,
) -> np.ndarray:
    """Eq. 3 written out directly per channel (the test oracle): distances of every prototype."""
    iv = to_intervals(targets)
    scale = channel_scale()
    half = N_CHANNELS
    w_mean = fweights[:half] / scale
    w_peak = fweights[half:] / scale
    total = np.zeros(len(channel_mean))
    for j in np.flatnonzero(iv.mask):
        lo, hi = iv.lo[j] * scale[j], iv.hi[j] * scale[j]
        for stat, w in ((np.asarray(channel_mean)[:, j], w_mean[j]), (np.asarray(channel_peak)[:, j], w_peak[j])):
            x = stat.astype(np.float64) * scale[j]
            total += w * np.maximum(0.0, np.maximum(lo - x, x - hi))
    return total
