"""Stage 1 end to end (paper §3.3): planner -> composer -> critic (bounded rounds) -> Π.

``Stage1Compiler.compile`` turns a label and/or instructions plus a duration into a plan, a
composed 17-channel control sequence, a critic report and the 62 keypoints per frame. The critic
sends failures back to the planner (re-decomposition with the critic's feedback) when it can act on
them, otherwise to the composer: in the first revision round another prototype for an event that
missed a channel it targets, then the rule's repair edit on the controls. The final report holds the last round's checks and
every revision made, with the reason.

The ablation variants of the paper's Table 3 share this code path so they differ only in what
they leave out: ``direct`` (the category table's trajectory, no retrieval), ``retrieval`` (one
label-ranked prototype for the whole span, no plan), ``planner`` (the plan's targets and actions
synthesised, no retrieval), ``composer`` (planner + composer, no critic) and ``full``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cogportrait.agents.backends import (
    AgentBackend, BackendUnavailable, ComposeRequest, ComposeTargets, EventSummary, EventTargets, PlanRequest,
    ReviewRequest, SemanticReview,
)
from cogportrait.agents.categories import NEUTRAL_CATEGORY, CategoryTable, target_midpoint
from cogportrait.agents.composer import Composer, PrototypeSource, ramp, synthetic_closure
from cogportrait.agents.critic import CannotRepair, physiological_checks, repair, semantic_checks
from cogportrait.agents.physiology import detect_closures
from cogportrait.agents.models import (
    Composition, CriticCheck, CriticReport, Edit, Event, EventComposition, Plan, Revision,
)
from cogportrait.config import CompileConfig, EventsConfig
from cogportrait.face.mapping import Placement, canonical_keypoints, controls_to_keypoints
from cogportrait.face.model import Baseline, LinearFaceModel
from cogportrait.metrics.stage1 import rest_controls
from cogportrait.schema import CHANNEL_INDEX, CLIP_FPS, CONTROL_CHANNELS, HEAD_CHANNELS

log = logging.getLogger("cogportrait")

VARIANTS = ("direct", "retrieval", "planner", "composer", "full")
HEAD = [CHANNEL_INDEX[c] for c in HEAD_CHANNELS]
AU45 = [CHANNEL_INDEX["AU45L"], CHANNEL_INDEX["AU45R"]]


class CompileInputError(ValueError):
    """The inputs do not make a compile request (duration, audio, label, face model)."""


@dataclass(frozen=True)
class CompileRequest:
    """What to compile: a label and/or instructions, a length, where the face starts."""

    label: str | None
    instructions: tuple[str, ...]
    n_frames: int
    start_pose: tuple[float, float, float] = (0.0, 0.0, 0.0)
    placement: Placement = Placement()
    identity: str | None = None  # the library identity whose baseline Π uses, when it knows the face
    baseline: Baseline | None = None  # or an explicit baseline (the LOCO evaluation's held-out average)
    seed: int = 0


@dataclass
class CompileResult:
    plan: Plan | None
    composition: Composition
    report: CriticReport
    controls: np.ndarray  # (T, 17) float32
    keypoints: np.ndarray  # (T, 62, 3) float32, x/y in [0, 1] of the crop
    rest: np.ndarray  # (17,) the rest levels the metrics and exports measure from
    neutral_keypoints: np.ndarray  # (62, 3) Π of the rest face at frame 0's head pose: Stage 2's TPS control points
    backend: str
    variant: str
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def neutral_controls(rest: np.ndarray, controls: np.ndarray) -> np.ndarray:
    """The rest face (no AU, gaze at rest) at the sequence's first head pose: where the compiled face
    sits before it moves, which Stage 2 warps onto the reference's detected keypoints."""
    neutral = np.asarray(rest, dtype=np.float64).copy()
    neutral[HEAD] = np.asarray(controls, dtype=np.float64)[0, HEAD]
    return neutral[None]


class RulesBackend:
    """The offline backend: the category tables and instruction grammar (``planner.py``)."""

    name = "rules"

    def __init__(self, planner: Any) -> None:
        self.planner = planner

    def plan(self, request: PlanRequest) -> Plan:
        return self.planner.plan(request)

    def compose(self, request: ComposeRequest) -> ComposeTargets:
        return ComposeTargets(events=[EventTargets(event_index=k, targets=dict(e.targets), event_type=e.event_type)
                                      for k, e in enumerate(request.plan.events)])

    def review(self, request: ReviewRequest) -> SemanticReview:
        return SemanticReview()  # the rules' semantic checks are code (critic.py) and always run


def apply_targets(plan: Plan, answer: ComposeTargets) -> Plan:
    """The plan with the composer agent's per-event ranges (unknown event indices are refused)."""
    events = list(plan.events)
    for et in answer.events:
        if et.event_index >= len(events):
            raise ValueError(f"the composer answered for event {et.event_index}; the plan has {len(events)}")
        e = events[et.event_index]
        events[et.event_index] = e.model_copy(update={"targets": dict(et.targets) or dict(e.targets),
                                                      "event_type": et.event_type or e.event_type})
    return Plan.model_validate(plan.model_copy(update={"events": events}).model_dump())


def event_summaries(plan: Plan, controls: np.ndarray, closures: list[tuple[int, int]]) -> list[EventSummary]:
    """Per-event channel min/mean/max and closure counts: what the critic agent reads."""
    out = []
    for k, e in enumerate(plan.events):
        seg = controls[e.start_frame : e.end_frame].astype(np.float64)
        stat = lambda f: {c: round(float(v), 4) for c, v in zip(CONTROL_CHANNELS, f(seg, axis=0))}  # noqa: E731
        n_closures = sum(1 for s, _ in closures if e.start_frame <= s < e.end_frame)
        out.append(EventSummary(event_index=k, stage=e.stage, minimum=stat(np.min), mean=stat(np.mean),
                                maximum=stat(np.max), closures=n_closures))
    return out


def synthesise_plan(plan: Plan, rest: np.ndarray, transition_frames: int, closure_amplitude: float) -> np.ndarray:
    """The plan's targets as a trajectory (range midpoints, smooth ramps) plus its actions.

    The paper's "Agent 1 only" row: structure from the planner, no real dynamics from retrieval.
    Head targets are relative (the start pose is added by the caller).
    """
    T = plan.n_frames
    level = np.repeat(rest[None, :].astype(np.float64), T, axis=0)
    level[:, HEAD] = 0.0
    for e in plan.events:
        for name, target in e.targets.items():
            level[e.start_frame : e.end_frame, CHANNEL_INDEX[name]] = target_midpoint(target)
    out = level.copy()
    for e in plan.events[1:]:  # ramps across boundaries
        b = e.start_frame
        n = min(transition_frames, b, T - b)
        if n < 1:
            continue
        w = ramp(2 * n)
        out[b - n : b + n] = level[b - n][None, :] * (1 - w[:, None]) + level[b + n - 1][None, :] * w[:, None]
    for e in plan.events:
        for a in e.actions:
            curve = synthetic_closure(a.n_frames, closure_amplitude)
            eyes = [0, 1] if a.eyes == "both" else [0 if a.eyes == "left" else 1]
            for i in eyes:
                out[a.start_frame : a.end_frame, AU45[i]] += curve
    return out


class Stage1Compiler:
    """Planner, composer and critic over one library and face model (load once, compile many)."""

    def __init__(
        self, source: PrototypeSource, model: LinearFaceModel, baselines: dict[str, Baseline], average: Baseline,
        categories: CategoryTable, planner: Any, cfg: CompileConfig, events_cfg: EventsConfig,
        backend: AgentBackend | None = None,
    ) -> None:
        self.source = source
        self.model = model
        self.baselines = baselines
        self.average = average
        self.categories = categories
        self.cfg = cfg
        self.events_cfg = events_cfg
        self.rules = RulesBackend(planner)
        self.backend: AgentBackend = backend or self.rules
        self.composer = Composer(source, cfg, {k: b.au for k, b in baselines.items()})

    # -- pieces -----------------------------------------------------------------------------------
    def baseline_for(self, identity: str | None) -> Baseline:
        return self.baselines.get(identity, self.average) if identity else self.average

    def rest_levels(self, baseline: Baseline, start_pose: Iterable[float]) -> np.ndarray:
        """Rest of each channel: the identity's AU and gaze rest, and the start pose for the head."""
        rest = rest_controls(baseline)
        rest[HEAD] = np.asarray(list(start_pose), dtype=np.float64)
        return rest

    def _ask(self, role: str, request: Any, warnings: list[str]) -> Any:
        """One agent role: the configured backend, falling back to rules with a warning."""
        if self.backend is not self.rules:
            try:
                return getattr(self.backend, role)(request)
            except BackendUnavailable as err:
                msg = f"{self.backend.name} backend unavailable for the {role} ({err}); using the rules backend"
                log.warning(msg)
                warnings.append(msg)
                self.backend = self.rules
        if isinstance(request, PlanRequest) and request.label and request.label not in self.categories:
            # a free-text label an LLM was to interpret: the rules compile the instructions alone
            fallback = None if request.instructions else NEUTRAL_CATEGORY
            msg = f"the rules backend has no category {request.label!r}; compiling {'the instructions alone' if fallback is None else repr(fallback)}"
            log.warning(msg)
            warnings.append(msg)
            request = request.model_copy(update={"label": fallback})
        return getattr(self.rules, role)(request)

    def _check(
        self, controls: np.ndarray, plan: Plan, rest: np.ndarray, label: str | None, baseline: Baseline,
        warnings: list[str],
    ) -> list[CriticCheck]:
        canon = canonical_keypoints(controls, self.model, baseline)
        category = self.categories.get(label) if label and label in self.categories else None
        required = list(category.target_aus) if category else []
        allow = set(category.allow) if category else set()
        checks = semantic_checks(controls, canon, rest, plan, required, self.cfg.critic, self.events_cfg, plan.fps)
        checks += physiological_checks(controls, canon, plan, allow, self.cfg.critic, self.events_cfg, plan.fps, rest=rest)
        if self.backend is not self.rules:
            closures = [(c.start, c.end) for c in detect_closures(controls, canon, self.events_cfg, plan.fps)]
            review = self._ask("review", ReviewRequest(plan=plan, events=event_summaries(plan, controls, closures)), warnings)
            checks += list(review.checks)
        return checks

    # -- the loop ---------------------------------------------------------------------------------
    def compile(self, request: CompileRequest, variant: str = "full", exclude_identities: Iterable[str] = ()) -> CompileResult:
        """One compile; a backend that fails falls back to rules for this compile only."""
        if variant not in VARIANTS:
            raise ValueError(f"variant {variant!r}; choose one of {', '.join(VARIANTS)}")
        configured = self.backend
        try:
            return self._compile(request, variant, exclude_identities)
        finally:
            self.backend = configured

    def _compile(self, request: CompileRequest, variant: str, exclude_identities: Iterable[str]) -> CompileResult:
        t0 = time.perf_counter()
        timings = {"planning": 0.0, "retrieval": 0.0, "critic": 0.0, "mapping": 0.0}
        warnings: list[str] = []
        baseline = request.baseline or self.baseline_for(request.identity)
        rest = self.rest_levels(baseline, request.start_pose)
        self.composer.clear_cache()
        exclude = frozenset(exclude_identities)
        plan: Plan | None = None
        revisions: list[Revision] = []
        checks: list[CriticCheck] = []
        rounds = 0
        label = request.label

        if variant in ("direct", "retrieval"):
            controls, composition, plan = self._baseline_variant(variant, request, rest, exclude, timings)
        else:
            t = time.perf_counter()
            known = list(self.categories.known)
            plan_request = PlanRequest(label=label, instructions=list(request.instructions), n_frames=request.n_frames,
                                       fps=CLIP_FPS, seed=request.seed, known_labels=known)
            plan = self._ask("plan", plan_request, warnings)
            if variant != "planner":
                answer = self._ask("compose", ComposeRequest(plan=plan, start_head_pose=request.start_pose), warnings)
                plan = apply_targets(plan, answer)
            timings["planning"] += time.perf_counter() - t
            if variant == "planner":
                controls = synthesise_plan(plan, rest, int(round(self.cfg.transition_s * CLIP_FPS)),
                                           self.cfg.synthetic_closure_amplitude)
                controls[:, HEAD] += np.asarray(request.start_pose)[None, :]
                controls = controls.astype(np.float32)
                composition = Composition(
                    events=[EventComposition(event_index=k, start_frame=e.start_frame, end_frame=e.end_frame, targets=e.targets,
                                             edits=[Edit(op="synthesise", detail="planner targets, no retrieval")])
                            for k, e in enumerate(plan.events)],
                    start_head_pose=request.start_pose, label_rerank=False)
            else:
                t = time.perf_counter()
                composed = self.composer.compose(plan, request.start_pose, rest, request.seed, label=label, exclude=exclude)
                controls, composition = composed.controls, composed.composition
                timings["retrieval"] += time.perf_counter() - t
            if variant == "full":
                controls, composition, plan, checks, revisions, rounds = self._critic_loop(
                    controls, composition, plan, request, rest, baseline, exclude, timings, warnings)

        if variant != "full":  # the ablations are reported with the checks they would face
            t = time.perf_counter()
            checks = self._check(controls, plan, rest, label, baseline, warnings)
            timings["critic"] += time.perf_counter() - t
        report = CriticReport(approved=not any(c.verdict == "revise" for c in checks), rounds=rounds, checks=checks,
                              revisions=revisions)
        t = time.perf_counter()
        keypoints = controls_to_keypoints(controls, self.model, baseline, request.placement).astype(np.float32)
        neutral = neutral_controls(rest, controls)
        neutral_keypoints = controls_to_keypoints(neutral, self.model, baseline, request.placement)[0].astype(np.float32)
        timings["mapping"] += time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        return CompileResult(plan=plan, composition=composition, report=report, controls=np.asarray(controls, np.float32),
                             keypoints=keypoints, rest=rest, neutral_keypoints=neutral_keypoints, backend=self.backend.name, variant=variant,
                             timings=timings, warnings=warnings)

    def _critic_loop(
        self, controls: np.ndarray, composition: Composition, plan: Plan, request: CompileRequest, rest: np.ndarray,
        baseline: Baseline, exclude: frozenset[str], timings: dict[str, float],
        warnings: list[str],
    ) -> tuple[np.ndarray, Composition, Plan, list[CriticCheck], list[Revision], int]:
        """Check, revise, re-check, at most ``critic.max_rounds`` revision rounds."""
        revisions: list[Revision] = []
        avoid: dict[int, set[str]] = {}
        drops: list[str] = []
        rounds = 0
        while True:
            t = time.perf_counter()
            checks = self._check(controls, plan, rest, request.label, baseline, warnings)
            timings["critic"] += time.perf_counter() - t
            failing = [c for c in checks if c.verdict == "revise"]
            if not failing or rounds >= self.cfg.critic.max_rounds:
                return controls, composition, plan, checks, revisions, rounds
            rounds += 1
            to_planner = [c for c in failing if c.revise == "planner"]
            if to_planner:
                t = time.perf_counter()
                # drops accumulate over the rounds: a re-plan must not bring back what an earlier one dropped
                drops += [f"drop:{ch}@{c.event_index}" for c in to_planner if c.event_index is not None for ch in c.channels]
                feedback = [f"{c.name}: {c.message}" for c in to_planner] + sorted(set(drops))
                plan_request = PlanRequest(label=request.label, instructions=list(request.instructions),
                                           n_frames=request.n_frames, fps=CLIP_FPS, seed=request.seed,
                                           known_labels=list(self.categories.known), feedback=feedback)
                new_plan = self._ask("plan", plan_request, warnings)
                new_plan = apply_targets(new_plan, self._ask(
                    "compose", ComposeRequest(plan=new_plan, start_head_pose=request.start_pose, feedback=feedback), warnings))
                timings["planning"] += time.perf_counter() - t
                if new_plan != plan:  # the planner could act on the feedback: compose the new plan
                    plan = new_plan
                    for c in to_planner:
                        revisions.append(Revision(round=rounds, target="planner", check=c.name, action=f"re-planned: {c.message}"))
                    t = time.perf_counter()
                    composed = self.composer.compose(plan, request.start_pose, rest, request.seed, label=request.label,
                                                     exclude=exclude, round_index=rounds)
                    controls, composition = composed.controls, composed.composition
                    timings["retrieval"] += time.perf_counter() - t
                    continue
                # the same plan again: the composer's repair edits are what is left
            # another tonic prototype can only help where the miss is on a channel the event targets
            # (closures come from the phasic layer: their misses go to the repair edits)
            swappable = [c for c in failing if c.event_index is not None and c.kind == "semantic"
                         and set(c.channels) & (set(plan.events[c.event_index].targets) - {"AU45L", "AU45R"})]
            if rounds == 1 and swappable:
                # first answer of the composer: another prototype for the events that missed
                for c in swappable:
                    used = composition.events[c.event_index].prototypes
                    if used:
                        avoid.setdefault(c.event_index, set()).add(used[0].prototype_id)
                        revisions.append(Revision(round=rounds, target="composer", check=c.name,
                                                  action=f"event {c.event_index}: replaced prototype {used[0].prototype_id[:8]} ({c.message})"))
                t = time.perf_counter()
                composed = self.composer.compose(plan, request.start_pose, rest, request.seed,
                                                 label=request.label, exclude=exclude, avoid=avoid, round_index=rounds)
                controls, composition = composed.controls, composed.composition
                timings["retrieval"] += time.perf_counter() - t
                continue
            t = time.perf_counter()
            controls = np.asarray(controls, dtype=np.float64)
            for c in failing:
                try:
                    controls, action = repair(controls, c, plan, rest, self.cfg.critic, plan.fps, events_cfg=self.events_cfg)
                except CannotRepair as err:  # e.g. an LLM critic's check no rule knows how to edit
                    action = f"left as is: {err}"
                revisions.append(Revision(round=rounds, target="composer", check=c.name, action=action))
            controls = controls.astype(np.float32)
            composition = composition.model_copy(update={"round": rounds})
            timings["critic"] += time.perf_counter() - t

    def _baseline_variant(
        self, variant: str, request: CompileRequest, rest: np.ndarray, exclude: frozenset[str], timings: dict[str, float],
    ) -> tuple[np.ndarray, Composition, Plan]:
        """The two rows of Table 3 that use neither planner nor critic (the one-event span they return
        is what the critic's checks are reported against)."""
        label = request.label if request.label and request.label in self.categories else NEUTRAL_CATEGORY
        category = self.categories.get(label)
        span = Plan(label=request.label, n_frames=request.n_frames,
                    events=[Event(start_s=0.0, end_s=request.n_frames / CLIP_FPS, start_frame=0, end_frame=request.n_frames,
                                  stage=f"{label} ({variant} only)", targets=self.categories.characteristic_targets(category))])
        if variant == "direct":
            controls = np.asarray(self.categories.direct_trajectory(category, request.n_frames, CLIP_FPS, rest=rest,
                                                                    ramp_s=self.cfg.transition_s), dtype=np.float64)
            controls[:, HEAD] += np.asarray(request.start_pose)[None, :]
            composition = Composition(events=[EventComposition(event_index=0, start_frame=0, end_frame=request.n_frames,
                                                               edits=[Edit(op="synthesise", detail=f"direct trajectory of {label!r}")])],
                                      start_head_pose=request.start_pose, label_rerank=False)
            return controls.astype(np.float32), composition, span
        # retrieval by label only: one Eq. 3 query with the category's characteristic targets
        t = time.perf_counter()
        composed = self.composer.compose(span, request.start_pose, rest, request.seed, label=request.label, exclude=exclude)
        timings["retrieval"] += time.perf_counter() - t
        return composed.controls, composed.composition, span
