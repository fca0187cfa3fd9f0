"""Span arithmetic: duration limits, and splitting a tracked span into face runs and gaps.

Spans are half-open [start, end) in source frame indices; times come from the decoded
timestamps so variable-frame-rate sources are handled exactly.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Span:
    start: int
    end: int  # exclusive
    reason: str = ""  # "" = keep; otherwise a reject reason

    @property
    def n(self) -> int:
        return self.end - self.start


def span_seconds(times: np.ndarray, start: int, end: int, frame_period: float) -> tuple[float, float]:
    """Start and end time of frames [start, end): the end is the last frame's time plus its period."""
    t0 = float(times[start])
    t1 = float(times[end]) if end < len(times) else float(times[end - 1]) + frame_period
    return t0, t1


def apply_duration_limits(
    span: Span, times: np.ndarray, frame_period: float, min_s: float, max_s: float, offset: int = 0
) -> list[Span]:
    """Reject a span shorter than min_s; split one longer than max_s into equal pieces.

    ``times[i - offset]`` is the time of frame i. Pieces are cut at frame boundaries nearest to
    equal times, so each lies in [min_s, max_s] whenever max_s >= 2 * min_s (the config checks).
    """
    t0, t1 = span_seconds(times, span.start - offset, span.end - offset, frame_period)
    duration = t1 - t0
    if duration + 1e-6 < min_s:
        return [Span(span.start, span.end, "too_short")]
    if duration <= max_s + 1e-6:
        return [span]
    pieces = math.ceil(duration / max_s)
    bounds = [span.start]
    for k in range(1, pieces):
        target = t0 + duration * k / pieces
        idx = offset + int(np.searchsorted(times, target - 1e-9))
        bounds.append(min(max(idx, bounds[-1] + 1), span.end - 1))
    bounds.append(span.end)
    out: list[Span] = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        a_s, b_s = span_seconds(times, a - offset, b - offset, frame_period)
        out.append(Span(a, b, "" if b_s - a_s + 1e-6 >= min_s else "too_short"))
    return out


def segment_face_runs(
    sample_frames: list[int], labels: list[str], span_end: int, max_gap_samples: int
) -> list[Span]:
    """Partition a span into face runs (reason "") and rejected stretches.

    ``labels`` holds one of ok / no_face / multi_face / small_face per sampled frame. Runs of
    non-ok samples no longer than ``max_gap_samples`` between two ok samples are bridged (a
    brief occlusion or a missed detection); longer ones split the span and are rejected with
    their most common label. Every frame of [sample_frames[0], span_end) lands in one span.
    """
    if not sample_frames:
        return []
    n = len(labels)
    ok = np.array([lab == "ok" for lab in labels])
    keep = ok.copy()
    i = 0
    while i < n:
        if ok[i]:
            i += 1
            continue
        j = i
        while j < n and not ok[j]:
            j += 1
        interior = i > 0 and j < n
        if interior and (j - i) <= max_gap_samples:
            keep[i:j] = True
        i = j
    bounds = sample_frames[1:] + [span_end]
    spans: list[Span] = []
    i = 0
    while i < n:
        j = i
        while j < n and keep[j] == keep[i]:
            j += 1
        start, end = sample_frames[i], bounds[j - 1]
        if keep[i]:
            spans.append(Span(start, end, ""))
        else:
            reason = Counter(labels[i:j]).most_common(1)[0][0]
            spans.append(Span(start, end, reason))
        i = j
    return spans
