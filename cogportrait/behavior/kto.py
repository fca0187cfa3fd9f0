"""Boundary-case mining for KTO (paper §3.4, §4.1): find 3-5 s windows of real behaviour that the
generator finds hard, in four categories, from a clip's 17-channel control trajectory.

Why each rule (thresholds live in ``params.yaml`` section ``kto_mine``):
* large_head_motion: the paper's selection, |yaw| > 40° or |pitch| > 30° or |roll| > 30°, held for
  ``head_min_s`` so a single-frame pose glitch does not count.
* asymmetric_brow: one brow moves and the other does not: |AU2L - AU2R| (outer raise) or
  |AU4L - AU4R| (lowering) exceeds the clip's own rest difference by ``brow_asym`` while the
  stronger side is ``brow_active`` above its rest, for ``brow_min_s``. Rest = the clip median,
  because blendshape proxies rest at person-specific levels (DESIGN.md).
* erratic_gaze: the horizontal gaze h = gaze_left - gaze_right (and, with ``gaze_vertical``,
  v = gaze_up - gaze_down, off by default because gaze_down follows lid closure and gaze_up is
  weak) makes at least ``gaze_min_shifts`` legs of amplitude >= ``gaze_shift_amp`` (a zig-zag filter
  on the signal smoothed over ``gaze_smooth_frames``), ``gaze_min_reversals`` of them reversing
  direction: drift that wanders back and forth, not one look to the side. On the sample clips,
  talking heads make 0-2 such legs per 4 s, the deliberate gaze-shift clip 5.
* rapid_blink: at least ``blink_min_count`` blinks (invert's ``blink`` events, the one blink
  detector: closures shorter than ``events.blink_max_s``) with a median inter-blink interval below
  ``blink_max_interval_s``; people at rest blink about every 3-4 s.

Pure numpy; ``pipelines/kto.py`` maps ``mine_clip`` over clips with Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cogportrait.config import KtoConfig
from cogportrait.schema import CHANNEL_INDEX, CLIP_FPS, EYE_CLOSURE_EVENTS, KTO_CATEGORIES, make_id
from cogportrait.timeseries import moving_average

C = CHANNEL_INDEX


@dataclass
class MinedWindow:
    category: str
    start_frame: int
    end_frame: int  # exclusive
    score: float
    reference_frame: int
    prompt: str
    detail: dict[str, Any] = field(default_factory=dict)


def _rest(x: np.ndarray, present: np.ndarray) -> float:
    v = x[present]
    return float(np.median(v)) if v.size else 0.0


def head_hits(controls: np.ndarray, cfg: KtoConfig) -> np.ndarray:
    """Per frame: beyond the paper's head-angle thresholds; and the per-frame excess ratio."""
    ratio = np.max(
        np.abs(controls[:, [C["yaw"], C["pitch"], C["roll"]]])
        / np.array([cfg.head_yaw_deg, cfg.head_pitch_deg, cfg.head_roll_deg]),
        axis=1,
    )
    return ratio


def brow_asymmetry(controls: np.ndarray, present: np.ndarray, cfg: KtoConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: the rest-corrected brow asymmetry (max over AU2 and AU4 pairs) and whether it counts."""
    best = np.zeros(len(controls))
    hit = np.zeros(len(controls), dtype=bool)
    for left, right in (("AU2L", "AU2R"), ("AU4L", "AU4R")):
        lv, rv = controls[:, C[left]], controls[:, C[right]]
        dl, dr = lv - _rest(lv, present), rv - _rest(rv, present)
        diff = (lv - rv) - _rest(lv - rv, present)
        asym = np.abs(diff)
        active = np.maximum(dl, dr) >= cfg.brow_active
        hit |= (asym >= cfg.brow_asym) & active
        best = np.maximum(best, np.where(active, asym, 0.0))
    return best, hit & present


def zigzag_legs(x: np.ndarray, amp: float) -> list[tuple[int, float]]:
    """Legs of a zig-zag filter: (frame where the leg was confirmed, signed amplitude >= amp)."""
    legs: list[tuple[int, float]] = []
    if len(x) == 0:
        return legs
    pivot = float(x[0])
    extreme, trend = pivot, 0
    for t in range(1, len(x)):
        v = float(x[t])
        if trend >= 0 and v > extreme:
            extreme = v
        elif trend <= 0 and v < extreme:
            extreme = v
        if trend == 0:
            if abs(v - pivot) >= amp:
                trend = 1 if v > pivot else -1
                legs.append((t, v - pivot))
                extreme = v
        elif trend > 0 and extreme - v >= amp:
            legs.append((t, v - extreme))
            pivot, extreme, trend = extreme, v, -1
        elif trend < 0 and v - extreme >= amp:
            legs.append((t, v - extreme))
            pivot, extreme, trend = extreme, v, 1
    return legs


def gaze_legs(controls: np.ndarray, cfg: KtoConfig) -> list[tuple[int, float, str]]:
    """Zig-zag legs of the horizontal and vertical gaze point: (frame, amplitude, axis)."""
    h = moving_average(controls[:, C["gaze_left"]] - controls[:, C["gaze_right"]], cfg.gaze_smooth_frames)
    v = moving_average(controls[:, C["gaze_up"]] - controls[:, C["gaze_down"]], cfg.gaze_smooth_frames)
    legs = [(t, a, "h") for t, a in zigzag_legs(h, cfg.gaze_shift_amp)]
    if cfg.gaze_vertical:
        legs += [(t, a, "v") for t, a in zigzag_legs(v, cfg.gaze_shift_amp)]
    return sorted(legs)


def blink_spans(events: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Blinks (start, end exclusive) from the clip's events (invert's one blink detector)."""
    return sorted((int(e["start_frame"]), int(e["end_frame"]) + 1) for e in events if e["event_type"] == "blink")


def closed_frames(events: list[dict[str, Any]], n: int) -> np.ndarray:
    """Frames inside any eye closure event (blink, wink, prolonged closure)."""
    closed = np.zeros(n, dtype=bool)
    for e in events:
        if e["event_type"] in EYE_CLOSURE_EVENTS:
            closed[int(e["start_frame"]) : int(e["end_frame"]) + 1] = True
    return closed


def _prompt(category: str, detail: dict[str, Any]) -> str:
    if category == "large_head_motion":
        ch, val = detail["channel"], detail["peak_deg"]
        direction = {
            "yaw": "to their left" if val > 0 else "to their right",
            "pitch": "upwards" if val > 0 else "downwards",
            "roll": "towards their left shoulder" if val > 0 else "towards their right shoulder",
        }[ch]
        verb = {"yaw": "turns the head", "pitch": "tilts the head", "roll": "tilts the head sideways"}[ch]
        return f"A person talking {verb} far {direction} (about {abs(val):.0f} degrees) and back."
    if category == "asymmetric_brow":
        action = "raises" if detail["pair"] == "AU2" else "lowers"
        return f"A person {action} only the {detail['side']} eyebrow while the other eyebrow stays still."
    if category == "erratic_gaze":
        return f"A person's gaze drifts erratically, darting back and forth {detail['shifts']} times."
    if category == "rapid_blink":
        return f"A person blinks rapidly, {detail['blinks']} blinks in {detail['seconds']:.0f} seconds."
    raise ValueError(f"unknown KTO category {category!r}; known: {', '.join(KTO_CATEGORIES)}")


def _reference_frame(controls: np.ndarray, present: np.ndarray, closed: np.ndarray, s: int, e: int) -> int:
    """The most frontal, eyes-open frame of the window (the reference portrait for generation)."""
    cost = np.abs(controls[s:e, [C["yaw"], C["pitch"], C["roll"]]]).sum(axis=1)
    cost = cost + 1e3 * closed[s:e] + 1e4 * (~present[s:e])
    return s + int(np.argmin(cost))


def _window_detail(category: str, controls: np.ndarray, present: np.ndarray, s: int, e: int,
                   cfg: KtoConfig, fps: int, cache: dict[str, Any]) -> tuple[float, dict[str, Any]] | None:
    """(score, detail) when the window [s, e) qualifies for the category, else None."""
    if category == "large_head_motion":
        ratio = cache["head_ratio"][s:e]
        hits = (ratio > 1.0) & present[s:e]
        if hits.sum() < max(1, round(cfg.head_min_s * fps)):
            return None
        t = s + int(np.argmax(np.where(present[s:e], ratio, 0)))
        j = int(np.argmax(np.abs(controls[t, [C["yaw"], C["pitch"], C["roll"]]]) /
                          np.array([cfg.head_yaw_deg, cfg.head_pitch_deg, cfg.head_roll_deg])))
        ch = ("yaw", "pitch", "roll")[j]
        return float(ratio[t - s]), {"channel": ch, "peak_deg": float(controls[t, C[ch]]), "frames_beyond": int(hits.sum())}
    if category == "asymmetric_brow":
        asym, hit = cache["brow"]
        if hit[s:e].sum() < max(1, round(cfg.brow_min_s * fps)):
            return None
        t = s + int(np.argmax(np.where(hit[s:e], asym[s:e], 0)))
        d2 = abs(controls[t, C["AU2L"]] - controls[t, C["AU2R"]])
        d4 = abs(controls[t, C["AU4L"]] - controls[t, C["AU4R"]])
        pair = "AU2" if d2 >= d4 else "AU4"
        side = "left" if controls[t, C[pair + "L"]] > controls[t, C[pair + "R"]] else "right"
        return float(asym[t]), {"pair": pair, "side": side, "frames": int(hit[s:e].sum())}
    if category == "erratic_gaze":
        legs = [leg for leg in cache["gaze"] if s <= leg[0] < e]
        reversals = sum(
            1 for a, b in zip(legs, legs[1:]) if a[2] == b[2] and np.sign(a[1]) != np.sign(b[1])
        )
        if len(legs) < cfg.gaze_min_shifts or reversals < cfg.gaze_min_reversals:
            return None
        return float(len(legs)), {"shifts": len(legs), "reversals": reversals}
    if category == "rapid_blink":
        inside = [b for b in cache["blinks"] if b[0] >= s and b[1] <= e]
        if len(inside) < cfg.blink_min_count:
            return None
        ibi = np.diff([b[0] for b in inside]) / fps
        if float(np.median(ibi)) >= cfg.blink_max_interval_s:
            return None
        return float(len(inside)), {"blinks": len(inside), "median_ibi_s": float(np.median(ibi)), "seconds": (e - s) / fps}
    raise ValueError(f"unknown KTO category {category!r}; known: {', '.join(KTO_CATEGORIES)}")


def mine_clip(controls: np.ndarray, present: np.ndarray | None, events: list[dict[str, Any]], cfg: KtoConfig,
              fps: int = CLIP_FPS, categories: tuple[str, ...] = KTO_CATEGORIES) -> list[MinedWindow]:
    """Desirable boundary-case windows of one clip, non-overlapping (<= max_overlap) per category.

    ``events`` are the clip's rows of events.parquet (frame numbers of the clip): blinks and eye
    closures are read there, never re-detected.
    """
    controls = np.nan_to_num(np.asarray(controls, dtype=np.float64))
    n = len(controls)
    present = np.ones(n, dtype=bool) if present is None else np.asarray(present, dtype=bool)
    min_len = int(round(3.0 * fps))
    if n < min_len:
        return []
    w = min(int(round(cfg.window_s * fps)), n)
    hop = max(1, int(round(cfg.hop_s * fps)))
    starts = list(range(0, n - w + 1, hop))
    if starts[-1] != n - w:
        starts.append(n - w)
    cache = {
        "head_ratio": head_hits(controls, cfg),
        "brow": brow_asymmetry(controls, present, cfg),
        "gaze": gaze_legs(controls, cfg),
        "blinks": blink_spans(events),
    }
    closed = closed_frames(events, n)
    out: list[MinedWindow] = []
    for category in categories:
        found = []
        for s in starts:
            e = s + w
            if present[s:e].mean() < cfg.min_face_coverage:
                continue
            res = _window_detail(category, controls, present, s, e, cfg, fps, cache)
            if res is not None:
                found.append((res[0], s, e, res[1]))
        chosen: list[tuple[int, int]] = []
        for score, s, e, detail in sorted(found, key=lambda x: (-x[0], x[1])):
            if any(min(e, ce) - max(s, cs) > cfg.max_overlap * w for cs, ce in chosen):
                continue
            chosen.append((s, e))
            out.append(MinedWindow(category, s, e, score, _reference_frame(controls, present, closed, s, e),
                                   _prompt(category, detail), detail))
    return sorted(out, key=lambda m: (m.category, m.start_frame))


def split_identities(identities: list[str], test_fraction: float, seed: int = 0) -> dict[str, str]:
    """identity -> "train"/"test": a deterministic shuffle by hashed id; no identity in both."""
    uniq = sorted(set(identities))
    if len(uniq) < 2 or test_fraction <= 0:
        return {i: "train" for i in uniq}
    order = sorted(uniq, key=lambda i: make_id("kto-split", seed, i))
    n_test = min(len(uniq) - 1, max(1, int(round(len(uniq) * test_fraction))))
    test = set(order[:n_test])
    return {i: ("test" if i in test else "train") for i in uniq}
