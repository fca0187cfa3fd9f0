"""EMH benchmark annotations: one case per video, in the paper's frame-index event format.

The paper (§3.2) releases, per case, a text prompt and eye-region event annotations by frame index,
e.g. a drowsiness clip: "frames 0–a exhibit droopy eyelids, frames a–b contain a prolonged blink,
and frames b–end show a drowsy head nod". A case here holds exactly that::

    version: 1
    cases:
      - case_id: lp_d3                  # the file stem of its reference (and generated) video
        category: drowsiness            # one of categories.yaml (name or alias)
        prompt: "A woman grows drowsy; her eyes close for long moments."
        frames: 295                     # the reference video's frame count (25 fps)
        events: "frames 0-5 frowning, 5-18 left-eye wink, 18-100 frowning, 100-136 prolonged closure, 136-end frowning"

``events`` is the paper's sentence: comma-separated ``a-b description`` parts (the first may start
with "frames", a dash may be an en dash, ``end`` is the frame count), each range half-open [a, b),
and the ranges tile the clip in order. ``parse_events`` reads it; ``load_annotations`` validates a
whole file and raises ``AnnotationError`` with one line naming the case and what is wrong.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from cogportrait.agents.categories import CategoryTable, UnknownCategoryError

ANNOTATION_VERSION = 1
CASE_KEYS = ("case_id", "category", "prompt", "frames", "events")
_RANGE = re.compile(r"^\s*(?:frames?\s+)?(\d+|end)\s*[-–—]\s*(\d+|end)\s+(\S.*?)\s*$", re.IGNORECASE)


class AnnotationError(ValueError):
    """A malformed EMH annotation file (a user error: one line, exit 2)."""


@dataclass(frozen=True)
class EmhEvent:
    start: int  # first frame
    end: int  # one past the last frame
    description: str


@dataclass(frozen=True)
class EmhCase:
    case_id: str
    category: str  # the canonical category name
    prompt: str
    frames: int
    events: tuple[EmhEvent, ...]

    def events_text(self) -> str:
        """The events back in the paper's sentence form (``parse_events`` reads it back)."""
        parts = [f"{e.start}-{'end' if e.end == self.frames else e.end} {e.description}" for e in self.events]
        return "frames " + ", ".join(parts)


def parse_events(text: str, frames: int) -> tuple[EmhEvent, ...]:
    """"frames 0-a x, a-b y, b-end z" -> events; the ranges must tile [0, frames) in order."""
    events = []
    for part in text.split(","):
        m = _RANGE.match(part)
        if m is None:
            raise ValueError(f"cannot read {part.strip()!r}: expected 'START-END description' (END may be 'end')")
        start, end = (frames if v.lower() == "end" else int(v) for v in m.group(1, 2))
        events.append(EmhEvent(start, end, m.group(3)))
    expected = 0
    for e in events:
        if e.start != expected:
            word = "a gap" if e.start > expected else "an overlap"
            raise ValueError(f"{word} at frame {min(e.start, expected)}: '{e.description}' starts at {e.start}, the previous range ends at {expected}")
        if e.end <= e.start:
            raise ValueError(f"'{e.description}': range {e.start}-{e.end} is empty")
        expected = e.end
    if expected != frames:
        raise ValueError(f"the ranges end at frame {expected}, the case has {frames} frames")
    return tuple(events)


def load_annotations(path: str | Path, categories: CategoryTable) -> list[EmhCase]:
    """Read and validate an annotation file; every error is one line naming the case."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"EMH annotations {path} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise AnnotationError(f"{path}: not YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict) or raw.get("version") != ANNOTATION_VERSION or not isinstance(raw.get("cases"), list):
        raise AnnotationError(f"{path}: expected 'version: {ANNOTATION_VERSION}' and a list under 'cases'")
    cases, seen = [], set()
    for k, item in enumerate(raw["cases"]):
        where = f"{path}: case {k}"
        if not isinstance(item, dict):
            raise AnnotationError(f"{where}: expected a mapping with {', '.join(CASE_KEYS)}")
        where = f"{path}: case {item.get('case_id', k)!s}"
        unknown, missing = sorted(set(item) - set(CASE_KEYS)), [key for key in CASE_KEYS if key not in item]
        if unknown or missing:
            raise AnnotationError(f"{where}: " + "; ".join(filter(None, [
                f"unknown key(s) {', '.join(unknown)}" if unknown else "", f"missing key(s) {', '.join(missing)}" if missing else ""])))
        case_id = str(item["case_id"])
        if not re.fullmatch(r"[A-Za-z0-9._-]+", case_id):
            raise AnnotationError(f"{where}: case_id must be a file stem (letters, digits, '.', '_', '-')")
        if case_id in seen:
            raise AnnotationError(f"{where}: case_id appears twice")
        seen.add(case_id)
        try:
            category = categories.get(str(item["category"])).name
        except UnknownCategoryError as err:
            raise AnnotationError(f"{where}: {err}") from None
        if not isinstance(item["prompt"], str) or not item["prompt"].strip():
            raise AnnotationError(f"{where}: prompt must be a non-empty text")
        if not isinstance(item["frames"], int) or isinstance(item["frames"], bool) or item["frames"] < 1:
            raise AnnotationError(f"{where}: frames must be a positive integer")
        try:
            events = parse_events(str(item["events"]), item["frames"])
        except ValueError as err:
            raise AnnotationError(f"{where}: events: {err}") from None
        cases.append(EmhCase(case_id, category, item["prompt"].strip(), item["frames"], events))
    return cases
