"""The `rules` backend's planner (paper §3.3, "Temporal Event Planning"): a label and/or
fine-grained instructions and a duration of T frames become staged events that tile [0, T).

Offline and deterministic for a seed (a numpy Generator drawn from it picks stage shares, blink
times and durations and a sub-range inside each target range), different across seeds, so that
the same request always compiles the same plan while sampling several seeds shows the variety a
category table allows.

* **Label only**: the category's stages, their shares drawn inside the table's ``share`` ranges
  and rounded so the frame spans sum to exactly T; the category's natural blinks are placed as
  ``Action(kind="blink")`` inside events (rate and durations from the table, at least
  ``critic.blink_min_interval_s`` apart, never longer than ``critic.blink_max_s``), plus any stage
  actions (drowsiness: a prolonged closure).
* **Instructions**: one event per step group (steps joined by "and"), in "then" order. A label adds
  its short onset stage first (at most ``planning.onset_max_s``) and, when time remains, its last
  stage at the end; its targets fill the channels an instruction leaves free (from the stage that
  shares most channels with the instruction, else the main stage) and the instruction overrides
  them on its own channels. Holding steps (gaze shifts, head moves) keep their targets in later
  events until another instruction changes them. "at 1.2 s" pins an event's start, "for 2 seconds"
  its duration (a held closure's duration); other events share the remaining time by their default
  durations (seeded jitter), growing at most ``planning.max_stretch`` times, the rest going to the
  category (or a neutral background without a label). Asked blinks/winks/closures are actions
  inside their event, which then gets no natural blinks. Without a label the background is
  neutral (no category targets) with the ``neutral talking`` blink rate.

Head targets are degrees relative to the reference pose (``models.py``). Short clips still plan:
stages or step groups that cannot each get a frame are merged.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from cogportrait.agents.backends import PlanRequest
from cogportrait.agents.categories import BlinkSpec, Category, CategoryTable, Stage, StageAction, allocate_frames, load_categories
from cogportrait.agents.grammar import InstructionStep, Vocabulary, group_steps, load_vocabulary
from cogportrait.agents.models import Action, Event, Plan, Target, interval
from cogportrait.config import CompileConfig, CriticConfig
from cogportrait.schema import CONTROL_CHANNELS, HEAD_CHANNELS

log = logging.getLogger("cogportrait")

SlotRole = Literal["onset", "instruction", "wait", "filler", "closing"]
_DROP_RE = re.compile(r"drop:\s*([A-Za-z0-9_]+)\s*(?:@\s*(\d+))?")


class PlanningError(ValueError):
    """A request the planner cannot honour (nothing to plan, a time past the clip's end); user error."""


@dataclass
class _Slot:
    """A span to be planned, before frames are assigned."""

    role: SlotRole
    want: float  # desired frames
    min_frames: int = 1
    pinned: bool = False  # its duration was asked for
    stretch: bool = False  # may grow beyond ``want`` to fill time
    start: int | None = None  # a pinned start frame
    steps: list[InstructionStep] = field(default_factory=list)
    frames: int = 0


@dataclass
class _Ev:
    """An event under construction (frames known)."""

    start: int
    end: int
    stage: str
    targets: dict[str, Target]
    event_type: str | None
    source: Literal["category", "instruction"] = "category"
    instruction: str | None = None
    actions: list[Action] = field(default_factory=list)
    natural_blinks: bool = True
    pinned_start: bool = False


class RulesPlanner:
    """Plans from the category tables and the instruction grammar; no model, no network.

    ``PlanRequest.feedback`` (a revision sent back by the critic) may re-decompose the plan:

    * ``"drop:<channel>@<event_index>"`` removes that channel's target from event ``event_index``
      (0-based) of the plan the same request would otherwise give; ``"drop:<channel>"`` removes it
      from every event. Text after the item is ignored, so a critic may append its reason.
    * ``"resplit"`` draws stage shares, timings and blinks again from a different stream of the
      same seed (still deterministic), for a plan whose timing cannot be composed plausibly.

    Any other feedback string is logged and ignored (free-text advice meant for an LLM backend).
    """

    name = "rules"

    def __init__(self, categories: CategoryTable, vocabulary: Vocabulary, critic: CriticConfig | None = None):
        self.categories = categories
        self.vocabulary = vocabulary
        self.critic = critic or CriticConfig()
        self.settings = vocabulary.planning

    @classmethod
    def from_config(cls, config: CompileConfig, categories: CategoryTable | None = None,
                    vocabulary: Vocabulary | None = None, root: str | Path = ".") -> RulesPlanner:
        """The planner of ``compile``: tables already loaded are reused, the others are read from
        ``compile.categories`` / ``compile.instructions`` (relative to ``root``)."""
        root = Path(root)
        categories = categories or load_categories(root / config.categories)
        vocabulary = vocabulary or load_vocabulary(root / config.instructions)
        return cls(categories, vocabulary, config.critic)

    def parse(self, text: str) -> list[InstructionStep]:
        """Read one instruction (raises ``InstructionError`` quoting unreadable words)."""
        return self.vocabulary.parse(text)

    # ------------------------------------------------------------------------------------------
    def plan(self, request: PlanRequest) -> Plan:
        category = self.categories.get(request.label) if request.label is not None else None
        texts = [t for t in request.instructions if t.strip()]
        steps = self.vocabulary.parse_all(texts)
        if category is None and not steps:
            raise PlanningError("nothing to plan: give a label or an instruction")
        resplits = sum(1 for f in request.feedback if f.strip() == "resplit")
        rng = np.random.default_rng([request.seed % (1 << 63), resplits])
        fps, T = request.fps, request.n_frames
        if steps:
            evs = self._instruction_events(category, group_steps(steps), T, fps, rng)
        else:
            assert category is not None
            evs = self._label_events(category, T, fps, rng)
        self._space_actions(evs, fps)
        blinks = category.blink if category is not None else self.categories.neutral.blink
        self._natural_blinks(evs, blinks, T, fps, rng)
        events = [self._finish(e, fps) for e in evs]
        events = self._apply_feedback(events, request.feedback)
        return Plan(label=category.name if category else None, instructions=list(request.instructions), fps=fps,
                    n_frames=T, events=events)

    # -- label only ------------------------------------------------------------------------------
    def _label_events(self, category: Category, T: int, fps: int, rng: np.random.Generator) -> list[_Ev]:
        stages = category.stages if T >= len(category.stages) else [category.main_stage]
        shares = [rng.uniform(*s.share) for s in stages]
        frames = allocate_frames(shares, T, [1] * len(stages))
        evs, edge = [], 0
        for stage, n in zip(stages, frames, strict=True):
            evs.append(self._stage_event(stage, edge, edge + n, rng, fps))
            edge += n
        return evs

    def _stage_event(self, stage: Stage, start: int, end: int, rng: np.random.Generator, fps: int,
                     held: dict[str, Target] | None = None, text: str | None = None) -> _Ev:
        targets = {**self._jitter(stage.targets, rng), **(held or {})}
        ev = _Ev(start, end, text or stage.stage, targets, stage.event_type)
        for act in stage.actions:
            self._place_stage_action(ev, act, rng, fps)
        return ev

    def _place_stage_action(self, ev: _Ev, act: StageAction, rng: np.random.Generator, fps: int) -> None:
        """A table action at a seeded place inside its event, with an open frame on each side."""
        span = ev.end - ev.start
        for _ in range(act.count):
            n = max(1, round(rng.uniform(*act.duration_s) * fps))
            if act.kind != "closure":
                n = min(n, self._max_blink_frames(fps))
            if span < max(1, round(act.duration_s[0] * fps)) + 2:
                log.debug("stage %r is too short (%d frames) for its %s", ev.stage, span, act.kind)
                return
            n = min(n, span - 2)
            start = ev.start + 1 + int(rng.integers(0, span - 2 - n + 1))
            if self._free(ev.actions, start, n, self._gap_frames(fps)):
                ev.actions.append(Action(kind=act.kind, eyes=act.eyes, start_frame=start, n_frames=n))

    # -- instructions ----------------------------------------------------------------------------
    def _instruction_events(self, category: Category | None, groups: list[list[InstructionStep]], T: int, fps: int,
                            rng: np.random.Generator) -> list[_Ev]:
        s = self.settings
        slots: list[_Slot] = []
        first_at = groups[0][0].at_s
        if category is not None and len(category.stages) >= 2 and not (first_at is not None and round(first_at * fps) == 0):
            want = min(rng.uniform(*category.stages[0].share) * T, s.onset_max_s * fps)
            slots.append(_Slot("onset", want=max(want, 1.0)))
        last_pin = -1
        for k, group in enumerate(groups):
            slot = self._group_slot(group, fps, rng)
            at, delay = group[0].at_s, group[0].delay_s
            if at is not None:
                if at * fps > T + 1e-6:
                    raise PlanningError(f"instruction {group[0].group_words!r} starts at {at:g} s, past the end "
                                        f"of the {T / fps:g} s clip")
                start = min(int(round(at * fps)), T - 1)  # "at 2.0 s" of a 2 s clip: its last frame
                if start < last_pin or (start == 0 and k > 0):
                    raise PlanningError(f"instruction {group[0].group_words!r} starts at {at:g} s, before the "
                                        "step it follows; join steps that happen together with 'and'")
                if start == last_pin:  # two times that round alike ("at 1.2 s" twice): keep the order
                    log.warning("instruction %r starts at the same frame as the step before it; one frame later",
                                group[0].group_words)
                    start += 1
                if start < T:
                    slot.start = last_pin = start
            elif delay is not None and k > 0:
                slots.append(_Slot("wait", want=max(1.0, delay * fps), pinned=True))
            slots.append(slot)
        # windows between pinned starts; each is filled on its own
        cuts = [0] + [sl.start for sl in slots if sl.start is not None and sl.start > 0] + [T]
        windows: list[list[_Slot]] = [[] for _ in range(len(cuts) - 1)]
        w = 0
        for sl in slots:
            if sl.start is not None and sl.start > 0:
                w += 1
            windows[w].append(sl)
        ordered: list[_Slot] = []
        for w, members in enumerate(windows):
            tail_role: SlotRole = "closing" if w == len(windows) - 1 else "filler"
            ordered.extend(self._fit(members, cuts[w + 1] - cuts[w], tail_role, fps))
        return self._slot_events(category, ordered, fps, rng)

    def _group_slot(self, group: list[InstructionStep], fps: int, rng: np.random.Generator) -> _Slot:
        s = self.settings
        jitter = 1.0 + rng.uniform(-s.duration_jitter, s.duration_jitter)
        margin = s.closure_margin_s * fps
        want, minimum, pinned = 0.0, 1, False
        phasic = False
        for st in group:
            spec = self.vocabulary.step_spec(st.kind)
            phasic |= st.action is not None or spec.countable
            if st.action == "closure":
                n = max(1, round((st.action_s or spec.default_s) * fps))
                want = max(want, n + 2 * margin)
                minimum = max(minimum, n)
                pinned |= st.duration_s is not None
            else:
                want = max(want, st.default_s * fps * jitter)
                if st.action in ("blink", "wink"):
                    n = min(max(1, round((st.action_s or 0.2) * fps)), self._max_blink_frames(fps))
                    # even spacing gives each repeat an equal share that must hold it and the gap
                    minimum = max(minimum, n if st.count == 1 else st.count * (n + self._gap_frames(fps)))
            if st.duration_s is not None and st.duration_applies_to == "event":
                want, pinned = max(1.0, st.duration_s * fps), True
        want = max(want, float(minimum)) if not pinned else want
        return _Slot("instruction", want=want, min_frames=minimum, pinned=pinned, stretch=not phasic and not pinned,
                     steps=list(group))

    def _fit(self, slots: list[_Slot], L: int, tail_role: SlotRole, fps: int) -> list[_Slot]:
        """Frames for the slots of one window of L frames (each at least one, summing to L)."""
        s = self.settings
        slots = list(slots)
        if not slots:
            return [_Slot(tail_role, want=L, frames=L)]
        if L < len(slots):
            slots = [sl for sl in slots if sl.role == "instruction"] or slots[:1]
        if L < len(slots):  # too short for one frame each: one event does everything
            merged = _Slot("instruction", want=L, min_frames=1, pinned=False, start=slots[0].start,
                           steps=[st for sl in slots for st in sl.steps])
            slots = [merged]
        want = [sl.want for sl in slots]
        mins = [sl.min_frames for sl in slots]
        if sum(mins) > L:
            mins = [1] * len(slots)
        total = sum(want)
        if total > L:
            want = self._shrink(slots, want, mins, L)
        else:
            leftover = L - total
            grow = [k for k, sl in enumerate(slots) if sl.stretch]
            room = sum(want[k] * (s.max_stretch - 1) for k in grow)
            if room > 0:
                used = min(leftover, room)
                for k in grow:
                    want[k] += used * want[k] * (s.max_stretch - 1) / room
                leftover -= used
            if leftover >= max(1.0, s.min_fill_s * fps) or (leftover >= 1 and not any(not sl.pinned for sl in slots)):
                slots.append(_Slot(tail_role, want=leftover))
                want.append(leftover)
                mins.append(1)
            elif leftover > 0:  # a sliver: the last free slot takes it
                k = max((k for k, sl in enumerate(slots) if not sl.pinned), default=len(slots) - 1)
                want[k] += leftover
        frames = allocate_frames(want, L, mins)
        for sl, n in zip(slots, frames, strict=True):
            sl.frames = n
        return slots

    @staticmethod
    def _shrink(slots: list[_Slot], want: list[float], mins: list[int], L: int) -> list[float]:
        """Fit wants into L: free slots give way first (down to their minimum), then asked durations."""
        want = list(want)
        excess = sum(want) - L
        for pinned in (False, True):
            idx = [k for k, sl in enumerate(slots) if sl.pinned == pinned]
            room = sum(max(want[k] - mins[k], 0.0) for k in idx)
            if room <= 0:
                continue
            cut = min(excess, room)
            for k in idx:
                want[k] -= cut * max(want[k] - mins[k], 0.0) / room
            excess -= cut
            if pinned and cut > 0:
                log.warning("the instructions ask for more time than the %d-frame window has; asked durations "
                            "are shortened", L)
            if excess <= 1e-9:
                break
        return want

    def _slot_events(self, category: Category | None, slots: list[_Slot], fps: int, rng: np.random.Generator) -> list[_Ev]:
        held: dict[str, Target] = {}
        evs: list[_Ev] = []
        edge = 0
        for sl in slots:
            start, end = edge, edge + sl.frames
            edge = end
            if sl.role == "onset":
                assert category is not None
                evs.append(self._stage_event(category.stages[0], start, end, rng, fps))
            elif sl.role == "instruction":
                evs.append(self._instruction_event(category, sl, start, end, held, rng, fps))
            else:
                if category is None:
                    text = "neutral background" + (" (holding the instruction's gaze and head)" if held else "")
                    evs.append(_Ev(start, end, text, dict(held), None))
                else:
                    stage = category.stages[-1] if sl.role == "closing" else category.main_stage
                    evs.append(self._stage_event(stage, start, end, rng, fps, held=dict(held)))
        return evs

    def _instruction_event(self, category: Category | None, slot: _Slot, start: int, end: int, held: dict[str, Target],
                           rng: np.random.Generator, fps: int) -> _Ev:
        own: dict[str, Target] = {}
        holds: dict[str, Target] = {}
        for st in slot.steps:
            jittered = self._jitter(st.targets, rng)
            own.update(jittered)
            if st.hold:
                holds.update(jittered)
        fill: dict[str, Target] = {}
        text = "; ".join(dict.fromkeys(st.group_words for st in slot.steps))
        if category is not None:
            stage = self._fill_stage(category, set(own))
            fill = self._jitter(stage.targets, rng)
            text = f"{text} ({category.name}: {stage.stage})"
        targets = {**fill, **held, **own}
        held.update(holds)
        tonic = [st for st in slot.steps if st.action is None and st.event_type]
        typed = tonic or [st for st in slot.steps if st.event_type]
        ev = _Ev(start, end, text, targets, typed[0].event_type if typed else None, source="instruction",
                 instruction="; ".join(dict.fromkeys(st.group_words for st in slot.steps)),
                 natural_blinks=not any(st.action for st in slot.steps), pinned_start=slot.start is not None)
        self._place_instruction_actions(ev, [st for st in slot.steps if st.action], fps)
        return ev

    @staticmethod
    def _fill_stage(category: Category, channels: set[str]) -> Stage:
        """The stage sharing most channels with the instruction (the main stage on ties or none).

        The onset stage is not a candidate when there are others: it has its own event before the
        instructions, and its "direct gaze, stable head" targets would otherwise win every gaze or
        head instruction by channel count while meaning the opposite."""
        main = category.main_index
        first = 1 if len(category.stages) > 1 and main != 0 else 0
        scores = [len(channels & set(s.targets)) if k >= first else -1 for k, s in enumerate(category.stages)]
        best = max(scores)
        if best <= 0 or scores[main] == best:
            return category.stages[main]
        return category.stages[scores.index(best)]

    def _place_instruction_actions(self, ev: _Ev, steps: list[InstructionStep], fps: int) -> None:
        """Asked actions, each step in its own equal share of the event; repeats spaced evenly."""
        if not steps:
            return
        span = ev.end - ev.start
        bounds = [ev.start + (span * k) // len(steps) for k in range(len(steps) + 1)]
        margin = round(self.settings.closure_margin_s * fps)
        gap = self._gap_frames(fps)
        for st, a, b in zip(steps, bounds[:-1], bounds[1:], strict=True):
            if b <= a:
                log.warning("no room for %r in a %d-frame event", st.words, span)
                continue
            n = max(1, round((st.action_s or 0.2) * fps))
            if st.action == "closure":
                n = min(n, b - a)
                off = 0 if ev.pinned_start else min(margin, (b - a - n) // 2)
                ev.actions.append(Action(kind="closure", start_frame=a + off, n_frames=n))
                continue
            n = min(n, self._max_blink_frames(fps))
            spots = _spread(a, b, st.count, n, gap, at_start=ev.pinned_start and a == ev.start)
            for s0, k in spots:
                ev.actions.append(Action(kind=st.action, eyes=st.eyes, start_frame=s0, n_frames=k))  # type: ignore[arg-type]
            if len(spots) < st.count:
                log.warning("%r: only %d of %d fit in %d frames", st.words, len(spots), st.count, b - a)

    # -- blinks and targets ----------------------------------------------------------------------
    def _max_blink_frames(self, fps: int) -> int:
        return max(1, math.floor(self.critic.blink_max_s * fps + 1e-9))

    def _gap_frames(self, fps: int) -> int:
        return max(0, math.ceil(self.critic.blink_min_interval_s * fps - 1e-9))

    def _space_actions(self, evs: list[_Ev], fps: int) -> None:
        """Actions of neighbouring events at least the critic's inter-blink interval apart: a later
        one moves on inside its event, shrinks if it must, and is dropped (with a warning) when its
        event has no room left, because two closures closer than that read as one."""
        gap = self._gap_frames(fps)
        last_end = -(10**9)
        for ev in evs:
            kept: list[Action] = []
            for a in sorted(ev.actions, key=lambda x: x.start_frame):
                start = max(a.start_frame, last_end + gap)
                n = min(a.n_frames, ev.end - start)
                if n < 1:
                    log.warning("no room for a %s at frame %d of %r: dropped", a.kind, a.start_frame, ev.stage)
                    continue
                if (start, n) != (a.start_frame, a.n_frames):
                    a = a.model_copy(update={"start_frame": start, "n_frames": n})
                kept.append(a)
                last_end = start + n
            ev.actions = kept

    @staticmethod
    def _free(actions: list[Action], start: int, n: int, gap: int) -> bool:
        return all(start >= a.end_frame + gap or start + n + gap <= a.start_frame for a in actions)

    def _natural_blinks(self, evs: list[_Ev], spec: BlinkSpec, T: int, fps: int, rng: np.random.Generator) -> None:
        """Blinks at the category's rate, each inside one event that accepts them, spaced from every
        other action by at least the critic's inter-blink interval."""
        rate = rng.uniform(*spec.rate_per_min)
        if rate <= 0:
            return
        mean = 60.0 / rate
        gap, longest = self._gap_frames(fps), self._max_blink_frames(fps)
        taken = [a for e in evs for a in e.actions]
        starts = [e.start for e in evs]
        t = rng.uniform(0.1, 1.0) * mean
        while t * fps < T:
            n = int(np.clip(round(rng.uniform(*spec.duration_s) * fps), 1, longest))
            frame = int(round(t * fps))
            t += mean * rng.uniform(0.6, 1.4)
            if frame >= T:
                break
            ev = evs[int(np.searchsorted(starts, frame, side="right")) - 1]
            s0 = min(frame, ev.end - n)
            if not ev.natural_blinks or s0 < ev.start or not self._free(taken, s0, n, gap):
                continue
            blink = Action(kind="blink", start_frame=s0, n_frames=n)
            ev.actions.append(blink)
            taken.append(blink)

    def _jitter(self, targets: dict[str, Target], rng: np.random.Generator) -> dict[str, Target]:
        """A seeded sub-range (``planning.target_keep`` of the width) inside each [lo, hi] target."""
        keep = self.settings.target_keep
        out: dict[str, Target] = {}
        for name in CONTROL_CHANNELS:
            if name not in targets:
                continue
            target = targets[name]
            lo, hi = interval(target)
            if isinstance(target, (int, float)) or hi <= lo:
                out[name] = target
                continue
            width = (hi - lo) * keep
            a = lo + rng.uniform(0.0, hi - lo - width)
            digits = 2 if name in HEAD_CHANNELS else 3
            new_lo = min(max(round(a, digits), lo), hi)
            new_hi = min(max(round(a + width, digits), new_lo), hi)
            out[name] = (new_lo, new_hi)
        return out

    # -- output ------------------------------------------------------------------------------------
    @staticmethod
    def _finish(ev: _Ev, fps: int) -> Event:
        targets = {name: ev.targets[name] for name in CONTROL_CHANNELS if name in ev.targets}
        return Event(start_s=round(ev.start / fps, 6), end_s=round(ev.end / fps, 6), start_frame=ev.start,
                     end_frame=ev.end, stage=ev.stage, targets=targets,
                     actions=sorted(ev.actions, key=lambda a: a.start_frame), event_type=ev.event_type,
                     source=ev.source, instruction=ev.instruction)

    @staticmethod
    def _apply_feedback(events: list[Event], feedback: list[str]) -> list[Event]:
        for item in feedback:
            text = item.strip()
            if text == "resplit":
                continue
            m = _DROP_RE.match(text)
            if m is None:
                log.info("planner: ignoring feedback %r (not drop:<channel>@<event> or resplit)", item)
                continue
            channel, index = m.group(1), m.group(2)
            if channel not in CONTROL_CHANNELS:
                log.warning("planner: feedback %r names no channel; channels: %s", item, ", ".join(CONTROL_CHANNELS))
                continue
            which = range(len(events)) if index is None else [int(index)]
            for k in which:
                if not 0 <= k < len(events):
                    log.warning("planner: feedback %r names event %d of %d", item, k, len(events))
                    continue
                targets = {c: t for c, t in events[k].targets.items() if c != channel}
                events[k] = events[k].model_copy(update={"targets": targets})
        return events


def _spread(a: int, b: int, count: int, n: int, gap: int, at_start: bool) -> list[tuple[int, int]]:
    """``count`` actions of ``n`` frames spaced evenly in [a, b), at least ``gap`` frames apart
    (end to start); fewer when they cannot fit. ``at_start``: the first starts at ``a``."""
    span = b - a
    if span < 1 or count < 1:
        return []
    count = min(count, max(1, (span + gap) // (1 + gap)))
    n = max(1, min(n, (span - (count - 1) * gap) // count))
    if count == 1:
        return [(a if at_start else a + (span - n) // 2, n)]
    free = span - count * n  # >= (count - 1) * gap by the choice of n
    inner = free / (count - 1) if at_start else max(gap, free / (count + 1))
    first = a if at_start else a + (free - (count - 1) * inner) / 2
    return [(min(int(math.floor(first + i * (n + inner))), b - n), n) for i in range(count)]


__all__ = ["PlanningError", "RulesPlanner"]
