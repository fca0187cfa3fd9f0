"""The three agent roles as one interface, so the compiler does not care who answers.

Each role takes a pydantic request and returns a pydantic answer (``models.py``): the planner a
``Plan``, the composer per-event channel ranges (``ComposeTargets``) that retrieval then realises,
the critic a ``SemanticReview`` (its semantic judgement; the physiological rules are code and run
whatever the backend). ``rules`` answers offline and deterministically; ``openai`` asks any
OpenAI-compatible endpoint (``llm.py``) and raises ``BackendUnavailable`` when it cannot get a valid
answer, after which the compiler falls back to ``rules`` with a warning that says why.
"""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from cogportrait.agents.models import CriticCheck, Plan, Target
from cogportrait.schema import CLIP_FPS


class BackendUnavailable(RuntimeError):
    """A backend could not produce a valid answer (network, timeouts, refusals, invalid JSON)."""


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PlanRequest(_Request):
    label: str | None
    instructions: list[str] = Field(default_factory=list)
    n_frames: int = Field(ge=1)
    fps: int = CLIP_FPS
    seed: int = 0
    known_labels: list[str] = Field(default_factory=list, description="category names the tables know")
    feedback: list[str] = Field(default_factory=list, description="why the previous plan was sent back")


class EventTargets(_Request):
    event_index: int = Field(ge=0)
    targets: dict[str, Target] = Field(default_factory=dict)
    event_type: str | None = None


class ComposeTargets(_Request):
    """The composer agent's answer: valid channel ranges per event (paper §3.3's 't2: AU4 in [...]')."""

    events: list[EventTargets]


class ComposeRequest(_Request):
    plan: Plan
    start_head_pose: tuple[float, float, float]
    feedback: list[str] = Field(default_factory=list)


class EventSummary(_Request):
    """What the composed controls do inside one event: per channel min, mean and max."""

    event_index: int
    stage: str
    minimum: dict[str, float]
    mean: dict[str, float]
    maximum: dict[str, float]
    closures: int = Field(0, description="eye closures detected in the span")


class ReviewRequest(_Request):
    plan: Plan
    events: list[EventSummary]


class SemanticReview(_Request):
    checks: list[CriticCheck] = Field(default_factory=list)


class AgentBackend(Protocol):
    """Planner, composer and critic roles of one backend."""

    name: str

    def plan(self, request: PlanRequest) -> Plan: ...

    def compose(self, request: ComposeRequest) -> ComposeTargets: ...

    def review(self, request: ReviewRequest) -> SemanticReview: ...
