"""What the Stage-1 agents say to each other: pydantic models, validated on every hand-over.

The same models are the JSON schemas the ``openai`` backend asks an LLM to follow, so an answer
that does not fit is refused with pydantic's message (which goes back to the model on a retry),
whichever backend produced it. Frames are 0-based, spans half-open ``[start_frame, end_frame)``,
and the events of a plan tile ``[0, n_frames)`` exactly (paper §3.3: Σ Δt_k = T).

A channel target is a value or a ``[lo, hi]`` range on one of the 17 channels (DESIGN.md names;
head angles in degrees *relative to the reference portrait's pose*, so "lower the head" reads
``pitch: [-12, -5]`` whatever the portrait's own pitch).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from cogportrait.schema import CLIP_FPS, CONTROL_CHANNELS, HEAD_CHANNELS

Target = float | tuple[float, float]
EYES = ("both", "left", "right")
ACTION_KINDS = ("blink", "wink", "closure")  # phasic eye actions laid over an event's tonic state
REVISION_TARGETS = ("none", "composer", "planner")


def interval(target: Target) -> tuple[float, float]:
    """A target as (lo, hi); a value v is the degenerate range (v, v)."""
    if isinstance(target, (int, float)):
        return float(target), float(target)
    lo, hi = target
    return float(lo), float(hi)


class StrictModel(BaseModel):
    """Frozen, and unknown keys are an error: every agent message and data table of Stage 1."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_targets(targets: dict[str, Target]) -> dict[str, Target]:
    for name, target in targets.items():
        if name not in CONTROL_CHANNELS:
            raise ValueError(f"unknown channel {name!r}; channels: {', '.join(CONTROL_CHANNELS)}")
        lo, hi = interval(target)
        if not lo <= hi:
            raise ValueError(f"{name}: range [{lo}, {hi}] has lo > hi")
        bounds = (-90.0, 90.0) if name in HEAD_CHANNELS else (0.0, 1.0)
        if lo < bounds[0] or hi > bounds[1]:
            raise ValueError(f"{name}: [{lo}, {hi}] leaves the channel's range {list(bounds)}")
    return targets


class Action(StrictModel):
    """A phasic eye action inside an event: a blink, a wink or a held closure, in plan frames."""

    kind: Literal["blink", "wink", "closure"]
    eyes: Literal["both", "left", "right"] = "both"
    start_frame: int = Field(ge=0)
    n_frames: int = Field(ge=1)

    @model_validator(mode="after")
    def _wink_is_one_eye(self) -> Action:
        if (self.kind == "wink") != (self.eyes != "both"):
            raise ValueError(f"a {self.kind} with eyes={self.eyes!r}: a wink closes one eye, blinks and closures both")
        return self

    @property
    def end_frame(self) -> int:
        return self.start_frame + self.n_frames


class Event(StrictModel):
    """One staged event of a plan: a span, what it means, and what the 17 channels should do."""

    start_s: float = Field(ge=0)
    end_s: float
    start_frame: int = Field(ge=0)
    end_frame: int
    stage: str = Field(min_length=1, description="stage semantics, e.g. 'gaze shifts left with a mild squint'")
    targets: dict[str, Target] = Field(default_factory=dict, description="channel -> value or [lo, hi]")
    actions: list[Action] = Field(default_factory=list, description="blinks, winks, closures inside the span")
    event_type: str | None = Field(None, description="prototype event type to prefer (blink, head_nod, ...), if any")
    source: Literal["category", "instruction"] = "category"
    instruction: str | None = Field(None, description="the instruction words this event realises")

    @field_validator("targets")
    @classmethod
    def _known_channels(cls, targets: dict[str, Target]) -> dict[str, Target]:
        return _check_targets(targets)

    @model_validator(mode="after")
    def _span(self) -> Event:
        if self.end_frame <= self.start_frame:
            raise ValueError(f"event {self.stage!r}: end_frame {self.end_frame} <= start_frame {self.start_frame}")
        for a in self.actions:
            if a.start_frame < self.start_frame or a.end_frame > self.end_frame:
                raise ValueError(
                    f"event {self.stage!r} [{self.start_frame}, {self.end_frame}): its {a.kind} "
                    f"[{a.start_frame}, {a.end_frame}) leaves the span"
                )
        return self

    @property
    def n_frames(self) -> int:
        return self.end_frame - self.start_frame


class Plan(StrictModel):
    """The planner's output: staged events tiling ``[0, n_frames)`` at ``fps``."""

    label: str | None = None
    instructions: list[str] = Field(default_factory=list)
    fps: int = Field(CLIP_FPS, ge=1)
    n_frames: int = Field(ge=1)
    events: list[Event] = Field(min_length=1)

    @model_validator(mode="after")
    def _tiles(self) -> Plan:
        edge = 0
        for k, e in enumerate(self.events):
            if e.start_frame != edge:
                raise ValueError(f"events must tile [0, {self.n_frames}): event {k} starts at frame {e.start_frame}, expected {edge}")
            for name, frame, seconds in (("start", e.start_frame, e.start_s), ("end", e.end_frame, e.end_s)):
                if abs(seconds - frame / self.fps) > 0.5 / self.fps:
                    raise ValueError(f"event {k}: {name}_s={seconds} does not match {name}_frame={frame} at {self.fps} fps")
            edge = e.end_frame
        if edge != self.n_frames:
            raise ValueError(f"events must tile [0, {self.n_frames}): the last one ends at frame {edge}")
        return self


class Edit(StrictModel):
    """One edit the composer applied to a retrieved prototype (paper §3.3: trim, rescale, stitch)."""

    op: Literal["trim", "loop", "time_scale", "rescale", "stitch", "anchor_pose", "overlay", "synthesise"]
    channels: list[str] = Field(default_factory=list)
    detail: str = ""
    values: dict[str, float] = Field(default_factory=dict, description="the numbers of the edit (frames, gains, ...)")


class Retrieved(StrictModel):
    """A prototype the composer chose, with its Eq. 3 distance and the frames it took."""

    prototype_id: str
    distance: float
    label: str | None = None
    event_type: str | None = None
    clip_id: str | None = None
    source_start: int = Field(0, ge=0, description="first frame taken, in prototype frames")
    source_end: int = Field(0, ge=0)


class EventComposition(StrictModel):
    """How one event's span was filled: its targets, the prototype(s) chosen, the edits."""

    event_index: int = Field(ge=0)
    start_frame: int
    end_frame: int
    targets: dict[str, Target] = Field(default_factory=dict)
    prototypes: list[Retrieved] = Field(default_factory=list, description="the tonic prototype first, then one per action")
    edits: list[Edit] = Field(default_factory=list)


class Composition(StrictModel):
    """The composer's output: per event, the prototypes and edits; the controls are stored beside it."""

    events: list[EventComposition]
    start_head_pose: tuple[float, float, float] = Field(description="yaw, pitch, roll of the reference portrait (degrees)")
    label_rerank: bool = Field(description="whether the label re-ranked retrieval (False: the library has no such label)")
    round: int = Field(0, ge=0, description="composer round that produced it (0 = first)")


class CriticCheck(StrictModel):
    """One semantic or physiological check: its verdict, the channels, the numbers against the rule."""

    name: str
    kind: Literal["semantic", "physiological"]
    verdict: Literal["pass", "revise"]
    channels: list[str] = Field(default_factory=list)
    event_index: int | None = None
    frames: tuple[int, int] | None = Field(None, description="[start, end) where the rule is broken")
    measured: dict[str, float] = Field(default_factory=dict)
    limit: dict[str, float] = Field(default_factory=dict)
    message: str = ""
    revise: Literal["none", "composer", "planner"] = "none"


class Revision(StrictModel):
    """What one critic round changed, and why."""

    round: int
    target: Literal["composer", "planner"]
    check: str
    action: str


class CriticReport(StrictModel):
    """The critic's final word: every check of the last round and every revision made before it."""

    approved: bool
    rounds: int
    checks: list[CriticCheck]
    revisions: list[Revision] = Field(default_factory=list)

    @property
    def failing(self) -> list[CriticCheck]:
        return [c for c in self.checks if c.verdict == "revise"]
