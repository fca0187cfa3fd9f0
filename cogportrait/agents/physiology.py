"""The critic's physiological rules (paper §3.3 "Constraint Enforcement") and their repairs.

A composed control sequence is stitched from real behaviour, so most of it is plausible; what goes
wrong is at the seams and in the edits: a blink stretched by a time scale, two prototypes' blinks
landing three frames apart, a one-eyed blink, raised brows over drooping lids, a gaze or head jump
at a boundary, a head held far off-centre. Each rule measures the composed controls (and the lid
aperture of the keypoints Π makes of them) and returns ``CriticCheck``s with the measured number
beside its ``params.yaml`` limit; each repair is a pure function that returns new controls in which
the rule holds again (the tests re-run the rule on the repaired sequence).

Eye closures are found with the project's one blink detector (``behavior.events.eye_closures`` on
the lid aperture plus the AU45 channels), so the critic counts blinks exactly as the event tables
of the library do. Frames are 0-based and spans half-open ``[start, end)``, as in the plan.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cogportrait.agents.models import Action, CriticCheck, Plan, interval
from cogportrait.behavior.events import closure_scores, eye_closures, gaze_events, hysteresis
from cogportrait.config import CriticConfig, EventsConfig
from cogportrait.face.pose import lid_features
from cogportrait.schema import CHANNEL_INDEX, CLIP_FPS, HEAD_CHANNELS, N_CHANNELS
from cogportrait.timeseries import moving_average, smoothstep

log = logging.getLogger("cogportrait")

CI = CHANNEL_INDEX
AU45 = ("AU45L", "AU45R")
BROWS = ("AU1", "AU2L", "AU2R")
LID_NARROWING = ("AU7", "AU41")  # besides AU45, the channels that lower the lid aperture
GAZE = ("gaze_left", "gaze_right", "gaze_up", "gaze_down")
HEAD = HEAD_CHANNELS
# the exceptions of a category's ``allow`` (categories.ALLOW_EXCEPTIONS) that switch a rule off
BROW_DROOP = "brow_raise_with_droop"  # au_coactivation
GAZE_WITHOUT_HEAD = "gaze_without_head"  # gaze_head_coordination
HONOURED_EXCEPTIONS: tuple[str, ...] = (BROW_DROOP, GAZE_WITHOUT_HEAD)
# A minimum-jerk movement (the classic model of a saccade's bell-shaped velocity) peaks at 15/8 of
# its mean velocity; a shift seen over n frame intervals at 25 fps moved at least A/(n/fps) on
# average, so its peak was at least 15/8 of that. Frame differences alone cannot see a saccade's
# peak at 25 fps: a 30° jump in one frame reads 750°/s, below the 803°/s allowed, yet no eye makes it.
MIN_JERK_PEAK_TO_MEAN = 15.0 / 8.0
EXTENT_OPEN = 0.05  # AU45 within this of rest counts as open when tracing a closure's ramps
EXTENT_NOISE = 0.02  # a rise smaller than this does not end a closure's ramp (inversion noise)
FILL_RAMP = 2  # frames over which a freed span meets the level after it
PHYSIOLOGICAL_CHECKS = ("blink_duration", "blink_interval", "blink_asymmetry", "au_coactivation", "gaze_main_sequence",
                        "gaze_head_coordination", "head_velocity", "head_range")


class CriticInputError(ValueError):
    """Controls, keypoints or rest levels whose shapes do not fit together."""


class CannotRepair(ValueError):
    """A failing check that no edit of the controls can fix (the plan has to change)."""


@dataclass(frozen=True)
class Closure:
    """One detected eye closure, half-open frames, with the per-eye closure gap at its apex."""

    start: int
    end: int
    apex: int
    eyes: str  # both / left / right, as eye_closures reports it
    asymmetry: float  # |closure score left - right| at the apex

    @property
    def n_frames(self) -> int:
        return self.end - self.start


# --------------------------------------------------------------------------------------------
# shared helpers (the semantic checks use them too)
# --------------------------------------------------------------------------------------------
def validate_inputs(controls: np.ndarray, canon: np.ndarray | None = None, rest: np.ndarray | None = None) -> np.ndarray:
    """Controls as float64 (T, 17); raise CriticInputError when the shapes disagree."""
    c = np.asarray(controls, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] != N_CHANNELS or len(c) == 0:
        raise CriticInputError(f"controls must be (T, {N_CHANNELS}) with T >= 1, got {c.shape}")
    if canon is not None and (np.shape(canon)[0] != len(c) or np.shape(canon)[1:] != (62, 3)):
        raise CriticInputError(f"keypoints must be ({len(c)}, 62, 3) for {len(c)} frames of controls, got {np.shape(canon)}")
    if rest is not None and np.shape(rest) != (N_CHANNELS,):
        raise CriticInputError(f"rest levels must be ({N_CHANNELS},), got {np.shape(rest)}")
    return c


def default_rest(controls: np.ndarray) -> np.ndarray:
    """Rest levels when the caller has none: AU channels at their median (events.py's convention),
    gaze at 0, the head at its first frame (the reference portrait's pose)."""
    rest = np.median(controls, axis=0)
    rest[CI["gaze_left"] : CI["gaze_down"] + 1] = 0.0
    rest[CI["yaw"] :] = controls[0, CI["yaw"] :]
    return rest


def detect_closures(controls: np.ndarray, canon: np.ndarray, events_cfg: EventsConfig, fps: int = CLIP_FPS) -> list[Closure]:
    """Eye closures of the composed sequence, found by behaviour.events.eye_closures."""
    lid = lid_features(np.asarray(canon, dtype=np.float64))
    ap = np.stack([lid["aperture_left"], lid["aperture_right"]], axis=1)
    au45 = controls[:, [CI["AU45L"], CI["AU45R"]]]
    scores = np.stack([np.nan_to_num(closure_scores(ap[:, e], au45[:, e], events_cfg)) for e in range(2)], axis=1)
    out = []
    for ev in eye_closures(ap, au45, events_cfg, fps):
        out.append(Closure(ev.start_frame, ev.end_frame + 1, ev.apex_frame, ev.eyes,
                           float(abs(scores[ev.apex_frame, 0] - scores[ev.apex_frame, 1]))))
    return out


def closed_mask(closures: Sequence[Closure], n: int) -> np.ndarray:
    mask = np.zeros(n, dtype=bool)
    for c in closures:
        mask[c.start : c.end] = True
    return mask


def event_at(plan: Plan, frame: int) -> int:
    """Index of the plan event that holds ``frame`` (the last one for frames past the plan)."""
    for k, ev in enumerate(plan.events):
        if ev.start_frame <= frame < ev.end_frame:
            return k
    return len(plan.events) - 1


def plan_actions(plan: Plan, kinds: Sequence[str] = ("blink", "wink", "closure")) -> list[tuple[int, Action]]:
    return [(k, a) for k, ev in enumerate(plan.events) for a in ev.actions if a.kind in kinds]


def overlaps(a0: int, a1: int, b0: int, b1: int) -> bool:
    return a0 < b1 and b0 < a1


def runs(mask: np.ndarray, min_len: int = 1) -> list[tuple[int, int]]:
    """Half-open runs of True frames at least ``min_len`` long (events.hysteresis on the mask)."""
    return [(s, e + 1) for s, e in hysteresis(np.asarray(mask, dtype=np.float64), 0.5, 0.5, max(1, min_len))]


def edge_frames(n_frames: int, cfg: CriticConfig, fps: int) -> int:
    """Frames at each edge of an event left to the cross-fade; a third of a short event at most."""
    return int(min(round(cfg.edge_s * fps), max(0, (n_frames - 1) // 3)))


def span_window(n: int, m: int) -> np.ndarray:
    """Weights over an n-frame span: 1 in the core, smoothstep ramps over m frames at each edge,
    never reaching 0 inside, so an edit on the span meets its neighbours continuously."""
    w = np.ones(n)
    if m > 0:
        ramp = smoothstep(np.arange(1, m + 1) / (m + 1))
        w[:m] = ramp
        w[n - m :] = np.minimum(w[n - m :], ramp[::-1])
    return w


def gaze_hv(controls: np.ndarray) -> np.ndarray:
    """Signed gaze (T, 2) in channel units: horizontal + = subject's left, vertical + = up."""
    c = controls
    return np.stack([c[:, CI["gaze_left"]] - c[:, CI["gaze_right"]], c[:, CI["gaze_up"]] - c[:, CI["gaze_down"]]], axis=1)


def closure_extent(au45: np.ndarray, start: int, end: int, rest: np.ndarray) -> tuple[int, int]:
    """The frames a closure's AU45 excursion covers: the detected span grown outward while the mean
    AU45 stays above its rest (by EXTENT_OPEN) and does not rise again (beyond EXTENT_NOISE), so
    the ramps in and out are edited with the closure but a neighbouring closure is not."""
    x = np.asarray(au45, dtype=np.float64).reshape(len(au45), -1).mean(axis=1)
    floor = float(np.mean(rest)) + EXTENT_OPEN
    a, b = max(0, start), min(len(x), end)
    while a > 0 and x[a - 1] > floor and x[a - 1] <= x[a] + EXTENT_NOISE:
        a -= 1
    while b < len(x) and x[b] > floor and x[b] <= x[b - 1] + EXTENT_NOISE:
        b += 1
    return a, b


def open_fill(x: np.ndarray, a: int, b: int) -> np.ndarray:
    """The open level for frames [a, b) freed of a closure: the level before it, held, meeting the
    level after it over the last FILL_RAMP frames. Not a line between the two: next to a flutter the
    level after is the onset of the next closure, and a slow ramp into it would lengthen that one."""
    n = b - a
    left = x[a - 1] if a > 0 else (x[b] if b < len(x) else x[a])
    right = x[b] if b < len(x) else left
    out = np.full(n, left, dtype=np.float64)
    r = min(FILL_RAMP, n)
    out[n - r :] = left + (right - left) * (np.arange(1, r + 1) / (r + 1))
    return out


def remove_closure(c: np.ndarray, start: int, end: int, rest: np.ndarray) -> tuple[int, int]:
    """Replace a closure's AU45 excursion (both eyes) by the surrounding open level, in place."""
    idx = [CI[n] for n in AU45]
    a, b = closure_extent(c[:, idx], start, end, rest[idx])
    for i in idx:
        c[a:b, i] = open_fill(c[:, i], a, b)
    return a, b


def closure_profile(n: int) -> np.ndarray:
    """A synthetic closure of n closed frames, as the fraction of full AU45 per frame, with one
    light frame on each side: the detector counts exactly the n frames (the 0.75 edges read closed,
    the 0.25 shoulders open), so an asked closure lasts what it asks."""
    inner = np.ones(n)
    if n >= 3:
        inner[0] = inner[-1] = 0.75
    return np.concatenate([[0.25], inner, [0.25]])


def add_closure(c: np.ndarray, start: int, n: int, eyes: str) -> None:
    """Lay a synthetic closure of ``eyes`` over frames [start, start + n), in place."""
    p = closure_profile(n)
    lo = start - 1
    for e, name in enumerate(AU45):
        if eyes not in ("both", ("left", "right")[e]):
            continue
        i = CI[name]
        for k, frac in enumerate(p):
            t = lo + k
            if 0 <= t < len(c):
                c[t, i] += frac * (1.0 - c[t, i])


def make_check(kind: str, name: str, passed: bool, channels: Sequence[str], revise: str = "composer", **kw) -> CriticCheck:
    """A CriticCheck: a passing one sends nothing back (revise="none")."""
    return CriticCheck(name=name, kind=kind, verdict="pass" if passed else "revise", channels=list(channels),
                       revise="none" if passed else revise, **kw)


def _check(name: str, passed: bool, channels: Sequence[str], revise: str = "composer", **kw) -> CriticCheck:
    return make_check("physiological", name, passed, channels, revise, **kw)


# --------------------------------------------------------------------------------------------
# the rules
# --------------------------------------------------------------------------------------------
def physiological_checks(
    controls: np.ndarray,
    canon: np.ndarray,
    plan: Plan,
    allow: Sequence[str] | set[str],
    cfg: CriticConfig,
    events_cfg: EventsConfig,
    fps: int = CLIP_FPS,
    *,
    rest: np.ndarray | None = None,
) -> list[CriticCheck]:
    """Every physiological rule over a composed sequence: one ``revise`` check per violation, or
    one ``pass`` check per rule carrying the worst number measured.

    controls: (T, 17) with head angles absolute; canon: Π's (T, 62, 3) pose-free keypoints of them;
    rest: the identity's rest levels (default_rest when not given: pass them when known).
    """
    c = validate_inputs(controls, canon, rest)
    rest = default_rest(c) if rest is None else np.asarray(rest, dtype=np.float64)
    closures = detect_closures(c, canon, events_cfg, fps)
    return [
        *blink_duration(closures, plan, cfg, fps),
        *blink_interval(closures, plan, cfg, fps),
        *blink_asymmetry(closures, plan, cfg),
        *au_coactivation(c, rest, plan, set(allow), cfg, events_cfg),
        *gaze_main_sequence(c, closed_mask(closures, len(c)), plan, cfg, events_cfg, fps),
        *gaze_head_coordination(c, rest, plan, cfg, fps, allowed=GAZE_WITHOUT_HEAD in allow),
        *head_velocity(c, plan, cfg, fps),
        *head_range(c, rest, plan, cfg),
    ]


def blink_duration(closures: Sequence[Closure], plan: Plan, cfg: CriticConfig, fps: int) -> list[CriticCheck]:
    """A closure no plan ``closure`` Action holds must end within blink_max_s (else it is not a blink)."""
    held = plan_actions(plan, ("closure",))
    phasic = plan_actions(plan, ("blink", "wink"))
    out, worst = [], 0.0
    for cl in closures:
        if any(overlaps(cl.start, cl.end, a.start_frame, a.end_frame) for _, a in held):
            continue
        dur = cl.n_frames / fps
        worst = max(worst, dur)
        if dur <= cfg.blink_max_s + 1e-9:
            continue
        # the plan itself asked for a blink or wink this long: only the planner can shorten it
        asked = [a for _, a in phasic
                 if overlaps(cl.start, cl.end, a.start_frame, a.end_frame) and a.n_frames / fps > cfg.blink_max_s]
        out.append(_check("blink_duration", False, AU45, "planner" if asked else "composer", event_index=event_at(plan, cl.start),
                          frames=(cl.start, cl.end), measured={"duration_s": dur}, limit={"duration_s": cfg.blink_max_s},
                          message=f"an unasked eye closure lasts {dur:.2f} s (frames {cl.start}-{cl.end - 1}); "
                                  f"a blink ends within {cfg.blink_max_s} s"))
    if not out:
        out.append(_check("blink_duration", True, AU45, measured={"duration_s": worst}, limit={"duration_s": cfg.blink_max_s},
                          message=f"longest unasked closure {worst:.2f} s"))
    return out


def blink_interval(closures: Sequence[Closure], plan: Plan, cfg: CriticConfig, fps: int) -> list[CriticCheck]:
    """Two closures closer than blink_min_interval_s (end to start) read as one flutter."""
    actions = plan_actions(plan)
    asked = lambda cl: any(overlaps(cl.start, cl.end, a.start_frame, a.end_frame) for _, a in actions)  # noqa: E731
    out, shortest = [], math.inf
    for first, later in zip(closures, closures[1:]):
        gap = (later.start - first.end) / fps
        shortest = min(shortest, gap)
        if gap >= cfg.blink_min_interval_s - 1e-9:
            continue
        both_asked = asked(first) and asked(later)
        out.append(_check("blink_interval", False, AU45, "planner" if both_asked else "composer",
                          event_index=event_at(plan, later.start), frames=(first.start, later.end),
                          measured={"interval_s": gap, "earlier_start": first.start, "earlier_end": first.end,
                                    "later_start": later.start, "later_end": later.end},
                          limit={"interval_s": cfg.blink_min_interval_s},
                          message=f"closures at frames {first.start} and {later.start} are {gap:.2f} s apart; "
                                  f"blinks need {cfg.blink_min_interval_s} s"))
    if not out:
        out.append(_check("blink_interval", True, AU45, measured={"interval_s": shortest} if math.isfinite(shortest) else {},
                          limit={"interval_s": cfg.blink_min_interval_s},
                          message="no two closures too close" if math.isfinite(shortest) else "fewer than two closures"))
    return out


def blink_asymmetry(closures: Sequence[Closure], plan: Plan, cfg: CriticConfig) -> list[CriticCheck]:
    """Both eyes close together (|closure L - R| at the apex) unless the plan asks for a wink there."""
    winks = plan_actions(plan, ("wink",))
    out, worst = [], 0.0
    for cl in closures:
        if any(overlaps(cl.start, cl.end, a.start_frame, a.end_frame) for _, a in winks):
            continue
        worst = max(worst, cl.asymmetry)
        if cl.asymmetry <= cfg.blink_asymmetry_max:
            continue
        out.append(_check("blink_asymmetry", False, AU45, event_index=event_at(plan, cl.start), frames=(cl.start, cl.end),
                          measured={"asymmetry": cl.asymmetry}, limit={"asymmetry": cfg.blink_asymmetry_max},
                          message=f"an unasked one-sided closure ({cl.eyes}) at frame {cl.apex}: |L - R| = {cl.asymmetry:.2f}"))
    if not out:
        out.append(_check("blink_asymmetry", True, AU45, measured={"asymmetry": worst},
                          limit={"asymmetry": cfg.blink_asymmetry_max}, message=f"largest unasked closure asymmetry {worst:.2f}"))
    return out


def _brow_excess(c: np.ndarray, rest: np.ndarray) -> np.ndarray:
    return np.max(np.stack([c[:, CI[n]] - rest[CI[n]] for n in BROWS], axis=1), axis=1)


def au_coactivation(c: np.ndarray, rest: np.ndarray, plan: Plan, allow: set[str], cfg: CriticConfig,
                    events_cfg: EventsConfig) -> list[CriticCheck]:
    """Raised brows over drooping lids (min_expression_frames or longer) only where the category allows."""
    chans = (*BROWS, "AU41")
    brow, droop = _brow_excess(c, rest), c[:, CI["AU41"]]
    limit = {"brow_above_rest": cfg.coactivation_brow, "AU41": cfg.coactivation_droop}
    found = runs((brow > cfg.coactivation_brow) & (droop > cfg.coactivation_droop), events_cfg.min_expression_frames)
    if BROW_DROOP in allow or not found:
        msg = "allowed by the category" if found else "no raised brows over drooping lids"
        return [_check("au_coactivation", True, chans,
                       measured={"brow_above_rest": float(brow.max()), "AU41": float(droop.max())}, limit=limit,
                       message=f"brows with droop: {msg}")]
    out = []
    for s, e in found:
        k = event_at(plan, s)
        tg = plan.events[k].targets
        asks_brow = any(n in tg and interval(tg[n])[0] - rest[CI[n]] > cfg.coactivation_brow for n in BROWS)
        asks_droop = "AU41" in tg and interval(tg["AU41"])[0] > cfg.coactivation_droop
        mb, md = float(brow[s:e].max()), float(droop[s:e].max())
        out.append(_check("au_coactivation", False, chans, "planner" if asks_brow and asks_droop else "composer", event_index=k,
                          frames=(s, e), measured={"brow_above_rest": mb, "AU41": md}, limit=limit,
                          message=f"brows {mb:.2f} above rest with lid droop AU41 {md:.2f} (frames {s}-{e - 1}); "
                                  "the category does not allow it"))
    return out


def shift_velocity(hv: np.ndarray, s: int, e: int, cfg: CriticConfig, fps: int) -> tuple[float, float, float, float]:
    """Amplitude (deg), peak velocity estimate (deg/s), peak frame velocity (deg/s) and duration (s)
    of the gaze shift over speed frames s..e (inclusive), the peak as max(frame velocity,
    15/8 A/D): see MIN_JERK_PEAK_TO_MEAN."""
    s0 = max(s - 1, 0)
    # the farthest the gaze gets from where the shift began: an overshoot that comes back is still
    # a movement of that size (for a clean step it is the start-to-end distance)
    amp = float(np.linalg.norm(hv[s0 : e + 1] - hv[s0], axis=1).max()) * cfg.gaze_deg_per_unit
    steps = np.linalg.norm(np.diff(hv[s0 : e + 1], axis=0), axis=1) * fps * cfg.gaze_deg_per_unit
    frame_peak = float(steps.max()) if len(steps) else 0.0
    dur = max(e - s0, 1) / fps
    return amp, max(frame_peak, MIN_JERK_PEAK_TO_MEAN * amp / dur), frame_peak, dur


def main_sequence_limit(amplitude_deg: float, cfg: CriticConfig) -> float:
    """The fastest peak velocity allowed for a shift: tolerance x vmax (1 - exp(-A / c))."""
    return cfg.saccade_tolerance * cfg.saccade_vmax_deg_s * (1.0 - math.exp(-amplitude_deg / cfg.saccade_c_deg))


def _saccades(c: np.ndarray, closed: np.ndarray, events_cfg: EventsConfig, fps: int):
    return [ev for ev in gaze_events(gaze_hv(c), closed, events_cfg, fps) if ev.event_type == "saccade"]


def gaze_main_sequence(c: np.ndarray, closed: np.ndarray, plan: Plan, cfg: CriticConfig, events_cfg: EventsConfig,
                       fps: int) -> list[CriticCheck]:
    """Each gaze shift (behaviour.events' saccades, lids-closed frames excluded) must not be faster
    than the main sequence allows for its amplitude."""
    hv = gaze_hv(c)
    out, worst = [], (0.0, 0.0, 0.0)
    for ev in _saccades(c, closed, events_cfg, fps):
        amp, peak, frame_peak, dur = shift_velocity(hv, ev.start_frame, ev.end_frame, cfg, fps)
        lim = main_sequence_limit(amp, cfg)
        if peak / max(lim, 1e-9) > worst[0] / max(worst[1], 1e-9) or worst[1] == 0.0:
            worst = (peak, lim, amp)
        if peak <= lim:
            continue
        s0 = max(ev.start_frame - 1, 0)
        out.append(_check("gaze_main_sequence", False, GAZE, event_index=event_at(plan, s0), frames=(s0, ev.end_frame + 1),
                          measured={"amplitude_deg": amp, "peak_velocity_deg_s": peak, "frame_velocity_deg_s": frame_peak,
                                    "duration_s": dur},
                          limit={"peak_velocity_deg_s": lim},
                          message=f"a {amp:.1f}° gaze shift in {dur:.2f} s peaks at >= {peak:.0f}°/s; "
                                  f"the main sequence allows {lim:.0f}°/s"))
    if not out and worst[1] == 0.0:
        out.append(_check("gaze_main_sequence", True, GAZE, message="no gaze shift"))
    elif not out:  # the shift closest to its limit
        out.append(_check("gaze_main_sequence", True, GAZE, measured={"amplitude_deg": worst[2], "peak_velocity_deg_s": worst[0]},
                          limit={"peak_velocity_deg_s": worst[1]}, message="every gaze shift within the main sequence"))
    return out


def gaze_head_coordination(c: np.ndarray, rest: np.ndarray, plan: Plan, cfg: CriticConfig, fps: int,
                           allowed: bool = False) -> list[CriticCheck]:
    """Horizontal gaze held beyond gaze_head_eccentricity_deg for gaze_head_hold_s needs the head to
    turn gaze_head_min_turn_deg the same way (from where the gaze shift began, or from rest), unless
    the category allows gaze without the head (evasive glances).

    Vertical gaze is left out: people read and look down with the eyes alone, and gaze_up is weak.
    """
    chans = ("gaze_left", "gaze_right", "yaw")
    rest_h = gaze_hv(rest[None, :])[0, 0]  # a face's rest gaze is not centred
    h = (gaze_hv(c)[:, 0] - rest_h) * cfg.gaze_deg_per_unit
    yaw = c[:, CI["yaw"]]
    hold = max(1, int(math.ceil(cfg.gaze_head_hold_s * fps - 1e-9)))
    limit = {"eccentricity_deg": cfg.gaze_head_eccentricity_deg, "hold_s": cfg.gaze_head_hold_s,
             "head_turn_deg": cfg.gaze_head_min_turn_deg}
    out = []
    for sign in (1.0, -1.0):
        for s, e in runs(sign * h > cfg.gaze_head_eccentricity_deg, hold):
            onset = s
            while onset > 0 and sign * h[onset - 1] < sign * h[onset]:
                onset -= 1
            turn = gaze_head_turn(yaw, rest[CI["yaw"]], onset, s, e, sign)
            if turn >= cfg.gaze_head_min_turn_deg:
                continue
            side = "left" if sign > 0 else "right"
            out.append(_check("gaze_head_coordination", False, chans, event_index=event_at(plan, s), frames=(onset, e),
                              measured={"gaze_deg": float(np.max(sign * h[s:e])), "hold_s": (e - s) / fps, "head_turn_deg": turn,
                                        "direction": sign, "hold_start": s},
                              limit=limit,
                              message=f"gaze held {float(np.max(sign * h[s:e])):.0f}° to the subject's {side} "
                                      f"for {(e - s) / fps:.1f} s "
                                      f"while the head turns {turn:.1f}° that way (needs {cfg.gaze_head_min_turn_deg}°)"))
    if allowed or not out:
        msg = (f"{len(out)} eccentric hold(s) without the head, allowed by the category" if out
               else "no eccentric gaze held without the head")
        return [_check("gaze_head_coordination", True, chans, measured={"gaze_deg": float(np.max(np.abs(h)))}, limit=limit,
                       message=msg)]
    return out


def gaze_head_turn(yaw: np.ndarray, rest_yaw: float, onset: int, s: int, e: int, sign: float) -> float:
    """How far the head turned toward the gaze during a hold: its mean yaw over [s, e) against the
    yaw where the gaze shift began, or against rest when the head was already turned."""
    held = float(np.mean(yaw[s:e]))
    return max(sign * (held - yaw[onset]), sign * (held - rest_yaw))


def head_speed(c: np.ndarray, fps: int) -> np.ndarray:
    """Angular speed of the head per frame (deg/s, norm of the yaw/pitch/roll step; 0 at frame 0)."""
    head = c[:, CI["yaw"] :]
    speed = np.zeros(len(c))
    speed[1:] = np.linalg.norm(np.diff(head, axis=0), axis=1) * fps
    return speed


def head_velocity(c: np.ndarray, plan: Plan, cfg: CriticConfig, fps: int) -> list[CriticCheck]:
    speed = head_speed(c, fps)
    lim = {"velocity_deg_s": cfg.head_max_velocity_deg_s}
    out = []
    for s, e in runs(speed > cfg.head_max_velocity_deg_s):
        peak = float(speed[s:e].max())
        out.append(_check("head_velocity", False, HEAD, event_index=event_at(plan, s - 1), frames=(s - 1, e),
                          measured={"velocity_deg_s": peak}, limit=lim,
                          message=f"the head moves at {peak:.0f}°/s over frames {s - 1}-{e - 1}; "
                                  f"the limit is {cfg.head_max_velocity_deg_s}°/s"))
    if not out:
        out.append(_check("head_velocity", True, HEAD, measured={"velocity_deg_s": float(speed.max())}, limit=lim,
                          message="head speed within the limit"))
    return out


def head_maxima(cfg: CriticConfig) -> dict[str, float]:
    return {"yaw": cfg.head_max_yaw_deg, "pitch": cfg.head_max_pitch_deg, "roll": cfg.head_max_roll_deg}


def head_range(c: np.ndarray, rest: np.ndarray, plan: Plan, cfg: CriticConfig) -> list[CriticCheck]:
    """|yaw|, |pitch|, |roll| of the composed (absolute) pose within their maxima; a plan whose
    target (relative to the portrait's pose) lies wholly outside is the planner's to fix."""
    out = []
    for name, mx in head_maxima(cfg).items():
        x = c[:, CI[name]]
        found = runs(np.abs(x) > mx)
        for s, e in found:
            k = event_at(plan, s)
            tg = plan.events[k].targets.get(name)
            impossible = False
            if tg is not None:
                lo, hi = interval(tg)
                impossible = rest[CI[name]] + lo > mx or rest[CI[name]] + hi < -mx
            peak = float(np.abs(x[s:e]).max())
            out.append(_check("head_range", False, (name,), "planner" if impossible else "composer", event_index=k, frames=(s, e),
                              measured={f"{name}_deg": peak}, limit={f"{name}_deg": mx},
                              message=f"|{name}| reaches {peak:.1f}° (frames {s}-{e - 1}); the range is ±{mx}°"
                                      + (" and the plan's target lies outside it" if impossible else "")))
    if not out:
        out.append(_check("head_range", True, HEAD, measured={f"{n}_deg": float(np.abs(c[:, CI[n]]).max()) for n in HEAD},
                          limit={f"{n}_deg": v for n, v in head_maxima(cfg).items()}, message="head pose within range"))
    return out


# --------------------------------------------------------------------------------------------
# repairs: pure functions of (controls copy, check, plan, rest, cfg, fps) -> description
# --------------------------------------------------------------------------------------------
def repair_blink_duration(c: np.ndarray, check: CriticCheck, plan: Plan, rest: np.ndarray, cfg: CriticConfig, fps: int,
        events_cfg: EventsConfig) -> str:
    """Time-compress the closure's AU45 excursion to blink_typical_s, from its onset; the frames it
    leaves get the surrounding open level. Lid tightening (AU7) and droop (AU41) on those frames are
    held to their level before the closure: real long closures are often a squint that reads as
    closed, and releasing AU45 alone would leave the lids at the closure threshold."""
    s, e = check.frames
    idx = [CI[n] for n in AU45]
    a, b = closure_extent(c[:, idx], s, e, rest[idx])
    n_new = min(max(1, int(round(cfg.blink_typical_s * fps))), b - a)
    src = np.arange(b - a)
    pos = np.linspace(0, b - a - 1, n_new)
    for i in idx:
        fill = open_fill(c[:, i], a, b)
        excursion = c[a:b, i] - fill
        c[a:b, i] = fill
        c[a : a + n_new, i] = np.clip(fill[:n_new] + np.interp(pos, src, excursion), 0.0, 1.0)
    freed = a + n_new
    if freed < b:
        ramp = min(int(round(cfg.edge_s * fps)), b - freed)
        w = np.ones(b - freed)
        if ramp:
            w[-ramp:] = smoothstep(1.0 - np.arange(1, ramp + 1) / (ramp + 1))
        for name in LID_NARROWING:
            i = CI[name]
            before = max(c[a - 1, i] if a > 0 else rest[i], rest[i])
            x = c[freed:b, i]
            c[freed:b, i] = x - w * np.maximum(x - before, 0.0)
    return f"compressed the {check.measured.get('duration_s', 0):.2f} s closure at frame {s} to a {n_new / fps:.2f} s blink"


def repair_blink_interval(c: np.ndarray, check: CriticCheck, plan: Plan, rest: np.ndarray, cfg: CriticConfig, fps: int,
        events_cfg: EventsConfig) -> str:
    """Remove the later closure (the earlier one when only the later was asked for)."""
    m = check.measured
    first = (int(m["earlier_start"]), int(m["earlier_end"]))
    later = (int(m["later_start"]), int(m["later_end"]))
    acts = plan_actions(plan)
    asked = lambda sp: any(overlaps(sp[0], sp[1], a.start_frame, a.end_frame) for _, a in acts)  # noqa: E731
    drop = first if asked(later) and not asked(first) else later
    remove_closure(c, *drop, rest)
    return f"removed the closure at frame {drop[0]} ({m['interval_s']:.2f} s after the previous one)"


def repair_blink_asymmetry(c: np.ndarray, check: CriticCheck, plan: Plan, rest: np.ndarray, cfg: CriticConfig, fps: int,
        events_cfg: EventsConfig) -> str:
    """Both eyes follow the mean closure curve (each eye's AU45 above its own rest), scaled to the
    stronger eye's depth so the blink stays a blink; when the eyes disagree so much that the mean is
    shallow (one rises as the other falls), both follow the stronger eye."""
    s, e = check.frames
    idx = [CI[n] for n in AU45]
    spans = [closure_extent(c[:, [i]], s, e, rest[[i]]) for i in idx]
    a, b = min(x[0] for x in spans), max(x[1] for x in spans)
    dev = np.maximum(c[a:b, idx] - rest[idx], 0.0)
    mean, depth = dev.mean(axis=1), float(dev.max())
    shape = mean * (depth / mean.max()) if mean.max() >= 0.5 * depth and depth > 0 else dev.max(axis=1)
    for k, i in enumerate(idx):
        c[a:b, i] = np.clip(rest[i] + shape, 0.0, 1.0)
    return f"set both eyes to the mean closure curve over frames {a}-{b - 1}"


def _scale_excursion(x: np.ndarray, base: float, cap: float, s: int, e: int, ramp: int) -> None:
    """Scale x's excursion above ``base`` so its peak over [s, e) is ``cap``, blending back to the
    original over ``ramp`` frames on each side, in place (a factor < 1 never adds a violation)."""
    peak = float(np.max(x[s:e] - base))
    if peak <= cap or peak <= 0:
        return
    f = max(cap, 0.0) / peak
    w = np.zeros(len(x))
    w[s:e] = 1.0
    ramp_w = smoothstep(np.arange(1, ramp + 1) / (ramp + 1)) if ramp > 0 else np.zeros(0)
    for k, v in enumerate(ramp_w[::-1]):
        if s - 1 - k >= 0:
            w[s - 1 - k] = v
        if e + k < len(x):
            w[e + k] = v
    factor = 1.0 - w * (1.0 - f)
    above = x > base
    x[above] = base + (x[above] - base) * factor[above]


def repair_au_coactivation(c: np.ndarray, check: CriticCheck, plan: Plan, rest: np.ndarray, cfg: CriticConfig, fps: int,
        events_cfg: EventsConfig) -> str:
    """Lower the channel the plan did not ask for: AU41 when the event targets the brows, else the brows."""
    s, e = check.frames
    ramp = int(round(cfg.edge_s * fps))
    targets = plan.events[check.event_index if check.event_index is not None else event_at(plan, s)].targets
    if any(n in targets for n in BROWS):
        _scale_excursion(c[:, CI["AU41"]], 0.0, cfg.repair_headroom * cfg.coactivation_droop, s, e, ramp)
        return f"lowered AU41 below {cfg.coactivation_droop} over frames {s}-{e - 1} (the plan asks for the brows)"
    for n in BROWS:
        _scale_excursion(c[:, CI[n]], rest[CI[n]], cfg.repair_headroom * cfg.coactivation_brow, s, e, ramp)
    return f"lowered the brows to within {cfg.coactivation_brow} of rest over frames {s}-{e - 1} (the plan asks for the droop)"


def repair_gaze_main_sequence(c: np.ndarray, check: CriticCheck, plan: Plan, rest: np.ndarray, cfg: CriticConfig, fps: int,
        events_cfg: EventsConfig) -> str:
    """Spread the shift over enough frames (smoothstep, centred on the original shift) that every
    saccade the rule then finds there meets repair_headroom of the main sequence."""
    s0, e1 = check.frames  # the shift moves from frame s0 to frame e1 - 1
    idx = [CI[n] for n in GAZE]
    amp = check.measured.get("amplitude_deg", 0.0)
    aim = max(cfg.repair_headroom * main_sequence_limit(amp, cfg), 1e-9)
    n = max(e1 - s0, int(math.ceil(MIN_JERK_PEAK_TO_MEAN * amp * fps / aim)))  # the fewest frames that can pass
    before, after = c[s0, idx].copy(), c[e1 - 1, idx].copy()
    orig = c[:, idx].copy()
    closed = np.zeros(len(c), dtype=bool)
    while True:
        n = min(n, len(c) - 1)
        a = int(min(max(round((s0 + e1 - 1) / 2.0 - n / 2.0), 0), len(c) - 1 - n))
        c[:, idx] = orig
        c[a : a + n + 1, idx] = before + (after - before) * smoothstep(np.arange(n + 1) / n)[:, None]
        hv = gaze_hv(c)
        ok = True
        for ev in _saccades(c, closed, events_cfg, fps):
            if overlaps(ev.start_frame - 1, ev.end_frame + 1, a, a + n + 1):
                amp_k, peak, _, _ = shift_velocity(hv, ev.start_frame, ev.end_frame, cfg, fps)
                ok &= peak <= cfg.repair_headroom * main_sequence_limit(amp_k, cfg)
        if ok or n >= len(c) - 1:
            break
        n += 1
    return f"spread the {amp:.0f}° gaze shift at frame {s0} over {n} frames ({n / fps:.2f} s)"


def repair_gaze_head(c: np.ndarray, check: CriticCheck, plan: Plan, rest: np.ndarray, cfg: CriticConfig, fps: int,
        events_cfg: EventsConfig) -> str:
    """Turn the head toward the held gaze: a yaw ramp from the shift's onset, held, and back after."""
    onset, e = check.frames
    s = int(check.measured["hold_start"])
    sign = float(check.measured["direction"])
    yaw = c[:, CI["yaw"]]
    deficit = cfg.gaze_head_min_turn_deg + cfg.gaze_head_turn_margin_deg - gaze_head_turn(yaw, rest[CI["yaw"]], onset, s, e, sign)
    step = cfg.repair_headroom * cfg.head_max_velocity_deg_s / fps
    ramp = max(int(round(cfg.edge_s * fps)), int(math.ceil(1.5 * abs(deficit) * 2 / step)), 1)
    w = np.zeros(len(c))
    w[onset : onset + ramp] = smoothstep(np.arange(ramp) / ramp)[: len(w) - onset]
    w[min(onset + ramp, len(c)) : e] = 1.0
    w[e : e + ramp] = smoothstep(1.0 - np.arange(1, ramp + 1) / ramp)[: max(0, len(w) - e)]
    amp = deficit / max(float(w[s:e].mean()), 1e-6)
    c[:, CI["yaw"]] = yaw + sign * amp * w
    return f"turned the head {amp:.1f}° toward the held gaze over frames {onset}-{min(e + ramp, len(c)) - 1}"


def limit_head_velocity(head: np.ndarray, max_step: float, smooth: int) -> np.ndarray:
    """Re-time a (T, 3) head trajectory so no frame step exceeds ``max_step`` degrees: follow the
    original with clamped steps (it lags, then catches up), smooth where it changed, clamp again."""

    def follow(target: np.ndarray) -> np.ndarray:
        out = target.copy()
        for t in range(1, len(out)):
            step = target[t] - out[t - 1]
            norm = float(np.linalg.norm(step))
            out[t] = out[t - 1] + (step * (max_step / norm) if norm > max_step else step)
        return out

    clamped = follow(head)
    changed = np.flatnonzero(np.any(np.abs(clamped - head) > 1e-9, axis=1))
    if len(changed) == 0:
        return clamped
    a, b = max(0, changed[0] - smooth), min(len(head), changed[-1] + smooth + 1)
    smoothed = clamped.copy()
    for j in range(head.shape[1]):
        smoothed[a:b, j] = moving_average(clamped[:, j], smooth)[a:b]
    return follow(smoothed)


def repair_head_velocity(c: np.ndarray, check: CriticCheck, plan: Plan, rest: np.ndarray, cfg: CriticConfig, fps: int,
        events_cfg: EventsConfig) -> str:
    step = cfg.repair_headroom * cfg.head_max_velocity_deg_s / fps
    hs = slice(CI["yaw"], CI["roll"] + 1)
    c[:, hs] = limit_head_velocity(c[:, hs], step, max(1, int(round(cfg.edge_s * fps))))
    return f"re-timed the head so it moves at most {cfg.repair_headroom * cfg.head_max_velocity_deg_s:.0f}°/s"


def soft_clip(x: np.ndarray, limit: float, knee: float = 0.8) -> np.ndarray:
    """Values within knee x limit untouched; beyond, a tanh shoulder that stays inside the limit
    (slope <= 1, so no velocity grows)."""
    k = knee * limit
    room = limit - k
    mag = np.abs(x)
    over = mag > k
    out = x.copy()
    out[over] = np.sign(x[over]) * (k + room * np.tanh((mag[over] - k) / room))
    return out


def repair_head_range(c: np.ndarray, check: CriticCheck, plan: Plan, rest: np.ndarray, cfg: CriticConfig, fps: int,
        events_cfg: EventsConfig) -> str:
    """Soft-clip the channel into repair_headroom of its range (a smooth shoulder, never a flat cut)."""
    name = check.channels[0]
    mx = head_maxima(cfg)[name]
    c[:, CI[name]] = soft_clip(c[:, CI[name]], cfg.repair_headroom * mx)
    return f"clipped {name} smoothly into ±{cfg.repair_headroom * mx:.1f}°"


PHYSIOLOGICAL_REPAIRS = {
    "blink_duration": repair_blink_duration,
    "blink_interval": repair_blink_interval,
    "blink_asymmetry": repair_blink_asymmetry,
    "au_coactivation": repair_au_coactivation,
    "gaze_main_sequence": repair_gaze_main_sequence,
    "gaze_head_coordination": repair_gaze_head,
    "head_velocity": repair_head_velocity,
    "head_range": repair_head_range,
}
