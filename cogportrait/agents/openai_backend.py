"""The ``openai`` agent backend: the paper's three agent roles asked of an OpenAI-compatible LLM.

Each role is a system prompt kept as a file (``prompts/planner.md``, ``composer.md``,
``critic.md``, paper §3.3's planning, composition and critic agents), a user message that is the
request model's JSON, and an answer validated twice: by the answer's pydantic model (the JSON
schema the server is asked to follow) and by the checks here, which know the request (a plan for
the wrong number of frames, a composition naming an event that does not exist). A refusal of
either kind goes back to the model on the next attempt; when ``ChatClient`` runs out of attempts
it raises ``BackendUnavailable`` and the compiler falls back to ``rules``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from cogportrait.agents.backends import (
    ComposeRequest,
    ComposeTargets,
    PlanRequest,
    ReviewRequest,
    SemanticReview,
)
from cogportrait.agents.llm import ChatClient, InvalidAnswer, resolve_openai_settings
from cogportrait.agents.models import Plan, Target
from cogportrait.agents.models import _check_targets as check_targets
from cogportrait.config import OpenAIConfig
from cogportrait.schema import CONTROL_CHANNELS, PROTOTYPE_EVENT_TYPES

log = logging.getLogger("cogportrait.agents.openai")

PROMPTS_DIR = Path(__file__).with_name("prompts")
ROLES = ("planner", "composer", "critic")


def load_prompt(prompts_dir: Path, role: str) -> str:
    """A role's system prompt, with the vocabulary filled in from ``schema.py`` (one source)."""
    path = Path(prompts_dir) / f"{role}.md"
    if not path.is_file():
        raise FileNotFoundError(f"no prompt for the {role} agent: {path} is missing")
    text = path.read_text(encoding="utf-8")
    return text.replace("{{EVENT_TYPES}}", ", ".join(f"`{t}`" for t in PROTOTYPE_EVENT_TYPES))


class OpenAIBackend:
    """Planner, composer and critic as three prompts to one ``ChatClient`` (prompts read once)."""

    name = "openai"

    def __init__(self, client: ChatClient, prompts_dir: Path = PROMPTS_DIR) -> None:
        self.client = client
        self.prompts = {role: load_prompt(prompts_dir, role) for role in ROLES}

    @classmethod
    def from_config(
        cls,
        cfg: OpenAIConfig,
        base_url: str | None = None,
        model: str | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> OpenAIBackend:
        """Settings from flags > params > environment; ``BackendUnavailable`` when incomplete."""
        return cls(ChatClient.from_settings(resolve_openai_settings(cfg, base_url, model, environ)))

    def __repr__(self) -> str:
        return f"OpenAIBackend({self.client!r})"

    def _messages(self, role: str, request_json: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.prompts[role]}, {"role": "user", "content": request_json}]

    def plan(self, request: PlanRequest) -> Plan:
        plan = self.client.ask(self._messages("planner", request.model_dump_json()), Plan,
                               check=lambda p: check_plan(p, request))
        # label and instructions are the user's words, not the model's to rephrase
        return plan.model_copy(update={"label": request.label, "instructions": list(request.instructions)})

    def compose(self, request: ComposeRequest) -> ComposeTargets:
        answer = self.client.ask(self._messages("composer", request.model_dump_json()), ComposeTargets,
                                 check=lambda a: check_compose(a, request))
        return ComposeTargets(events=sorted(answer.events, key=lambda e: e.event_index))

    def review(self, request: ReviewRequest) -> SemanticReview:
        return self.client.ask(self._messages("critic", request.model_dump_json()), SemanticReview,
                               check=lambda r: check_review(r, request))


# -- what pydantic cannot know: the answer against its request -----------------------------------
def check_plan(plan: Plan, request: PlanRequest) -> None:
    """The plan is for this request's clip, and its event types are ones the library has."""
    problems = []
    if plan.n_frames != request.n_frames:
        problems.append(f"n_frames is {plan.n_frames} but the clip has {request.n_frames} frames: "
                        f"the events must tile [0, {request.n_frames})")
    if plan.fps != request.fps:
        problems.append(f"fps is {plan.fps} but the request says {request.fps}")
    for k, event in enumerate(plan.events):
        problems += _event_type_problems(f"events.{k}", event.event_type)
        if event.source == "instruction" and not event.instruction:
            problems.append(f"events.{k}: source is 'instruction' but `instruction` does not quote its words")
    _raise(problems)


def check_compose(answer: ComposeTargets, request: ComposeRequest) -> None:
    """One entry per plan event, each naming an existing event, with valid channel targets."""
    n = len(request.plan.events)
    seen: set[int] = set()
    problems = []
    for i, entry in enumerate(answer.events):
        where = f"events.{i}"
        if entry.event_index >= n:
            problems.append(f"{where}: event_index {entry.event_index} does not exist (the plan has events 0..{n - 1})")
        elif entry.event_index in seen:
            problems.append(f"{where}: event_index {entry.event_index} appears twice")
        seen.add(entry.event_index)
        problems += [f"{where}.targets: {p}" for p in target_problems(entry.targets)]
        problems += _event_type_problems(where, entry.event_type)
    missing = sorted(set(range(n)) - seen)
    if missing:
        problems.append(f"no targets for plan event(s) {missing}: give exactly one entry per event")
    _raise(problems)


def check_review(review: SemanticReview, request: ReviewRequest) -> None:
    """Semantic checks only, on real channels, events and frames, with a coherent verdict."""
    n_events, n_frames = len(request.plan.events), request.plan.n_frames
    problems = []
    if not review.checks:
        problems.append("no checks: report at least semantic consistency, event order and each instruction")
    for i, c in enumerate(review.checks):
        where = f"checks.{i} ({c.name!r})"
        if c.kind != "semantic":
            problems.append(f"{where}: kind must be 'semantic' (physiological rules are checked elsewhere)")
        unknown = [ch for ch in (*c.channels, *c.measured, *c.limit) if ch not in CONTROL_CHANNELS]
        if unknown:
            problems.append(f"{where}: unknown channel(s) {sorted(set(unknown))}; channels: {', '.join(CONTROL_CHANNELS)}")
        if c.event_index is not None and not 0 <= c.event_index < n_events:
            problems.append(f"{where}: event_index {c.event_index} does not exist (events 0..{n_events - 1})")
        if c.frames is not None and not 0 <= c.frames[0] < c.frames[1] <= n_frames:
            problems.append(f"{where}: frames {list(c.frames)} is not a span inside [0, {n_frames})")
        if c.verdict == "pass" and c.revise != "none":
            problems.append(f"{where}: a pass sends nothing back: revise must be 'none'")
        if c.verdict == "revise" and c.revise == "none":
            problems.append(f"{where}: a revise verdict must say where it goes: 'composer' or 'planner'")
    _raise(problems)


def target_problems(targets: Mapping[str, Target]) -> list[str]:
    """Every bad channel target (``EventTargets`` does not check them; ``Event`` stops at the first)."""
    problems = []
    for name, target in targets.items():
        try:
            check_targets({name: target})
        except ValueError as err:
            problems.append(str(err))
    return problems


def _event_type_problems(where: str, event_type: str | None) -> list[str]:
    if event_type is None or event_type in PROTOTYPE_EVENT_TYPES:
        return []
    return [f"{where}: event_type {event_type!r} is unknown; use one of {', '.join(PROTOTYPE_EVENT_TYPES)} or null"]


def _raise(problems: list[str]) -> None:
    if problems:
        raise InvalidAnswer(f"{len(problems)} problem(s):\n" + "\n".join(f"- {p}" for p in problems))


__all__ = ["OpenAIBackend", "PROMPTS_DIR", "check_compose", "check_plan", "check_review", "load_prompt",
           "target_problems"]
