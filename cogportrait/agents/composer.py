"""The composition agent's mechanics (paper §3.3): retrieve by Eq. 3, trim, rescale, stitch.

A composed sequence has two layers, because they come from different kinds of real behaviour:

* the **tonic** layer, one retrieved prototype per plan event (brows, lids, gaze, head): trimmed
  or time-scaled to the event's span, its targeted channels rescaled into the target ranges,
  its own eye closures flattened to the open-eye level, and stitched to its neighbours with an
  offset cross-fade (no jump at a boundary, the inner dynamics kept);
* the **phasic** layer, the plan's actions (blinks, winks, held closures), each a retrieved
  closure prototype's AU45 curve stretched to the asked duration and laid over the tonic lids.

So a blink exists only where the plan put one: "blink twice" gives two, not two plus whatever
the retrieved windows contained. Head channels are built as motion relative to the reference
portrait's pose (frame 0 is exactly the measured pose) and chained event to event.

Retrieval goes through any object with the ``PrototypeStore.query`` signature
(``PrototypeSource``), so this core module never imports the store. The label re-ranks (its
prototypes count as ``label_bonus`` closer) but never filters: a library without the label still
composes from label-free Eq. 3. The seed picks among the candidates within ``pick_tolerance`` of
the best, so seeds differ and one seed always gives the same sequence.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from cogportrait.agents.physiology import closure_profile
from cogportrait.agents.models import Action, Composition, Edit, Event, EventComposition, Plan, Retrieved, Target, interval
from cogportrait.config import CompileConfig
from cogportrait.schema import AU_CHANNELS, CHANNEL_INDEX, CONTROL_CHANNELS, GAZE_CHANNELS, HEAD_CHANNELS, N_CHANNELS
from cogportrait.timeseries import smoothstep

log = logging.getLogger("cogportrait")

AU45 = (CHANNEL_INDEX["AU45L"], CHANNEL_INDEX["AU45R"])
HEAD = tuple(CHANNEL_INDEX[c] for c in HEAD_CHANNELS)
BOUNDED = tuple(CHANNEL_INDEX[c] for c in AU_CHANNELS + GAZE_CHANNELS)  # 0-1 channels
# which library event type realises each action, and the closure targets that find it
ACTION_EVENT_TYPES = {"blink": "blink", "wink": "wink", "closure": "prolonged_closure"}
CLOSED_TARGET: dict[str, Target] = {"AU45L": (0.5, 1.0), "AU45R": (0.5, 1.0)}


class Candidate(Protocol):
    """What retrieval returns per prototype (``prototype_store.Match`` satisfies it)."""

    prototype_id: str
    distance: float
    label: str | None
    event_type: str | None
    clip_id: str | None
    identity: str | None
    T: int
    controls: np.ndarray | None


class PrototypeSource(Protocol):
    """The retrieval interface the composer needs (``prototype_store.PrototypeStore`` has it)."""

    labels: list[str]

    def query(
        self, targets: Mapping[str, object], label: str | None = None, event_type: str | None = None, k: int = 5,
        min_frames: int | None = None, identity_exclude: str | Iterable[str] | None = None, arrays: Any = True,
    ) -> Sequence[Candidate]: ...


# ------------------------------------------------------------------------------------------------
# small maths
# ------------------------------------------------------------------------------------------------
def resample(x: np.ndarray, n: int) -> np.ndarray:
    """(T, C) resampled to n frames by linear interpolation (time scaling)."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) == n:
        return x.copy()
    if len(x) == 1:
        return np.repeat(x, n, axis=0)
    src = np.linspace(0.0, 1.0, len(x))
    dst = np.linspace(0.0, 1.0, n)
    return np.stack([np.interp(dst, src, x[:, j]) for j in range(x.shape[1])], axis=1)


def ramp(n: int) -> np.ndarray:
    """n weights rising smoothly from 0 to 1 (``timeseries.smoothstep``), for ramps and cross-fades;
    a 1-frame ramp is already there."""
    if n <= 1:
        return np.ones(max(n, 0))
    return smoothstep(np.linspace(0.0, 1.0, n))


def synthetic_closure(n_frames: int, amplitude: float) -> np.ndarray:
    """An AU45 rise closing the lids for exactly ``n_frames`` (the critic's closure profile, which
    its detector counts as n frames), for a library that holds no real closure."""
    return amplitude * closure_profile(n_frames)[1:-1]


def closure_shape(
    au45: np.ndarray, n_frames: int, synthetic_amplitude: float, one_eyed: bool = False,
) -> tuple[np.ndarray, tuple[int, int]]:
    """A real closure's AU45 rise (T, 2) reshaped to close the lids for ``n_frames``.

    The onset (open -> 90 % closed) and the offset keep their real speed, the closed top is held
    as long as asked; only when the asked closure is shorter than the two ramps is the whole
    closure time-scaled. A real closure often dips in the middle (a flutter): the held top is the
    peak level, so one asked closure reads as one closure. Both eyes follow their mean curve
    unless ``one_eyed`` (a wink keeps its sides). A prototype with no rise at all gives the synthetic
    closure of ``synthetic_amplitude``. Returns the curve and the source frames used.
    """
    open_level = np.minimum(au45[0], au45[-1])
    rise = np.clip(au45 - open_level, 0.0, None)
    level = rise.max(axis=1) if one_eyed else rise.mean(axis=1)
    peak = float(level.max())
    if peak <= 1e-6:
        curve = synthetic_closure(n_frames, synthetic_amplitude)
        return np.stack([curve, curve], axis=1), (0, len(au45))
    top = np.flatnonzero(level >= 0.9 * peak)
    first_top, last_top = int(top[0]), int(top[-1])
    low = np.flatnonzero(level < 0.1 * peak)
    a = int(low[low < first_top].max()) if np.any(low < first_top) else 0
    b = int(low[low > last_top].min()) + 1 if np.any(low > last_top) else len(level)
    onset, offset = rise[a:first_top], rise[last_top + 1 : b]
    hold = n_frames - len(onset) - len(offset)
    if hold < 1:
        out = resample(rise[a:b], n_frames)
    else:
        out = np.concatenate([onset, np.repeat(rise[first_top:last_top + 1].max(axis=0, keepdims=True), hold, axis=0), offset])
    if not one_eyed:
        out[:] = out.mean(axis=1, keepdims=True)
    return out, (a, b)


def stitch_offsets(controls: np.ndarray, boundaries: Sequence[int], half: int, channels: Sequence[int]) -> np.ndarray:
    """Remove the jump at each event boundary without flattening either side.

    At a boundary b the jump J = x[b] - x[b-1] is split: the previous event's last ``half`` frames
    ramp up by +J/2, the next event's first ``half`` frames start at -J/2 and ramp back to 0, so
    both sides meet at the midpoint and keep their own shape away from the boundary.
    """
    out = controls.copy()
    T = len(out)
    for b in boundaries:
        if b <= 0 or b >= T:
            continue
        h_prev = min(half, b)
        h_next = min(half, T - b)
        for j in channels:
            jump = out[b, j] - out[b - 1, j]
            if jump == 0:
                continue
            out[b - h_prev : b, j] += 0.5 * jump * ramp(h_prev + 1)[1:]
            out[b : b + h_next, j] -= 0.5 * jump * ramp(h_next + 1)[::-1][:-1]
    return out


def fit_into_range(x: np.ndarray, lo: float, hi: float, floor_width: float) -> tuple[np.ndarray, float, float]:
    """Affine map of a channel segment so its values sit inside [lo, hi], keeping its shape.

    The segment's mean moves to the nearest point of the inner half of the range, and its
    excursions shrink (never grow) until every value lies inside the range. A degenerate range (a value) is widened to
    ``floor_width`` so a little natural motion survives. Returns (new, gain, shift).
    """
    mid = 0.5 * (lo + hi)
    width = max(hi - lo, floor_width)
    lo, hi = mid - 0.5 * width, mid + 0.5 * width
    mean = float(x.mean()) if len(x) else mid
    centre = min(max(mean, mid - 0.25 * width), mid + 0.25 * width)
    up = float(np.max(x - mean)) if len(x) else 0.0
    down = float(np.max(mean - x)) if len(x) else 0.0
    gain = min(1.0, (hi - centre) / up if up > 1e-9 else 1.0, (centre - lo) / down if down > 1e-9 else 1.0)
    return centre + gain * (x - mean), gain, centre - mean


# ------------------------------------------------------------------------------------------------
# the composer
# ------------------------------------------------------------------------------------------------
@dataclass
class Composed:
    """A composed control sequence and the record of how it was made."""

    controls: np.ndarray  # (T, 17), head channels absolute degrees
    composition: Composition


class Composer:
    """Plan -> controls by retrieval (Eq. 3), trim, rescale, stitch (paper §3.3)."""

    def __init__(
        self, source: PrototypeSource, cfg: CompileConfig, identity_rest: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self.source = source
        self.cfg = cfg
        # each library identity's AU rest levels (face model baselines): a prototype's AUs are moved
        # from its own face's rest onto the target face's rest before any rescaling
        self.identity_rest = {k: np.asarray(v, dtype=np.float64) for k, v in (identity_rest or {}).items()}
        self._cache: dict[tuple, list[Candidate]] = {}

    def clear_cache(self) -> None:
        """Forget the retrieved candidates (one compile's events share them; a new compile starts afresh)."""
        self._cache.clear()

    # -- retrieval --------------------------------------------------------------------------------
    def candidates(
        self, targets: Mapping[str, Target], label: str | None, event_type: str | None, exclude: frozenset[str],
    ) -> list[tuple[float, Candidate]]:
        """Eq. 3 candidates re-ranked by the label (and the event type hint), best first.

        Up to three exact queries: unfiltered, label-only (when the library has the label), and
        event-type-only when hinted and the unfiltered answer holds no prototype of that type (a
        filtered scan of a common type costs ~10 ms at 1e6 rows); a candidate's score is its
        distance minus ``label_bonus`` if it carries the label (and half of that for the hinted
        type). Results are cached per compile: events share queries.
        """
        key = (tuple(sorted((k, interval(v)) for k, v in targets.items())), label, event_type, exclude)
        if key not in self._cache:
            k = self.cfg.candidates
            ident = sorted(exclude) or None
            found: dict[str, Candidate] = {}
            queries: list[dict[str, Any]] = [{}]
            if label is not None and label in self.source.labels:
                queries.append({"label": label})
            for extra in queries:
                for m in self.source.query(dict(targets), k=k, identity_exclude=ident, arrays="controls", **extra):
                    found.setdefault(m.prototype_id, m)
            if event_type is not None and not any(m.event_type == event_type for m in found.values()):
                for m in self.source.query(dict(targets), k=k, identity_exclude=ident, arrays="controls", event_type=event_type):
                    found.setdefault(m.prototype_id, m)
            self._cache[key] = list(found.values())
        scored = []
        for m in self._cache[key]:
            score = m.distance
            if label is not None and m.label == label:
                score -= self.cfg.label_bonus
            if event_type is not None and m.event_type == event_type:
                score -= 0.5 * self.cfg.label_bonus
            scored.append((score, m))
        scored.sort(key=lambda sm: (sm[0], sm[1].prototype_id))
        return scored

    def pick(
        self, scored: list[tuple[float, Candidate]], n_frames: int, rng: np.random.Generator, avoid: set[str],
    ) -> tuple[Candidate, float] | None:
        """The seed's choice among the near-best candidates (long enough ones preferred)."""
        usable = [(s, m) for s, m in scored if m.prototype_id not in avoid and m.controls is not None and len(m.controls)]
        if not usable:
            return None
        best = usable[0][0]
        near = [(s, m) for s, m in usable if s <= best + self.cfg.pick_tolerance]
        long_enough = [(s, m) for s, m in near if m.T >= n_frames]
        pool = long_enough or near
        score, match = pool[int(rng.integers(len(pool)))]
        return match, score

    # -- one event ----------------------------------------------------------------------------------
    def tonic_segment(
        self, event: Event, match: Candidate | None, rest: np.ndarray, rng: np.random.Generator,
    ) -> tuple[np.ndarray, list[Edit], tuple[int, int]]:
        """The event's tonic controls (n, 17), head channels relative to the event's first frame."""
        n = event.n_frames
        edits: list[Edit] = []
        if match is None:
            seg = np.repeat(rest[None, :], n, axis=0).astype(np.float64)
            seg[:, list(HEAD)] = 0.0
            edits.append(Edit(op="synthesise", detail="no prototype retrieved: rest levels", channels=list(CONTROL_CHANNELS)))
            src = (0, 0)
        else:
            proto = np.asarray(match.controls, dtype=np.float64)
            T = len(proto)
            if T >= n:
                start = int(rng.integers(T - n + 1))
                seg = proto[start : start + n].copy()
                src = (start, start + n)
                if n < T:
                    edits.append(Edit(op="trim", values={"from": start, "to": start + n, "of": T}))
            elif n <= 1.5 * T:
                seg = resample(proto, n)
                src = (0, T)
                edits.append(Edit(op="time_scale", values={"factor": n / T}))
            else:
                reps = int(np.ceil(n / T))
                order = [proto if r % 2 == 0 else proto[::-1] for r in range(reps)]  # ping-pong: no seam
                seg = np.concatenate(order)[:n].copy()
                src = (0, T)
                edits.append(Edit(op="loop", detail="ping-pong", values={"repeats": float(reps)}))
            own_rest = self.identity_rest.get(match.identity or "")
            if own_rest is not None:  # re-base onto the target face: AU rests differ by up to 0.9 between faces
                n_au = len(own_rest)
                seg[:, :n_au] += (rest[:n_au] - own_rest)[None, :]
                edits.append(Edit(op="rescale", channels=list(CONTROL_CHANNELS[:n_au]), detail="re-based from the prototype's identity rest",
                                  values={"identity_offset_l1": round(float(np.abs(rest[:n_au] - own_rest).sum()), 4)}))
            # closures belong to the phasic layer: flatten the prototype's own to its open level
            for j in AU45:
                open_level = float(np.percentile(seg[:, j], self.cfg.open_eye_percentile))
                seg[:, j] = np.minimum(seg[:, j], open_level)
            seg[:, list(HEAD)] -= seg[:1, list(HEAD)]
        # channels the event does not target keep their natural motion, damped: a look to the left
        # should not bring its prototype's brow raise along at full height
        for j in BOUNDED:
            if CONTROL_CHANNELS[j] not in event.targets and j not in AU45:
                seg[:, j] = rest[j] + self.cfg.untargeted_gain * (seg[:, j] - rest[j])
        # rescale the targeted channels into their ranges
        for name, target in event.targets.items():
            j = CHANNEL_INDEX[name]
            lo, hi = interval(target)
            if j in HEAD:
                continue  # head targets shape the chained path (compose), not the segment
            new, gain, shift = fit_into_range(seg[:, j], lo, hi, floor_width=0.1)
            if abs(gain - 1.0) > 1e-6 or abs(shift) > 1e-6:
                edits.append(Edit(op="rescale", channels=[name], values={"gain": round(gain, 4), "shift": round(shift, 4)}))
            seg[:, j] = new
        return seg, edits, src

    # -- phasic actions ---------------------------------------------------------------------------
    def closure_curve(
        self, action: Action, exclude: frozenset[str], rng: np.random.Generator,
    ) -> tuple[np.ndarray, Retrieved | None, Edit]:
        """(n_frames, 2) AU45 rise for the action (left, right), from a retrieved real closure."""
        event_type = ACTION_EVENT_TYPES[action.kind]
        scored = self.candidates(CLOSED_TARGET, None, event_type, exclude)
        scored = [(s, m) for s, m in scored if m.event_type in ACTION_EVENT_TYPES.values()]
        chosen = self.pick(scored, 1, rng, set())
        n = action.n_frames
        if chosen is None:
            curve = synthetic_closure(n, self.cfg.synthetic_closure_amplitude)
            both = np.stack([curve, curve], axis=1)
            retrieved = None
            edit = Edit(op="synthesise", channels=["AU45L", "AU45R"], detail=f"{action.kind}: no closure prototype in the library")
        else:
            match, score = chosen
            au = np.asarray(match.controls, dtype=np.float64)[:, list(AU45)]
            both, (a, b) = closure_shape(au, n, self.cfg.synthetic_closure_amplitude, one_eyed=action.kind == "wink")
            retrieved = Retrieved(prototype_id=match.prototype_id, distance=float(match.distance), label=match.label,
                                  event_type=match.event_type, clip_id=match.clip_id, source_start=a, source_end=b)
            edit = Edit(op="overlay", channels=["AU45L", "AU45R"], detail=f"{action.kind} at frame {action.start_frame}",
                        values={"n_frames": n, "source_frames": b - a})
        if action.kind == "wink":
            top = both.max(axis=1)
            keep = 0 if action.eyes == "left" else 1
            both = np.zeros_like(both)
            both[:, keep] = top
        return both, retrieved, edit

    # -- the whole plan ---------------------------------------------------------------------------
    def compose(
        self, plan: Plan, start_pose: Sequence[float], rest: np.ndarray, seed: int,
        label: str | None = None, exclude: Iterable[str] = (), avoid: Mapping[int, set[str]] | None = None,
        round_index: int = 0,
    ) -> Composed:
        """Controls (T, 17) for the plan; ``avoid`` lists prototypes an event must not reuse (critic).

        Each event and each action draws from its own random stream (seed, event, action), so the
        critic swapping one event's prototype leaves every other event's choices as they were.
        """
        exclude_set = frozenset(exclude)
        avoid = avoid or {}
        T = plan.n_frames
        controls = np.zeros((T, N_CHANNELS), dtype=np.float64)
        head_rel = np.zeros(3)
        records: list[EventComposition] = []
        label_known = label is not None and label in self.source.labels
        for k, event in enumerate(plan.events):
            targets = dict(event.targets) or {"AU41": (0.0, 0.1)}  # nothing asked: a quiet face
            scored = self.candidates(targets, label, event.event_type, exclude_set)
            rng = np.random.default_rng([seed, k])
            chosen = self.pick(scored, event.n_frames, rng, avoid.get(k, set()))
            match = chosen[0] if chosen else None
            seg, edits, src = self.tonic_segment(event, match, rest, rng)
            # head: chain from where the previous event ended, steer targeted angles into range
            path = head_rel[None, :] + seg[:, list(HEAD)]
            for name in HEAD_CHANNELS:
                if name not in event.targets:
                    continue
                h = HEAD_CHANNELS.index(name)
                lo, hi = interval(event.targets[name])
                if lo <= path[-1, h] <= hi:
                    continue  # the prototype's own motion already ends where the plan wants it
                margin = 0.25 * (hi - lo)  # aim inside the range, so the kept wobble stays in it
                goal = float(min(max(path[-1, h], lo + margin), hi - margin))
                wobble = seg[:, HEAD[h]] - np.linspace(seg[0, HEAD[h]], seg[-1, HEAD[h]], len(seg))
                rise = ramp(min(len(seg), max(2, int(round(0.6 * len(seg))))))
                rise = np.concatenate([rise, np.ones(len(seg) - len(rise))])
                path[:, h] = head_rel[h] + (goal - head_rel[h]) * rise + 0.3 * wobble
                edits.append(Edit(op="rescale", channels=[name], detail="head steered into the target range",
                                  values={"from": round(float(head_rel[h]), 3), "to": round(goal, 3)}))
            seg[:, list(HEAD)] = path
            head_rel = path[-1].copy()
            controls[event.start_frame : event.end_frame] = seg
            prototypes = []
            if match is not None:
                prototypes.append(Retrieved(prototype_id=match.prototype_id, distance=float(match.distance), label=match.label,
                                            event_type=match.event_type, clip_id=match.clip_id,
                                            source_start=src[0], source_end=src[1]))
            records.append(EventComposition(event_index=k, start_frame=event.start_frame, end_frame=event.end_frame,
                                            targets=targets, prototypes=prototypes, edits=edits))
        # stitch the tonic events (the head path is already continuous)
        half = max(1, int(round(self.cfg.transition_s * plan.fps / 2)))
        boundaries = [e.start_frame for e in plan.events[1:]]
        controls = stitch_offsets(controls, boundaries, half, [j for j in range(N_CHANNELS) if j not in HEAD])
        for k in range(1, len(records)):
            records[k] = records[k].model_copy(update={"edits": records[k].edits + [Edit(op="stitch", values={"frames": 2 * half})]})
        # phasic layer: the plan's closures over the tonic lids
        for k, event in enumerate(plan.events):
            for i, action in enumerate(event.actions):
                curve, retrieved, edit = self.closure_curve(action, exclude_set, np.random.default_rng([seed, k, 1 + i]))
                s, e = action.start_frame, action.end_frame
                controls[s:e, list(AU45)] += curve
                extra = [retrieved] if retrieved is not None else []
                records[k] = records[k].model_copy(update={"prototypes": records[k].prototypes + extra,
                                                           "edits": records[k].edits + [edit]})
        # absolute head pose: the reference portrait's pose at frame 0
        start = np.asarray(start_pose, dtype=np.float64)
        controls[:, list(HEAD)] += start[None, :]
        controls[:, list(BOUNDED)] = np.clip(controls[:, list(BOUNDED)], 0.0, 1.0)
        composition = Composition(events=records, start_head_pose=tuple(float(v) for v in start), label_rerank=label_known,
                                  round=round_index)
        return Composed(controls.astype(np.float32), composition)
