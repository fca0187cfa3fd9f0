"""Behaviour events from one clip's controls and lid geometry (DESIGN.md).

Every threshold is relative to the clip's own baseline (blendshape proxies rest at
person-specific levels): expression channels are measured from the clip median, eye closure
from the clip's open-eye aperture, head angles from the clip's median pose. Intervals are found
with hysteresis (enter above ``on``, leave below ``off``) so that noise around a threshold does
not split one event into many.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cogportrait.config import EventsConfig
from cogportrait.schema import CHANNEL_INDEX, CLIP_FPS, EVENT_TYPES
from cogportrait.timeseries import fill_gaps


@dataclass(frozen=True)
class Event:
    event_type: str
    start_frame: int
    end_frame: int  # inclusive
    apex_frame: int
    eyes: str  # both / left / right; "" when not an eye or side event
    peak: float
    amplitude: float

    def __post_init__(self) -> None:
        if self.event_type not in EVENT_TYPES:
            raise ValueError(f"unknown event type {self.event_type!r}; valid: {', '.join(EVENT_TYPES)}")


def hysteresis(score: np.ndarray, on: float, off: float, min_len: int = 1) -> list[tuple[int, int]]:
    """Index intervals [start, end] (inclusive) where score rises above ``on`` until it drops below ``off``.

    The interval is extended backwards to where the score first rose above ``off``, so an
    event's span covers its onset, not just its top. NaN counts as below ``off``.
    """
    s = np.nan_to_num(np.asarray(score, dtype=np.float64), nan=-np.inf)
    out: list[tuple[int, int]] = []
    i, n = 0, len(s)
    while i < n:
        if s[i] > on:
            start = i
            while start > 0 and s[start - 1] > off and (not out or start - 1 > out[-1][1]):
                start -= 1
            end = i
            while end + 1 < n and s[end + 1] >= off:
                end += 1
            if end - start + 1 >= min_len:
                out.append((start, end))
            i = end + 1
        else:
            i += 1
    return out


def closure_scores(aperture: np.ndarray, au45: np.ndarray, cfg: EventsConfig) -> np.ndarray:
    """Per-eye closure in [0, 1]: 1 − aperture / open level, helped by the rest-relative AU45."""
    ap = np.asarray(aperture, dtype=np.float64)
    ok = np.isfinite(ap)
    if not ok.any():
        return np.zeros(len(ap))
    open_level = np.percentile(ap[ok], cfg.eye_open_percentile)
    geo = np.clip(1.0 - ap / max(open_level, 1e-6), 0.0, 1.0)
    a = np.asarray(au45, dtype=np.float64)
    rest = np.nanmedian(a) if np.isfinite(a).any() else 0.0
    proxy = np.clip((a - rest) / 0.5, 0.0, 1.0)  # full closures read ~0.5 above rest (DESIGN.md)
    score = (1 - cfg.closure_proxy_weight) * geo + cfg.closure_proxy_weight * np.nan_to_num(proxy, nan=0.0)
    return np.where(ok, score, np.nan)


def _merge(intervals: list[tuple[int, int, str]]) -> list[tuple[int, int, set[str]]]:
    merged: list[tuple[int, int, set[str]]] = []
    for s, e, side in sorted(intervals):
        if merged and s <= merged[-1][1] + 1:
            ps, pe, sides = merged[-1]
            merged[-1] = (ps, max(pe, e), sides | {side})
        else:
            merged.append((s, e, {side}))
    return merged


def eye_closures(aperture: np.ndarray, au45: np.ndarray, cfg: EventsConfig, fps: int = CLIP_FPS) -> list[Event]:
    """One event per closure, both eyes merged: blink (< blink_max_s), prolonged_closure, or wink.

    aperture, au45: T x 2 (left, right). A wink needs the other eye to stay open (its closure
    score below ``wink_other_max`` throughout); otherwise the closure counts for both eyes.
    """
    scores = np.stack([closure_scores(aperture[:, e], au45[:, e], cfg) for e in range(2)], axis=1)
    filled = np.stack([fill_gaps(scores[:, 0]), fill_gaps(scores[:, 1])], axis=1)
    per_eye = [(s, e, side) for k, side in enumerate(("left", "right")) for s, e in hysteresis(filled[:, k], cfg.closure_on, cfg.closure_off)]
    events = []
    baseline = np.nanmedian(filled, axis=0) if len(filled) else np.zeros(2)
    for s, e, sides in _merge(per_eye):
        seg = filled[s : e + 1]
        if len(sides) == 2:
            eyes = "both"
        else:
            side = next(iter(sides))
            other = 1 if side == "left" else 0
            eyes = side if seg[:, other].max() < cfg.wink_other_max else "both"
        both = seg.mean(axis=1) if eyes == "both" else seg[:, 0 if eyes == "left" else 1]
        apex = s + int(np.argmax(both))
        peak = float(both.max())
        base = float(baseline.mean() if eyes == "both" else baseline[0 if eyes == "left" else 1])
        duration_s = (e - s + 1) / fps
        kind = "wink" if eyes != "both" else ("blink" if duration_s < cfg.blink_max_s else "prolonged_closure")
        events.append(Event(kind, s, e, apex, eyes, peak, peak - base))
    return events


def excursions(
    signal: np.ndarray, on: float, off: float, min_len: int, kind: str, eyes: str = "", signed: bool = False
) -> list[Event]:
    """Intervals where a channel rises above its clip median by ``on`` (|deviation| if signed)."""
    x = fill_gaps(signal)
    if len(x) == 0:
        return []
    dev = x - np.median(x)
    mag = np.abs(dev) if signed else dev
    out = []
    for s, e in hysteresis(mag, on, off, min_len):
        apex = s + int(np.argmax(mag[s : e + 1]))
        out.append(Event(kind, s, e, apex, eyes, float(x[apex]), float(dev[apex])))
    return out


def sided(left: np.ndarray, right: np.ndarray, on: float, off: float, min_len: int, kind: str) -> list[Event]:
    """Left/right/both events from two channels in [0, 1] (e.g. brow raises), merged like eye closures.

    An event found on one side also counts for the other when that side is at its ceiling during
    it (within ``off`` of 1): a brow held up for most of a clip has its median there and cannot
    rise above it by ``on``, yet it is plainly up while the other one rises.
    """
    signals = {"left": left, "right": right}
    ev = {side: excursions(sig, on, off, min_len, kind, side) for side, sig in signals.items()}
    out = []
    for s, e, sides in _merge([(x.start_frame, x.end_frame, side) for side, lst in ev.items() for x in lst]):
        members = [x for side in sides for x in ev[side] if x.start_frame >= s and x.end_frame <= e]
        best = max(members, key=lambda x: x.amplitude)
        if len(sides) == 1:
            other = "right" if "left" in sides else "left"
            if np.nanmax(signals[other][s : e + 1]) >= 1.0 - off:
                sides = sides | {other}
        out.append(Event(kind, s, e, best.apex_frame, "both" if len(sides) == 2 else next(iter(sides)), best.peak, best.amplitude))
    return out


def gaze_events(gaze_hv: np.ndarray, closed: np.ndarray, cfg: EventsConfig, fps: int = CLIP_FPS) -> list[Event]:
    """Saccades (gaze speed above a clip-relative threshold) and the fixations between them."""
    g = np.stack([fill_gaps(gaze_hv[:, 0]), fill_gaps(gaze_hv[:, 1])], axis=1)
    t = len(g)
    if t < 2:
        return []
    speed = np.zeros(t)
    speed[1:] = np.linalg.norm(np.diff(g, axis=0), axis=1) * fps
    speed[closed] = 0.0  # lids moving over the iris are not eye movements
    noise = np.median(speed) + 3 * np.median(np.abs(speed - np.median(speed)))
    thr = max(cfg.saccade_velocity, noise)
    out = []
    sacc = hysteresis(speed, thr, thr * 0.5, 1)
    for s, e in sacc:
        s0 = max(s - 1, 0)
        apex = s + int(np.argmax(speed[s : e + 1]))
        out.append(Event("saccade", s, e, apex, "both", float(speed[apex]), float(np.linalg.norm(g[e] - g[s0]))))
    # fixations: stretches between saccades and closures of at least fixation_min_frames
    busy = np.zeros(t, dtype=bool)
    for s, e in sacc:
        busy[s : e + 1] = True
    busy |= closed
    i = 0
    while i < t:
        if busy[i]:
            i += 1
            continue
        j = i
        while j + 1 < t and not busy[j + 1]:
            j += 1
        if j - i + 1 >= cfg.fixation_min_frames:
            seg = g[i : j + 1]
            centre = seg.mean(axis=0)
            disp = np.linalg.norm(seg - centre, axis=1)
            out.append(Event("fixation", i, j, i + int(np.argmin(disp)), "both", float(np.linalg.norm(centre)), float(disp.max())))
        i = j + 1
    return out


def detect_events(
    controls: np.ndarray, aperture: np.ndarray, present: np.ndarray, cfg: EventsConfig, fps: int = CLIP_FPS
) -> list[Event]:
    """All event types for one clip: controls T x 17, aperture T x 2 (left, right), present T."""
    c = np.asarray(controls, dtype=np.float64)
    if len(c) == 0 or not np.any(present):
        return []
    ch = CHANNEL_INDEX
    au45 = c[:, [ch["AU45L"], ch["AU45R"]]]
    events = eye_closures(aperture, au45, cfg, fps)
    closed = np.zeros(len(c), dtype=bool)
    for ev in events:
        closed[ev.start_frame : ev.end_frame + 1] = True
    m = cfg.min_expression_frames
    left_brow = (c[:, ch["AU1"]] + c[:, ch["AU2L"]]) / 2
    right_brow = (c[:, ch["AU1"]] + c[:, ch["AU2R"]]) / 2
    events += sided(left_brow, right_brow, cfg.brow_on, cfg.brow_off, m, "brow_raise")
    events += excursions((c[:, ch["AU4L"]] + c[:, ch["AU4R"]]) / 2, cfg.frown_on, cfg.frown_off, m, "frown")
    # lid tightening and droop are read outside closures (a blink moves the same lid points)
    squint = np.where(closed, np.nan, c[:, ch["AU7"]])
    events += excursions(squint, cfg.squint_on, cfg.squint_off, m, "squint", "both")
    droop = np.where(closed, np.nan, c[:, ch["AU41"]])
    events += [
        Event("lid_droop", e.start_frame, e.end_frame, e.apex_frame, "both", e.peak, e.peak)
        for e in _absolute_excursions(droop, cfg.droop_on, cfg.droop_off, m)
    ]
    hv = np.stack([c[:, ch["gaze_left"]] - c[:, ch["gaze_right"]], c[:, ch["gaze_up"]] - c[:, ch["gaze_down"]]], axis=1)
    events += gaze_events(hv, closed, cfg, fps)
    hm = cfg.head_min_frames
    events += excursions(c[:, ch["pitch"]], cfg.head_on_deg, cfg.head_off_deg, hm, "head_nod", signed=True)
    events += excursions(c[:, ch["yaw"]], cfg.head_on_deg, cfg.head_off_deg, hm, "head_turn", signed=True)
    events += excursions(c[:, ch["roll"]], cfg.head_on_deg, cfg.head_off_deg, hm, "head_tilt", signed=True)
    return sorted(events, key=lambda e: (e.start_frame, e.event_type))


def _absolute_excursions(x: np.ndarray, on: float, off: float, min_len: int) -> list[Event]:
    """AU41 is already relative to the identity's rest lid: threshold its value directly."""
    v = np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0)
    out = []
    for s, e in hysteresis(v, on, off, min_len):
        apex = s + int(np.argmax(v[s : e + 1]))
        out.append(Event("lid_droop", s, e, apex, "both", float(v[apex]), float(v[apex])))
    return out


EYE_SIDES: tuple[str, ...] = ("", "both", "left", "right")  # Event.eyes values


def event_columns(frames: np.ndarray, events: list[Event]) -> dict[str, np.ndarray]:
    """One clip's events as typed arrays (for a Ray row): type and eyes as indices into
    EVENT_TYPES / EYE_SIDES, positions mapped to the clip's frame numbers."""
    frames = np.asarray(frames, dtype=np.int64)
    return {
        "event_type": np.array([EVENT_TYPES.index(e.event_type) for e in events], dtype=np.int16),
        "event_eyes": np.array([EYE_SIDES.index(e.eyes) for e in events], dtype=np.int16),
        "event_frames": np.array([[frames[e.start_frame], frames[e.end_frame], frames[e.apex_frame]] for e in events],
                                 dtype=np.int64).reshape(-1, 3),
        "event_values": np.array([[e.peak, e.amplitude] for e in events], dtype=np.float32).reshape(-1, 2),
    }


def event_rows(clip_id: str, columns: dict[str, np.ndarray]) -> list[dict]:
    """EVENTS_SCHEMA rows from ``event_columns``."""
    return [
        {"clip_id": clip_id, "event_type": EVENT_TYPES[int(t)], "start_frame": int(f[0]), "end_frame": int(f[1]),
         "apex_frame": int(f[2]), "eyes": EYE_SIDES[int(y)], "peak": float(v[0]), "amplitude": float(v[1])}
        for t, y, f, v in zip(columns["event_type"], columns["event_eyes"], columns["event_frames"], columns["event_values"])
    ]
