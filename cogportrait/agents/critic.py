"""The Stage-1 critic's semantic checks and the repair dispatcher (paper §3.3 "Constraint Enforcement").

Semantic checks ask whether the composed sequence says what was asked: the label's required
channels (S_y) move, every event's channels reach its targets, and every instruction is met —
side (a left brow raise lifts AU2L above AU2R), direction (look right: gaze_right above gaze_left;
lower the head: pitch falls), count (blink twice: two closures), duration (close your eyes for
2 s: a 2 s closure) and wink side. The physiological rules live in ``physiology.py``; ``repair``
fixes a failing check of either kind and returns new controls plus one line saying what it did.

How an event's level is measured (``event_level``): the event's edges (``edge_s``, at most a third
of a short event) belong to the cross-fade and are skipped. AU and gaze channels: events of
``sustained_event_s`` or longer are measured by their median (a held state, robust to blinks and
glances), shorter ones by their peak toward the target (max when the target lies above rest, min
when below); AU45 frames inside the event's blink/wink/closure Actions are left out (those are
phasic, the target is the tonic lid). Head channels: the angle relative to rest (the reference
portrait's pose) where the event ends (mean of its last three core frames) — where the event takes
the head. The level passes within ``target_tolerance`` (``head_target_tolerance_deg``) of the range.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from cogportrait.agents.models import Action, CriticCheck, Event, Plan, interval
from cogportrait.agents.physiology import (
    AU45, HONOURED_EXCEPTIONS, HEAD, PHYSIOLOGICAL_CHECKS, PHYSIOLOGICAL_REPAIRS, CannotRepair, Closure, CriticInputError,
    add_closure, detect_closures, edge_frames, head_maxima, make_check, physiological_checks, remove_closure, span_window,
    validate_inputs,
)
from cogportrait.config import CriticConfig, EventsConfig
from cogportrait.schema import CHANNEL_INDEX, CLIP_FPS, HEAD_ANGLE_SCALE_DEG

log = logging.getLogger("cogportrait")

CI = CHANNEL_INDEX
SEMANTIC_CHECKS = ("label_channels", "event_targets", "instruction")
# ordered pairs (asked, opposite): a side or direction is asked when the first leads the second
SIDE_PAIRS = (("AU2L", "AU2R"), ("AU2R", "AU2L"), ("AU4L", "AU4R"), ("AU4R", "AU4L"), ("AU45L", "AU45R"), ("AU45R", "AU45L"))
GAZE_PAIRS = (("gaze_left", "gaze_right"), ("gaze_right", "gaze_left"), ("gaze_up", "gaze_down"), ("gaze_down", "gaze_up"))
OPPOSITE_GAZE = (("gaze_left", "gaze_right"), ("gaze_up", "gaze_down"))
HEAD_WINDOW = 3  # core frames averaged for the head's end level

__all__ = [
    "HONOURED_EXCEPTIONS", "PHYSIOLOGICAL_CHECKS", "SEMANTIC_CHECKS", "CannotRepair", "CriticInputError", "event_level",
    "physiological_checks", "repair", "semantic_checks",
]


# --------------------------------------------------------------------------------------------
# measuring an event
# --------------------------------------------------------------------------------------------
def _core(ev: Event, n_total: int, cfg: CriticConfig, fps: int) -> tuple[int, int]:
    m = edge_frames(ev.n_frames, cfg, fps)
    return min(ev.start_frame + m, n_total), min(ev.end_frame - m, n_total)


def _action_mask(ev: Event, a: int, b: int, pad: int = 2) -> np.ndarray:
    """True on core frames [a, b) that no Action of the event (grown by ``pad``) covers."""
    keep = np.ones(b - a, dtype=bool)
    for act in ev.actions:
        keep[max(act.start_frame - pad - a, 0) : max(act.end_frame + pad - a, 0)] = False
    return keep


def _level(x: np.ndarray, sustained: bool, upward: bool) -> float:
    if sustained:
        return float(np.median(x))
    return float(np.max(x) if upward else np.min(x))


def event_level(c: np.ndarray, rest: np.ndarray, ev: Event, name: str, cfg: CriticConfig, fps: int = CLIP_FPS) -> float | None:
    """The event's level on one targeted channel (module docstring); None when no frame is left."""
    a, b = _core(ev, len(c), cfg, fps)
    if b <= a:
        return None
    i = CI[name]
    if name in HEAD:
        rel = c[a:b, i] - rest[i]
        return float(np.mean(rel[-min(HEAD_WINDOW, len(rel)) :]))
    x = c[a:b, i]
    if name in AU45 and ev.actions:
        x = x[_action_mask(ev, a, b)]
        if len(x) == 0:
            return None
    lo, hi = interval(ev.targets[name])
    return _level(x, ev.n_frames >= cfg.sustained_event_s * fps, (lo + hi) / 2 >= rest[i])


def _tolerance(name: str, cfg: CriticConfig) -> float:
    return cfg.head_target_tolerance_deg if name in HEAD else cfg.target_tolerance


def _aim(level: float, lo: float, hi: float) -> float:
    """Where a repair puts a level: the nearest point of the middle half of the range."""
    q = 0.25 * (hi - lo)
    return float(np.clip(level, lo + q, hi - q))


def _retarget(c: np.ndarray, rest: np.ndarray, ev: Event, name: str, goal: float, cfg: CriticConfig, fps: int) -> bool:
    """Move the event's level on ``name`` to ``goal``, in place: an affine map of the channel about
    its rest on the event span (an offset when the channel sits at rest or the gain would be wild),
    weighted by span_window so the cross-fades at the edges keep meeting the neighbours."""
    level = event_level(c, rest, ev, name, cfg, fps)
    if level is None:
        return False
    i = CI[name]
    s, e = ev.start_frame, min(ev.end_frame, len(c))
    w = span_window(e - s, edge_frames(ev.n_frames, cfg, fps))
    base = rest[i]
    x = c[s:e, i]
    dev_level, dev_goal = level if name in HEAD else level - base, goal if name in HEAD else goal - base
    gain = dev_goal / dev_level if abs(dev_level) > 1e-3 else np.inf
    if 0.0 < gain <= 3.0:
        new = x + w * (gain - 1.0) * (x - base)
    else:
        new = x + w * (dev_goal - dev_level)
    c[s:e, i] = new if name in HEAD else np.clip(new, 0.0, 1.0)
    return True


# --------------------------------------------------------------------------------------------
# semantic checks
# --------------------------------------------------------------------------------------------
def _check(name: str, passed: bool, channels: Sequence[str], revise: str = "composer", **kw) -> CriticCheck:
    return make_check("semantic", name, passed, channels, revise, **kw)


def semantic_checks(
    controls: np.ndarray,
    canon: np.ndarray,
    rest: np.ndarray,
    plan: Plan,
    required: Sequence[str],
    cfg: CriticConfig,
    events_cfg: EventsConfig,
    fps: int = CLIP_FPS,
) -> list[CriticCheck]:
    """The label's channels, every event's targets (one check per event) and every instruction event."""
    c = validate_inputs(controls, canon, rest)
    rest = np.asarray(rest, dtype=np.float64)
    closures = detect_closures(c, canon, events_cfg, fps)
    out = [label_channels(c, rest, plan, required, cfg)]
    out += [event_targets(c, rest, plan, k, cfg, fps) for k in range(len(plan.events))]
    out += [instruction(c, rest, plan, k, closures, cfg, fps) for k, ev in enumerate(plan.events) if ev.source == "instruction"]
    return out


def _active_threshold(name: str, cfg: CriticConfig) -> float:
    return cfg.channel_active * HEAD_ANGLE_SCALE_DEG if name in HEAD else cfg.channel_active


def _deviation(c: np.ndarray, rest: np.ndarray, name: str) -> float:
    """How far a channel moves from rest: up for AU and (rectified) gaze channels, either way for head angles."""
    d = c[:, CI[name]] - rest[CI[name]]
    return float(np.max(np.abs(d)) if name in HEAD else np.max(d))


def label_channels(c: np.ndarray, rest: np.ndarray, plan: Plan, required: Sequence[str], cfg: CriticConfig) -> CriticCheck:
    """Every channel in the label's S_y is active somewhere (AU: channel_active above rest; gaze:
    that far either way; head: channel_active x 30° either way)."""
    unknown = [n for n in required if n not in CI]
    if unknown:
        raise CriticInputError(f"unknown required channel(s) {', '.join(unknown)}")
    measured = {n: _deviation(c, rest, n) for n in required}
    limit = {n: _active_threshold(n, cfg) for n in required}
    idle = [n for n in required if measured[n] < limit[n]]
    if not idle:
        msg = f"all {len(required)} required channels active" if required else "the label requires no channel"
        return _check("label_channels", True, list(required), measured=measured, limit=limit, message=msg)
    untargeted = [n for n in idle if not any(n in ev.targets for ev in plan.events)]
    return _check("label_channels", False, idle, "planner" if untargeted else "composer", measured=measured, limit=limit,
                  message="required channel(s) never active: "
                          + ", ".join(f"{n} {measured[n]:.2f} < {limit[n]:.2f}" for n in idle)
                          + (f"; no event targets {', '.join(untargeted)}" if untargeted else ""))


def _contradictions(ev: Event, rest: np.ndarray, cfg: CriticConfig) -> list[str]:
    """Targets no realisation can meet: opposite gaze channels both asked up, a head angle out of range."""
    out = []
    for a, b in OPPOSITE_GAZE:
        if a in ev.targets and b in ev.targets and interval(ev.targets[a])[0] > 0 and interval(ev.targets[b])[0] > 0:
            out.append(f"{a} and {b} both above 0")
    for name, mx in head_maxima(cfg).items():
        if name in ev.targets:
            lo, hi = interval(ev.targets[name])
            if rest[CI[name]] + lo > mx or rest[CI[name]] + hi < -mx:
                out.append(f"{name} target outside ±{mx}°")
    return out


def event_targets(c: np.ndarray, rest: np.ndarray, plan: Plan, k: int, cfg: CriticConfig, fps: int) -> CriticCheck:
    ev = plan.events[k]
    frames = (ev.start_frame, ev.end_frame)
    if not ev.targets:
        return _check("event_targets", True, [], event_index=k, frames=frames, message=f"event {k} ({ev.stage}) has no targets")
    measured, limit, off = {}, {}, []
    for name, target in ev.targets.items():
        lo, hi = interval(target)
        tol = _tolerance(name, cfg)
        level = event_level(c, rest, ev, name, cfg, fps)
        limit[f"{name}_lo"], limit[f"{name}_hi"] = lo - tol, hi + tol
        if level is None:
            continue
        measured[name] = level
        if not lo - tol <= level <= hi + tol:
            off.append(name)
    if not off:
        return _check("event_targets", True, list(ev.targets), event_index=k, frames=frames, measured=measured, limit=limit,
                      message=f"event {k} ({ev.stage}) reaches its targets")
    bad = _contradictions(ev, rest, cfg)
    return _check("event_targets", False, off, "planner" if bad else "composer", event_index=k, frames=frames, measured=measured,
                  limit=limit, message=f"event {k} ({ev.stage}) misses "
                  + ", ".join(f"{n} {measured[n]:.2f} not in [{limit[n + '_lo']:.2f}, {limit[n + '_hi']:.2f}]" for n in off)
                  + (f"; the targets contradict: {'; '.join(bad)}" if bad else ""))


def asked_pairs(ev: Event, rest: np.ndarray, cfg: CriticConfig) -> list[tuple[str, str, str]]:
    """(kind, asked, opposite) for the sides and gaze directions an event's targets ask for: the
    asked channel's floor clears the opposite's ceiling (or its rest) by instruction_margin."""
    out = []
    for kind, pairs in (("side", SIDE_PAIRS), ("direction", GAZE_PAIRS)):
        for a, b in pairs:
            if a not in ev.targets:
                continue
            lo_a = interval(ev.targets[a])[0] - rest[CI[a]]
            hi_b = interval(ev.targets[b])[1] - rest[CI[b]] if b in ev.targets else 0.0
            if lo_a >= hi_b + cfg.instruction_margin:
                out.append((kind, a, b))
    return out


def asked_head(ev: Event) -> list[tuple[str, float]]:
    """(channel, sign) for head targets that exclude 0: the head must move that way."""
    out = []
    for name in HEAD:
        if name in ev.targets:
            lo, hi = interval(ev.targets[name])
            if lo > 0 or hi < 0:
                out.append((name, 1.0 if lo > 0 else -1.0))
    return out


def held_from_previous(plan: Plan, k: int, name: str) -> bool:
    """Whether event k's target on ``name`` overlaps the previous event's (a held state, not a new ask)."""
    if k == 0 or name not in plan.events[k].targets or name not in plan.events[k - 1].targets:
        return False
    lo, hi = interval(plan.events[k].targets[name])
    plo, phi = interval(plan.events[k - 1].targets[name])
    return lo <= phi and plo <= hi


def pair_level(c: np.ndarray, rest: np.ndarray, ev: Event, a: str, b: str, cfg: CriticConfig, fps: int) -> float | None:
    """Level of (a - rest_a) - (b - rest_b) over the event core, by the event_level rule (upward)."""
    lo, hi = _core(ev, len(c), cfg, fps)
    if hi <= lo:
        return None
    d = (c[lo:hi, CI[a]] - rest[CI[a]]) - (c[lo:hi, CI[b]] - rest[CI[b]])
    if a in AU45 and ev.actions:
        d = d[_action_mask(ev, lo, hi)]
    if len(d) == 0:
        return None
    return _level(d, ev.n_frames >= cfg.sustained_event_s * fps, True)


def head_change(
    c: np.ndarray, rest: np.ndarray, ev: Event, name: str, sign: float, cfg: CriticConfig, fps: int
) -> tuple[float, float]:
    """(signed change across the event toward ``sign``, the relative angle before it): from just
    before the event's lead-in cross-fade to its end level."""
    before = c[max(0, ev.start_frame - edge_frames(ev.n_frames, cfg, fps) - 1), CI[name]] - rest[CI[name]]
    end = event_level(c, rest, ev, name, cfg, fps)
    return (sign * (end - before) if end is not None else 0.0), float(before)


def match_closures(actions: Sequence[Action], spans: Sequence[tuple[int, int]]) -> dict[int, int]:
    """Action index -> closure index, nearest centres first, each used once."""
    pairs = sorted(
        (abs((s + e) / 2 - (a.start_frame + a.end_frame) / 2), i, k)
        for i, a in enumerate(actions) for k, (s, e) in enumerate(spans)
    )
    used_a, used_k, out = set(), set(), {}
    for _, i, k in pairs:
        if i not in used_a and k not in used_k:
            out[i] = k
            used_a.add(i)
            used_k.add(k)
    return out


def instruction(c: np.ndarray, rest: np.ndarray, plan: Plan, k: int, closures: Sequence[Closure], cfg: CriticConfig,
                fps: int) -> CriticCheck:
    """An instruction event's side, direction, closure count, closure duration and wink side."""
    ev = plan.events[k]
    measured: dict[str, float] = {}
    limit: dict[str, float] = {}
    fails: list[str] = []
    channels: set[str] = set()
    revise = "composer"
    for kind, a, b in asked_pairs(ev, rest, cfg):
        key = f"{kind}:{a}>{b}"
        lv = pair_level(c, rest, ev, a, b, cfg, fps)
        measured[key], limit[key] = (lv if lv is not None else 0.0), cfg.instruction_margin
        if lv is None or lv < cfg.instruction_margin:
            fails.append(f"{a} does not lead {b} ({measured[key]:.2f} < {cfg.instruction_margin})")
            channels |= {a, b}
    for name, sign in asked_head(ev):
        if held_from_previous(plan, k, name):
            continue  # the planner holds an earlier instruction's head pose: nothing new to move
        key = f"direction:{name}"
        change, before = head_change(c, rest, ev, name, sign, cfg, fps)
        measured[key], limit[key] = change, cfg.head_direction_min_deg
        if change < cfg.head_direction_min_deg:
            fails.append(f"{name} moves {change:+.1f}° toward the asked side (needs {cfg.head_direction_min_deg}°)")
            channels.add(name)
            lo, hi = interval(ev.targets[name])
            if sign * ((hi if sign > 0 else lo) - before) < cfg.head_direction_min_deg:
                revise = "planner"  # the head starts beyond the range it is asked to move into
    if ev.actions:
        inside = [cl for cl in closures if ev.start_frame <= cl.apex < ev.end_frame]
        for j, cl in enumerate(inside):
            measured[f"closure_{j}_start"], measured[f"closure_{j}_end"] = cl.start, cl.end
        measured["count"], limit["count"] = len(inside), len(ev.actions)
        if len(inside) != len(ev.actions):
            fails.append(f"{len(inside)} eye closures where {len(ev.actions)} were asked")
            channels |= set(AU45)
        acts = sorted(ev.actions, key=lambda x: x.start_frame)
        if any(p.end_frame > q.start_frame for p, q in zip(acts, acts[1:])):
            revise = "planner"
        match = match_closures(ev.actions, [(cl.start, cl.end) for cl in inside])
        for i, act in enumerate(ev.actions):
            cl = inside[match[i]] if i in match else None
            if act.kind == "closure" and cl is not None:
                key, asked = f"closure_duration_s:{i}", act.n_frames / fps
                measured[key], limit[key] = cl.n_frames / fps, asked
                if abs(cl.n_frames / fps - asked) > cfg.closure_duration_tolerance * asked + 1e-9:
                    fails.append(f"closure {i} lasts {cl.n_frames / fps:.2f} s, asked {asked:.2f} s")
                    channels |= set(AU45)
            if act.kind == "wink" and cl is not None:
                key = f"wink:{i}"
                measured[key], limit[key] = float(cl.eyes == act.eyes), 1.0
                if cl.eyes != act.eyes:
                    fails.append(f"wink {i} closes {cl.eyes}, asked {act.eyes}")
                    channels |= set(AU45)
    what = f"instruction {ev.instruction or ev.stage!r} (event {k})"
    if not fails:
        return _check("instruction", True, sorted(channels), event_index=k, frames=(ev.start_frame, ev.end_frame),
                      measured=measured, limit=limit, message=f"{what} satisfied")
    return _check("instruction", False, sorted(channels), revise, event_index=k, frames=(ev.start_frame, ev.end_frame),
                  measured=measured, limit=limit, message=f"{what}: " + "; ".join(fails))


# --------------------------------------------------------------------------------------------
# semantic repairs
# --------------------------------------------------------------------------------------------
def _repair_label_channels(c: np.ndarray, check: CriticCheck, plan: Plan, rest: np.ndarray, cfg: CriticConfig, fps: int) -> str:
    """Bring each idle required channel to the far end of the target of an event that targets it;
    where none does (or that is still too little), lift it in the event where it already moves
    most, to channel_active / repair_headroom from rest."""
    done = []
    if set(check.channels) & set(AU45) and not any(ev.actions for ev in plan.events):
        # an idle eye-closure channel wants a blink, not half-closed lids: lay one mid-sequence
        n = max(1, min(len(c), int(round(cfg.blink_typical_s * fps))))
        add_closure(c, (len(c) - n) // 2, n, "both")
        done.append(f"laid a {n}-frame blink at frame {(len(c) - n) // 2}")
    for name in check.channels:
        if name in AU45 and done and done[0].startswith("laid"):
            continue
        i = CI[name]
        targeted = [ev for ev in plan.events if name in ev.targets]
        if targeted:
            ev = targeted[0]
            lo, hi = interval(ev.targets[name])
            _retarget(c, rest, ev, name, hi if name not in HEAD or abs(hi) >= abs(lo) else lo, cfg, fps)
            done.append(f"{name} to event {plan.events.index(ev)}'s target")
            if _deviation(c, rest, name) >= _active_threshold(name, cfg):
                continue
        dev = c[:, i] - rest[i]
        k = int(np.argmax([np.max(np.abs(dev[e.start_frame : e.end_frame])) for e in plan.events]))
        ev = plan.events[k]
        seg = dev[ev.start_frame : ev.end_frame]
        two_way = name in HEAD
        sign = float(np.sign(seg[np.argmax(np.abs(seg))]) or 1.0) if two_way else 1.0
        want = _active_threshold(name, cfg) / cfg.repair_headroom
        w = span_window(ev.n_frames, edge_frames(ev.n_frames, cfg, fps))
        c[ev.start_frame : ev.end_frame, i] += sign * w * max(0.0, want - float(np.max(sign * seg)))
        if name not in HEAD:
            c[:, i] = np.clip(c[:, i], 0.0, 1.0)
        done.append(f"lifted {name} in event {k}")
    return "; ".join(done)


def _repair_event_targets(c: np.ndarray, check: CriticCheck, plan: Plan, rest: np.ndarray, cfg: CriticConfig, fps: int) -> str:
    ev = plan.events[check.event_index]
    moved = []
    for name in [n for n in check.channels if n in ev.targets]:
        level = event_level(c, rest, ev, name, cfg, fps)
        if level is None:
            continue
        goal = _aim(level, *interval(ev.targets[name]))
        if _retarget(c, rest, ev, name, goal, cfg, fps):
            moved.append(f"{name} {level:.2f} -> {goal:.2f}")
    return f"rescaled event {check.event_index} into its targets: " + ", ".join(moved)


def _repair_closures(c: np.ndarray, check: CriticCheck, ev: Event, rest: np.ndarray, cfg: CriticConfig) -> list[str]:
    """Remove closures no Action asked for, and rebuild missing, mistimed or wrong-eyed ones at the
    asked frames (a synthetic closure the detector counts as exactly the asked frames)."""
    m = check.measured
    spans = []
    while f"closure_{len(spans)}_start" in m and f"closure_{len(spans)}_end" in m:
        spans.append((int(m[f"closure_{len(spans)}_start"]), int(m[f"closure_{len(spans)}_end"])))
    match = match_closures(ev.actions, spans)
    done = []
    for j in sorted(set(range(len(spans))) - set(match.values()), reverse=True):
        remove_closure(c, *spans[j], rest)
        done.append(f"removed the extra closure at frame {spans[j][0]}")
    for i, act in enumerate(ev.actions):
        bad = i not in match
        for key in (f"closure_duration_s:{i}", f"wink:{i}"):
            if key in m and key in check.limit:
                want = check.limit[key]
                if key.startswith("wink"):
                    bad |= m[key] != want
                else:
                    bad |= abs(m[key] - want) > cfg.closure_duration_tolerance * want + 1e-9
        if not bad:
            continue
        if i in match:
            remove_closure(c, *spans[match[i]], rest)
        add_closure(c, act.start_frame, act.n_frames, act.eyes)
        done.append(f"laid a {act.n_frames}-frame {act.kind} ({act.eyes}) at frame {act.start_frame}")
    return done


def _repair_instruction(c: np.ndarray, check: CriticCheck, plan: Plan, rest: np.ndarray, cfg: CriticConfig, fps: int) -> str:
    ev = plan.events[check.event_index]
    done = []
    if ev.actions:
        done += _repair_closures(c, check, ev, rest, cfg)
    for kind, a, b in asked_pairs(ev, rest, cfg):
        lv = pair_level(c, rest, ev, a, b, cfg, fps)
        if lv is not None and lv >= cfg.instruction_margin:
            continue
        lo, hi = interval(ev.targets[a])
        level = event_level(c, rest, ev, a, cfg, fps)
        _retarget(c, rest, ev, a, _aim(level if level is not None else lo, lo, hi), cfg, fps)
        if b in ev.targets:
            lb = event_level(c, rest, ev, b, cfg, fps)
            _retarget(c, rest, ev, b, _aim(lb if lb is not None else rest[CI[b]], *interval(ev.targets[b])), cfg, fps)
        lv = pair_level(c, rest, ev, a, b, cfg, fps)
        if lv is None or lv < cfg.instruction_margin:  # still level: hold the opposite side at rest
            s, e = ev.start_frame, ev.end_frame
            w = span_window(ev.n_frames, edge_frames(ev.n_frames, cfg, fps))
            c[s:e, CI[b]] = rest[CI[b]] + (c[s:e, CI[b]] - rest[CI[b]]) * (1.0 - w)
        done.append(f"{a} raised over {b}")
    for name, sign in asked_head(ev):
        change, before = head_change(c, rest, ev, name, sign, cfg, fps)
        if change >= cfg.head_direction_min_deg:
            continue
        lo, hi = interval(ev.targets[name])
        level = event_level(c, rest, ev, name, cfg, fps)
        goal = _aim(level, lo, hi)
        if sign * (goal - before) < cfg.head_direction_min_deg:
            goal = float(np.clip(before + sign * cfg.head_direction_min_deg / cfg.repair_headroom, lo, hi))
        _retarget(c, rest, ev, name, goal, cfg, fps)
        done.append(f"{name} moved to {goal:+.1f}° by the end of event {check.event_index}")
    return f"instruction event {check.event_index}: " + ("; ".join(done) if done else "nothing to change")


# what each repair reads from its check beyond the controls (a check from elsewhere, e.g. an LLM
# critic's review, may lack it: such a check cannot be repaired, only re-planned or re-composed)
_NEEDS_FRAMES = {"blink_duration", "blink_asymmetry", "au_coactivation", "gaze_main_sequence", "gaze_head_coordination"}
_NEEDS_EVENT = {"event_targets", "instruction"}
_NEEDS_MEASURED = {
    "blink_interval": ("interval_s", "earlier_start", "earlier_end", "later_start", "later_end"),
    "gaze_head_coordination": ("hold_start", "direction"),
}


def _repairable(check: CriticCheck, plan: Plan, n_frames: int) -> None:
    """Raise CannotRepair when the check lacks what its repair reads."""
    name = check.name
    if name in _NEEDS_FRAMES and (check.frames is None or not 0 <= check.frames[0] < check.frames[1] <= n_frames):
        raise CannotRepair(f"{name}: the check names no frames inside the sequence ({check.frames})")
    if name in _NEEDS_EVENT and (check.event_index is None or not 0 <= check.event_index < len(plan.events)):
        raise CannotRepair(f"{name}: the check names no event of the plan ({check.event_index})")
    missing = [k for k in _NEEDS_MEASURED.get(name, ()) if k not in check.measured]
    if missing:
        raise CannotRepair(f"{name}: the check lacks the measured {', '.join(missing)}")
    if name == "head_range" and (not check.channels or check.channels[0] not in HEAD):
        raise CannotRepair(f"head_range: the check names no head channel ({check.channels})")
    unknown = [n for n in check.channels if n not in CI]
    if unknown:
        raise CannotRepair(f"{name}: unknown channel(s) {', '.join(unknown)}")


SEMANTIC_REPAIRS = {
    "label_channels": _repair_label_channels,
    "event_targets": _repair_event_targets,
    "instruction": _repair_instruction,
}


def repair(
    controls: np.ndarray,
    check: CriticCheck,
    plan: Plan,
    rest: np.ndarray,
    cfg: CriticConfig,
    fps: int = CLIP_FPS,
    *,
    events_cfg: EventsConfig | None = None,
) -> tuple[np.ndarray, str]:
    """New controls in which ``check``'s rule holds again, and one line saying what was done.

    Never edits ``controls`` in place; a passing check returns an unchanged copy. events_cfg is
    the invert.events section (the gaze repair re-detects saccades with it; defaults otherwise).
    Raises CannotRepair for a check this module did not make (an unknown name, or one without the
    frames, event or numbers its repair reads): send it to the composer or planner instead.
    """
    c = validate_inputs(controls, rest=rest).copy()
    rest = np.asarray(rest, dtype=np.float64)
    dtype = np.asarray(controls).dtype if np.issubdtype(np.asarray(controls).dtype, np.floating) else np.float64
    if check.verdict == "pass":
        return c.astype(dtype), f"{check.name}: nothing to repair"
    if check.name not in PHYSIOLOGICAL_REPAIRS and check.name not in SEMANTIC_REPAIRS:
        raise CannotRepair(f"no repair for check {check.name!r}; known: {', '.join([*PHYSIOLOGICAL_CHECKS, *SEMANTIC_CHECKS])}")
    _repairable(check, plan, len(c))
    if check.name in PHYSIOLOGICAL_REPAIRS:
        what = PHYSIOLOGICAL_REPAIRS[check.name](c, check, plan, rest, cfg, fps, events_cfg or EventsConfig())
    else:
        what = SEMANTIC_REPAIRS[check.name](c, check, plan, rest, cfg, fps)
    log.debug("critic repair %s: %s", check.name, what)
    return c.astype(dtype), what
