"""The `rules` backend's reader of fine-grained instructions ("look slightly to the left, then
lower the head smoothly") into typed steps with the channel targets they impose.

The vocabulary — phrases, synonyms, fillers, amounts, per-amount channel targets and default
durations — is data (``datasets/emh/instructions.yaml``, path in ``compile.instructions``), so a
phrase is added without touching code; this module only knows the shape of a sentence:

* clauses separated by *sequential* markers ("then", commas, "after that") become step groups that
  follow one another; inside a clause, *simultaneous* markers ("and", "while", "with") join steps
  that happen together (one group, one planned event);
* modifiers may sit anywhere in their clause: amounts ("slightly", "a lot"), counts ("twice",
  "3 times"), smoothness ("smoothly", "slowly"), a start time ("at 1.2 s"), a delay after the
  previous group ("after 2 s"), a duration ("for 2 seconds", "for 500 ms");
* fillers ("please", "the", "your") are dropped, and everything else must be a known phrase:
  words the grammar cannot read are a user error that quotes them, because silently ignoring half
  an instruction would compile something the user did not ask for.

Left/right are the subject's own throughout (DESIGN.md).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from cogportrait.agents.categories import read_yaml_model
from cogportrait.agents.models import StrictModel, Target, _check_targets
from cogportrait.schema import EVENT_TYPES

AMOUNTS: tuple[str, ...] = ("slight", "normal", "strong")
DIRECTIONS: tuple[str, ...] = ("none", "left", "right", "up", "down", "both")
SLOT_VALUES: dict[str, tuple[str, ...]] = {"side": ("left", "right", "both"), "direction": ("left", "right", "up", "down")}
# words, numbers, punctuation; any other character is a token of its own, which no phrase reads, so
# it is quoted back as unreadable ("at -1 s", "look left & blink") instead of silently dropped
_TOKEN_RE = re.compile(r"\d+(?:\.\d+)?|[a-z]+(?:'[a-z]+)*|[,;.!?]|\S", re.IGNORECASE)
_HYPHEN_RE = re.compile(r"(?<=[a-z])-(?=[a-z])", re.IGNORECASE)  # "left-hand": two words
_NUMBER_RE = re.compile(r"\d+(?:\.\d+)?")


class InstructionError(ValueError):
    """An instruction the grammar cannot read; the message quotes the words (a user error)."""


class VocabularyError(ValueError):
    """instructions.yaml is malformed; the message names the key."""


# --------------------------------------------------------------------------------------------
# The vocabulary file
# --------------------------------------------------------------------------------------------
class ActionSpec(StrictModel):
    """The phasic eye action a step asks for, with its duration in seconds."""

    kind: Literal["blink", "wink", "closure"]
    duration_s: float = Field(gt=0)
    slow_duration_s: float | None = Field(None, gt=0, description="when the step is asked slowly")


class StepSpec(StrictModel):
    """One kind of instruction step: how it is said and what it does to the channels."""

    phrases: list[str] | dict[str, list[str]]
    hold: bool = Field(False, description="its targets persist into later events until overridden")
    countable: bool = False
    default_s: float = Field(gt=0, description="event duration (per repetition when countable)")
    default_direction: str | None = None
    event_type: str | None = None
    smooth_event_type: str | None = None
    duration_applies_to: Literal["event", "action"] = "event"
    action: ActionSpec | None = None
    targets: dict[str, dict[str, dict[str, Target]]]

    @field_validator("targets")
    @classmethod
    def _targets(cls, targets: dict[str, dict[str, dict[str, Target]]]) -> dict[str, dict[str, dict[str, Target]]]:
        if not targets:
            raise ValueError("needs at least one direction (use 'none' for an undirected step)")
        for direction, amounts in targets.items():
            if direction not in DIRECTIONS:
                raise ValueError(f"unknown direction {direction!r}; valid: {', '.join(DIRECTIONS)}")
            if "normal" not in amounts:
                raise ValueError(f"direction {direction!r} needs a 'normal' amount")
            for amount, channel_targets in amounts.items():
                if amount not in AMOUNTS:
                    raise ValueError(f"unknown amount {amount!r}; valid: {', '.join(AMOUNTS)}")
                try:
                    _check_targets(channel_targets)
                except ValueError as err:
                    raise ValueError(f"{direction}.{amount}: {err}") from None
        return targets

    @model_validator(mode="after")
    def _consistent(self) -> StepSpec:
        for name in ("event_type", "smooth_event_type"):
            value = getattr(self, name)
            if value is not None and value not in EVENT_TYPES:
                raise ValueError(f"{name} {value!r} is not one of {', '.join(EVENT_TYPES)}")
        if self.default_direction is not None and self.default_direction not in self.targets:
            raise ValueError(f"default_direction {self.default_direction!r} has no targets")
        if isinstance(self.phrases, dict):
            for direction in self.phrases:
                if direction not in self.targets:
                    raise ValueError(f"phrases for direction {direction!r}, which has no targets")
        for pattern in self.all_patterns():
            _compile_pattern(pattern)  # raises on a malformed pattern
        if self.duration_applies_to == "action" and self.action is None:
            raise ValueError("duration_applies_to: action needs an action")
        return self

    def all_patterns(self) -> Iterator[str]:
        if isinstance(self.phrases, dict):
            for patterns in self.phrases.values():
                yield from patterns
        else:
            yield from self.phrases


class NormaliseSpec(StrictModel):
    fillers: list[str]
    synonyms: dict[str, str] = Field(default_factory=dict)
    numbers: dict[str, float] = Field(default_factory=dict)
    counts: dict[str, int] = Field(default_factory=dict)
    units: dict[str, float]
    amounts: dict[str, list[str]]
    smooth: list[str] = Field(default_factory=list)
    sequential: list[str]
    simultaneous: list[str]

    @field_validator("amounts")
    @classmethod
    def _amounts(cls, amounts: dict[str, list[str]]) -> dict[str, list[str]]:
        unknown = sorted(set(amounts) - set(AMOUNTS))
        if unknown:
            raise ValueError(f"unknown amount(s) {', '.join(unknown)}; valid: {', '.join(AMOUNTS)}")
        return amounts


class PlanningSpec(StrictModel):
    """How the planner times instruction events (documented in instructions.yaml)."""

    onset_max_s: float = Field(ge=0)
    max_stretch: float = Field(ge=1)
    min_fill_s: float = Field(ge=0)
    duration_jitter: float = Field(ge=0, lt=1)
    target_keep: float = Field(gt=0, le=1)
    closure_margin_s: float = Field(ge=0)


class VocabularyFile(StrictModel):
    version: int
    planning: PlanningSpec
    normalise: NormaliseSpec
    steps: dict[str, StepSpec]


# --------------------------------------------------------------------------------------------
# Phrase patterns: words, `a|b` alternatives, `[a]` optional words, `{slot}` / `{slot?}`
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Elem:
    words: frozenset[str]
    optional: bool
    slot: str | None


def _compile_pattern(pattern: str) -> tuple[_Elem, ...]:
    elems = []
    for raw in pattern.split():
        optional = False
        slot = None
        if raw.startswith("{") and raw.endswith("}"):
            slot = raw[1:-1]
            if slot.endswith("?"):
                slot, optional = slot[:-1], True
            if slot not in SLOT_VALUES:
                raise ValueError(f"phrase {pattern!r}: unknown slot {{{slot}}}; valid: {', '.join(SLOT_VALUES)}")
            words = frozenset(SLOT_VALUES[slot])
        else:
            if raw.startswith("[") and raw.endswith("]"):
                raw, optional = raw[1:-1], True
            words = frozenset(w for w in raw.lower().split("|") if w)
            if not words or any(not re.fullmatch(r"[a-z']+", w) for w in words):
                raise ValueError(f"phrase {pattern!r}: bad word {raw!r}")
        elems.append(_Elem(words, optional, slot))
    if not elems or all(e.optional for e in elems):
        raise ValueError(f"phrase {pattern!r} matches nothing")
    return tuple(elems)


def _match(elems: Sequence[_Elem], toks: Sequence[str], i: int, k: int = 0,
           caps: dict[str, str] | None = None) -> Iterator[tuple[int, dict[str, str]]]:
    """Every way the pattern matches from token i: (end, slot captures)."""
    caps = caps or {}
    if k == len(elems):
        yield i, caps
        return
    e = elems[k]
    if i < len(toks) and toks[i] in e.words:
        yield from _match(elems, toks, i + 1, k + 1, {**caps, e.slot: toks[i]} if e.slot else caps)
    if e.optional:
        yield from _match(elems, toks, i, k + 1, caps)


# --------------------------------------------------------------------------------------------
# Parsed steps
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InstructionStep:
    """One step of an instruction: what to do, how much, when, and the channel targets it imposes.

    Steps with the same ``group`` happen together (joined by "and") and become one planned event;
    groups follow one another in order ("then"). ``at_s`` pins the group's start, ``delay_s`` asks
    for a pause after the previous group, ``duration_s`` pins the group's duration (or, for a held
    closure, the closure's). ``action`` is the phasic eye action the step asks for, ``count`` times.
    """

    kind: str
    direction: str | None
    amount: str
    count: int
    at_s: float | None
    delay_s: float | None
    duration_s: float | None
    smooth: bool
    group: int
    words: str
    group_words: str
    instruction: str
    targets: dict[str, Target] = field(default_factory=dict)
    hold: bool = False
    action: str | None = None
    eyes: str = "both"
    action_s: float | None = None
    event_type: str | None = None
    default_s: float = 1.0
    duration_applies_to: str = "event"


@dataclass
class _Tok:
    norm: str
    start: int
    end: int
    role: str = "content"  # content | modifier | filler


@dataclass
class _Item:
    kind: str  # step | seq | sim | bad | mod
    i0: int
    i1: int  # inclusive token indices in the instruction
    value: object = None
    extra: dict[str, str] = field(default_factory=dict)


def _quote(text: str) -> str:
    return '"' + text.replace('"', "'") + '"'


class Vocabulary:
    """instructions.yaml, loaded and compiled once; ``parse`` reads one instruction string."""

    def __init__(self, spec: VocabularyFile, source: str = "instructions.yaml"):
        self.spec = spec
        self.source = source
        self.planning = spec.planning
        norm = spec.normalise
        self._synonyms = {k.lower(): v.lower() for k, v in norm.synonyms.items()}
        self._fillers = frozenset(w.lower() for w in norm.fillers)
        self._numbers = {k.lower(): float(v) for k, v in norm.numbers.items()}
        self._units = {k.lower(): float(v) for k, v in norm.units.items()}
        self._counts = {k.lower(): int(v) for k, v in norm.counts.items()}
        # multi-word phrase lists as token tuples, longest first so "a little bit" beats "a little"
        self._amounts = sorted(((tuple(p.lower().split()), a) for a, ps in norm.amounts.items() for p in ps),
                               key=lambda x: -len(x[0]))
        self._smooth = sorted((tuple(p.lower().split()) for p in norm.smooth), key=lambda x: -len(x))
        self._sequential = sorted((tuple(p.lower().split()) for p in norm.sequential), key=lambda x: -len(x))
        self._simultaneous = sorted((tuple(p.lower().split()) for p in norm.simultaneous), key=lambda x: -len(x))
        self._patterns: list[tuple[str, str | None, tuple[_Elem, ...]]] = []
        for kind, step in spec.steps.items():
            if isinstance(step.phrases, dict):
                for direction, patterns in step.phrases.items():
                    self._patterns.extend((kind, direction, _compile_pattern(p)) for p in patterns)
            else:
                self._patterns.extend((kind, None, _compile_pattern(p)) for p in step.phrases)

    @property
    def kinds(self) -> list[str]:
        return list(self.spec.steps)

    def step_spec(self, kind: str) -> StepSpec:
        return self.spec.steps[kind]

    # -- tokens and modifiers -----------------------------------------------------------------
    def _tokens(self, text: str) -> list[_Tok]:
        toks = []
        for m in _TOKEN_RE.finditer(_HYPHEN_RE.sub(" ", text.replace("\u2019", "'"))):
            word = m.group(0).lower()
            toks.append(_Tok(self._synonyms.get(word, word), m.start(), m.end()))
        return toks

    def _number(self, tok: str) -> float | None:
        if _NUMBER_RE.fullmatch(tok):
            return float(tok)
        return self._numbers.get(tok)

    def _seconds(self, words: list[str], i: int) -> tuple[float, int] | None:
        """A number with an optional unit at token i: (seconds, tokens used)."""
        if i >= len(words):
            return None
        if words[i] == "half" and i + 1 < len(words):  # "half a second"
            j = i + 1 + (words[i + 1] in ("a", "an"))
            if j < len(words) and words[j] in self._units:
                return 0.5 * self._units[words[j]], j - i + 1
            return None
        if words[i] in ("a", "an") and i + 1 < len(words) and words[i + 1] in self._units:  # "a second"
            return self._units[words[i + 1]], 2
        value = self._number(words[i])
        if value is None:
            return None
        if i + 1 < len(words) and words[i + 1] in self._units:
            return value * self._units[words[i + 1]], 2
        return value, 1

    def _modifier(self, words: list[str], i: int) -> tuple[str, object, int] | None:
        """The modifier starting at token i, if any: (kind, value, tokens used)."""
        w = words[i]
        if w in ("at", "around", "by", "after", "for", "over", "during", "within"):
            sec = self._seconds(words, i + 1)
            if sec is not None:
                kind = {"after": "delay", "for": "duration", "over": "duration", "during": "duration",
                        "within": "duration"}.get(w, "at")
                return kind, sec[0], sec[1] + 1
        if w in self._counts:
            return "count", self._counts[w], 1
        value = self._number(w)
        if value is not None and i + 1 < len(words) and words[i + 1] in ("times", "time"):
            if value != int(value) or value < 1:
                raise InstructionError(f"a count is a whole number, not \"{words[i]} {words[i + 1]}\"")
            return "count", int(value), 2
        for phrase, amount in self._amounts:
            if tuple(words[i:i + len(phrase)]) == phrase:
                return "amount", amount, len(phrase)
        for phrase in self._smooth:
            if tuple(words[i:i + len(phrase)]) == phrase:
                return "smooth", True, len(phrase)
        return None

    @staticmethod
    def _phrase_at(phrases: list[tuple[str, ...]], words: Sequence[str], i: int) -> int:
        for phrase in phrases:
            if tuple(words[i:i + len(phrase)]) == phrase:
                return len(phrase)
        return 0

    # -- parsing --------------------------------------------------------------------------------
    def parse(self, text: str, group_offset: int = 0) -> list[InstructionStep]:
        """One instruction string -> its steps (groups numbered from ``group_offset``)."""
        toks = self._tokens(text)
        if not any(t.norm not in ",;.!?" for t in toks):
            raise InstructionError(f"instruction {_quote(text)} has no words to read")
        words = [t.norm for t in toks]
        items: list[_Item] = []
        i = 0
        while i < len(toks):  # modifiers first: they may sit inside a phrase ("look slightly left")
            mod = self._modifier(words, i)
            if mod is not None:
                kind, value, n = mod
                items.append(_Item("mod", i, i + n - 1, value, {"mod": kind}))
                for t in toks[i:i + n]:
                    t.role = "modifier"
                i += n
                continue
            if words[i] in self._fillers:
                toks[i].role = "filler"
            i += 1
        content = [k for k, t in enumerate(toks) if t.role == "content"]
        cwords = [words[k] for k in content]
        j = 0
        while j < len(content):
            best: tuple[int, str, str | None, dict[str, str]] | None = None
            for kind, fixed, elems in self._patterns:
                for end, caps in _match(elems, cwords, j):
                    if end > j and (best is None or end > best[0]):
                        best = (end, kind, fixed, caps)
            if best is not None:
                end, kind, fixed, caps = best
                direction = fixed or caps.get("side") or caps.get("direction")
                items.append(_Item("step", content[j], content[end - 1], kind, {"direction": direction or ""}))
                j = end
                continue
            n = self._phrase_at(self._sequential, cwords, j)
            if n:
                items.append(_Item("seq", content[j], content[j + n - 1]))
                j += n
                continue
            n = self._phrase_at(self._simultaneous, cwords, j)
            if n:
                items.append(_Item("sim", content[j], content[j + n - 1]))
                j += n
                continue
            if items and items[-1].kind == "bad" and content[j - 1] == items[-1].i1 and self._adjacent(toks, items[-1].i1, content[j]):
                items[-1].i1 = content[j]
            else:
                items.append(_Item("bad", content[j], content[j]))
            j += 1
        bad = [it for it in items if it.kind == "bad"]
        if bad:
            quoted = ", ".join(_quote(text[toks[b.i0].start:toks[b.i1].end]) for b in bad)
            raise InstructionError(f"could not read {quoted} in instruction {_quote(text)}")
        steps = self._steps(text, toks, sorted(items, key=lambda it: it.i0), group_offset)
        if not steps:  # only fillers or joiners ("please", "then")
            raise InstructionError(f"could not read an action in instruction {_quote(text)}")
        for s in steps:
            if s.kind == "wink" and s.duration_s is not None:  # Action has no one-eyed held closure
                raise InstructionError(f"a wink is brief: cannot hold it for {s.duration_s:g} s ({_quote(s.words)}); "
                                       "close both eyes for a held closure")
        return steps

    @staticmethod
    def _adjacent(toks: list[_Tok], a: int, b: int) -> bool:
        """Tokens a < b with only fillers between them (so "wiggle your ears" quotes as one run)."""
        return all(t.role == "filler" for t in toks[a + 1:b])

    def _steps(self, text: str, toks: list[_Tok], items: list[_Item], group_offset: int) -> list[InstructionStep]:
        # cut into groups at sequential markers; a group of modifiers only joins the next group
        groups: list[list[_Item]] = [[]]
        for it in items:
            if it.kind == "seq":
                groups.append([])
            else:
                groups[-1].append(it)
        groups = [g for g in groups if any(it.kind != "sim" for it in g)]
        merged: list[list[_Item]] = []
        pending: list[_Item] = []
        for g in groups:
            if not any(it.kind == "step" for it in g):
                pending.extend(g)
                continue
            merged.append(sorted(pending + g, key=lambda it: it.i0))
            pending = []
        if pending:
            if not merged:
                span = text[toks[pending[0].i0].start:toks[pending[-1].i1].end]
                raise InstructionError(f"found no action to apply {_quote(span)} to in instruction {_quote(text)}")
            merged[-1] = sorted(merged[-1] + pending, key=lambda it: it.i0)
        steps: list[InstructionStep] = []
        for g, group in enumerate(merged):
            steps.extend(self._group_steps(text, toks, group, group_offset + g, first=(group_offset + g == 0)))
        return steps

    def _group_steps(self, text: str, toks: list[_Tok], group: list[_Item], index: int, first: bool) -> list[InstructionStep]:
        step_items = [it for it in group if it.kind == "step"]
        starts = [it.i0 for it in step_items]
        joins = [it.i0 for it in group if it.kind == "sim"]  # "and" splits a group into sub-clauses
        group_mods: dict[str, float] = {}
        step_mods: list[dict[str, object]] = [{} for _ in step_items]
        step_spans = [[it.i0, it.i1] for it in step_items]
        for it in group:
            if it.kind != "mod":
                continue
            mod = it.extra["mod"]
            if mod in ("at", "delay", "duration"):
                group_mods[mod] = float(it.value)  # type: ignore[arg-type]
                continue
            # the step of its own sub-clause ("look left and slightly raise ..."): the step whose
            # words contain it, else the nearest before it, else the first after it
            clause = bisect.bisect_right(joins, it.i0)
            lo = joins[clause - 1] if clause > 0 else -1
            hi = joins[clause] if clause < len(joins) else 1 << 30
            mine = [k for k, st in enumerate(step_items) if lo < st.i0 < hi]
            before = [k for k in mine if starts[k] <= it.i0]
            if before:
                k = before[-1]
            elif mine:
                k = mine[0]
            else:
                k = max(bisect.bisect_right(starts, it.i0) - 1, 0)
            step_mods[k][mod] = it.value
            step_spans[k][0] = min(step_spans[k][0], it.i0)
            step_spans[k][1] = max(step_spans[k][1], it.i1)
        if first and "delay" in group_mods and "at" not in group_mods:
            group_mods["at"] = group_mods.pop("delay")  # "after 2 s, blink": nothing precedes it
        span0 = min(it.i0 for it in group if it.kind != "sim")
        span1 = max(it.i1 for it in group if it.kind != "sim")
        group_words = text[toks[span0].start:toks[span1].end]
        out = []
        for it, mods, (w0, w1) in zip(step_items, step_mods, step_spans, strict=True):
            out.append(self._make_step(text, it, mods, group_mods, index, text[toks[w0].start:toks[w1].end], group_words))
        return out

    def _make_step(self, text: str, it: _Item, mods: dict[str, object], group_mods: dict[str, float], index: int,
                   words: str, group_words: str) -> InstructionStep:
        kind = str(it.value)
        spec = self.spec.steps[kind]
        direction = it.extra["direction"] or spec.default_direction or ("none" if "none" in spec.targets else None)
        if direction is None:
            raise InstructionError(f"{_quote(words)} needs a direction ({', '.join(spec.targets)}) in instruction {_quote(text)}")
        if direction not in spec.targets:
            raise InstructionError(
                f"{_quote(words)}: {kind.replace('_', ' ')} takes {' or '.join(spec.targets)}, not {direction!r}, "
                f"in instruction {_quote(text)}")
        amount = str(mods.get("amount", "normal"))
        count = int(mods.get("count", 1))  # type: ignore[call-overload]
        if count < 1:
            raise InstructionError(f"{_quote(words)}: a count must be at least 1 in instruction {_quote(text)}")
        if count > 1 and not spec.countable:
            raise InstructionError(f"{_quote(words)}: {kind.replace('_', ' ')} cannot be repeated in instruction {_quote(text)}")
        duration = group_mods.get("duration")
        for name in ("at", "delay"):
            if group_mods.get(name, 0.0) < 0:
                raise InstructionError(f"{_quote(group_words)}: a time must not be negative in instruction {_quote(text)}")
        if duration is not None and duration <= 0:
            raise InstructionError(f"{_quote(group_words)}: a duration must be positive in instruction {_quote(text)}")
        smooth = bool(mods.get("smooth", False))
        by_amount = spec.targets[direction]
        targets = dict(by_amount.get(amount, by_amount["normal"]))
        action = spec.action
        action_s = None
        if action is not None:
            action_s = action.slow_duration_s if smooth and action.slow_duration_s else action.duration_s
            if spec.duration_applies_to == "action" and duration is not None:
                action_s = duration
        event_type = spec.smooth_event_type if smooth and spec.smooth_event_type else spec.event_type
        default_s = spec.default_s * (count if spec.countable else 1)
        if spec.duration_applies_to == "action" and action_s is not None:
            default_s = action_s
        return InstructionStep(
            kind=kind, direction=None if direction == "none" else direction, amount=amount, count=count,
            at_s=group_mods.get("at"), delay_s=group_mods.get("delay"), duration_s=duration, smooth=smooth,
            group=index, words=words, group_words=group_words, instruction=text, targets=targets, hold=spec.hold,
            action=action.kind if action else None,
            eyes=direction if action is not None and action.kind == "wink" else "both",
            action_s=action_s, event_type=event_type, default_s=default_s,
            duration_applies_to=spec.duration_applies_to,
        )

    def parse_all(self, texts: Sequence[str]) -> list[InstructionStep]:
        """Several instruction strings, read in order as one sequence (their groups follow on)."""
        steps: list[InstructionStep] = []
        for text in texts:
            offset = steps[-1].group + 1 if steps else 0
            steps.extend(self.parse(text, group_offset=offset))
        return steps


def group_steps(steps: Sequence[InstructionStep]) -> list[list[InstructionStep]]:
    """Steps grouped by their ``group`` index, in order (one list per planned event)."""
    groups: dict[int, list[InstructionStep]] = {}
    for s in steps:
        groups.setdefault(s.group, []).append(s)
    return [groups[k] for k in sorted(groups)]


def load_vocabulary(path: str | Path) -> Vocabulary:
    """Read and validate instructions.yaml; a malformed file raises ``VocabularyError`` naming the key."""
    path = Path(path)
    spec = read_yaml_model(path, VocabularyFile, VocabularyError, "instruction vocabulary (compile.instructions)")
    return Vocabulary(spec, source=str(path))


__all__ = ["AMOUNTS", "ActionSpec", "InstructionError", "InstructionStep", "PlanningSpec", "StepSpec", "Vocabulary",
           "VocabularyError", "group_steps", "load_vocabulary"]
