"""A clip's own behaviour events, said back as an instruction the grammar reads.

The leave-one-clip-out evaluation compiles each held-out clip from its label plus the instruction
its events describe ("blink at 1.2 s, then look to the left at 2.0 s"), so the compiled sequence
can be scored against the clip frame by frame. Only events a person would name are said, the
most salient first, at most ``max_steps`` of them, at least ``min_gap_s`` apart (steps joined by
"then" follow each other; two at one moment would be one step), in time order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cogportrait.schema import CHANNEL_INDEX, CLIP_FPS

# event type -> priority (lower = said first when there are too many)
SAID_EVENTS = {"prolonged_closure": 0, "wink": 0, "brow_raise": 1, "frown": 1, "blink": 2, "head_nod": 2,
               "head_turn": 2, "head_tilt": 3, "squint": 3, "lid_droop": 3, "saccade": 4}
FIXED_PHRASES = {"blink": "blink", "frown": "frown", "squint": "squint", "lid_droop": "droop your eyelids"}
MIN_SACCADE = 0.2  # gaze units: smaller shifts are not worth an instruction


def _phrase(event: dict[str, Any], controls: np.ndarray, fps: int) -> str | None:
    kind = event["event_type"]
    s, e = int(event["start_frame"]), int(event["end_frame"])  # inclusive
    at = f"at {s / fps:.1f} s"
    c = controls
    if kind in FIXED_PHRASES:
        return f"{FIXED_PHRASES[kind]} {at}"
    if kind == "wink":
        return f"wink {event.get('eyes') or 'left'} {at}"
    if kind == "prolonged_closure":
        return f"close your eyes {at} for {(e - s + 1) / fps:.1f} seconds"
    if kind == "brow_raise":
        left = np.nanmax(c[s : e + 1, CHANNEL_INDEX["AU2L"]]) if e >= s else 0.0
        right = np.nanmax(c[s : e + 1, CHANNEL_INDEX["AU2R"]]) if e >= s else 0.0
        side = "" if abs(left - right) < 0.25 else ("left " if left > right else "right ")
        return f"raise your {side}eyebrow{'s' if not side else ''} {at}"
    if kind in ("head_nod", "head_turn", "head_tilt"):
        j = CHANNEL_INDEX[{"head_nod": "pitch", "head_turn": "yaw", "head_tilt": "roll"}[kind]]
        before = float(np.nanmedian(c[max(0, s - 5) : s + 1, j]))
        apex = int(event.get("apex_frame", (s + e) // 2))
        delta = float(c[min(apex, len(c) - 1), j]) - before
        if kind == "head_nod":
            return f"{'lower' if delta < 0 else 'raise'} the head {at}"
        if kind == "head_turn":
            return f"turn your head {'left' if delta > 0 else 'right'} {at}"
        return f"tilt your head {'left' if delta > 0 else 'right'} {at}"
    if kind == "saccade":
        after = c[min(e + 2, len(c) - 1)]
        horizontal = float(after[CHANNEL_INDEX["gaze_left"]] - after[CHANNEL_INDEX["gaze_right"]])
        if abs(horizontal) < MIN_SACCADE:
            return None
        return f"look to the {'left' if horizontal > 0 else 'right'} {at}"
    return None


def instruction_from_events(
    events: Sequence[dict[str, Any]], controls: np.ndarray, fps: int = CLIP_FPS, max_steps: int = 6,
    min_gap_s: float = 0.3,
) -> str:
    """"blink at 1.2 s, then look to the left at 2.0 s, ..." from a clip's events table rows."""
    said = []
    for ev in events:
        if ev["event_type"] not in SAID_EVENTS:
            continue
        text = _phrase(ev, np.asarray(controls, dtype=np.float64), fps)
        if text:
            said.append((SAID_EVENTS[ev["event_type"]], int(ev["start_frame"]), text))
    kept: list[tuple[int, int, str]] = []
    for item in sorted(said, key=lambda x: (x[0], x[1])):  # most salient first; one step per moment
        if len(kept) < max_steps and all(abs(item[1] - k[1]) >= min_gap_s * fps for k in kept):
            kept.append(item)
    said = sorted(kept, key=lambda x: x[1])
    return ", then ".join(text for _, _, text in said)
