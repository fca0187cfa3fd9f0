"""Per-frame time-series helpers shared by every stage: one gap filler, one moving average, one running median.

Signals are frame-aligned arrays (T, ...) with gaps where no face was found; filling and smoothing
them the same way everywhere keeps events, prototypes and KTO windows consistent.
"""

from __future__ import annotations

import numpy as np


def fill_gaps(values: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Linear interpolation over invalid frames along axis 0; edges hold the nearest valid frame.

    ``valid`` defaults to frames whose values are all finite. With no valid frame the result is
    all zeros (the channels' rest value). Float input keeps its dtype; other input becomes float64.
    """
    x = np.asarray(values)
    x = np.array(x, dtype=x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64, copy=True)
    flat = x.reshape(len(x), -1)
    ok = np.all(np.isfinite(flat), axis=1) if valid is None else np.asarray(valid, dtype=bool)
    if ok.all():
        return x
    if not ok.any():
        return np.zeros_like(x)
    t = np.arange(len(x))
    good = np.flatnonzero(ok)
    for j in range(flat.shape[1]):
        flat[:, j] = np.interp(t, good, flat[good, j])
    return x


def smoothstep(u: np.ndarray) -> np.ndarray:
    """The cubic ease 3u² − 2u³ of u clipped to [0, 1]: ramps and cross-fades with no velocity jump at either end."""
    u = np.clip(np.asarray(u, dtype=np.float64), 0.0, 1.0)
    return u * u * (3.0 - 2.0 * u)


def moving_average(x: np.ndarray, n: int) -> np.ndarray:
    """Centred moving average over ``n`` frames (edges padded with the edge value), same length."""
    x = np.asarray(x, dtype=np.float64)
    if n <= 1 or len(x) == 0:
        return x.copy()
    pad = np.pad(x, (n // 2, n - 1 - n // 2), mode="edge")
    return np.convolve(pad, np.ones(n) / n, mode="valid")


def running_median(values: np.ndarray, n: int, valid: np.ndarray | None = None) -> np.ndarray:
    """Centred running median over ``n`` (odd) frames along axis 0, within each run of valid frames.

    Removes frame-to-frame landmark and blendshape jitter while keeping steps and short events: a
    median keeps any excursion longer than n // 2 frames at full height (a 3-frame median keeps a
    2-frame blink), where a mean would flatten it. Runs are filtered separately (edges padded
    with the edge value), so nothing leaks across a face-lost gap; invalid frames are returned
    unchanged. ``valid`` defaults to frames whose values are all finite.
    """
    x = np.array(values, dtype=np.float64, copy=True)
    if n % 2 == 0:
        raise ValueError(f"running_median needs an odd window, got {n}")
    if n <= 1 or len(x) == 0:
        return x
    ok = np.all(np.isfinite(x.reshape(len(x), -1)), axis=1) if valid is None else np.asarray(valid, dtype=bool)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], ok.astype(np.int8), [0]])))
    h = n // 2
    for a, b in zip(edges[::2], edges[1::2]):
        pad = np.concatenate([np.repeat(x[a : a + 1], h, axis=0), x[a:b], np.repeat(x[b - 1 : b], h, axis=0)])
        x[a:b] = np.median(np.lib.stride_tricks.sliding_window_view(pad, n, axis=0), axis=-1)
    return x
