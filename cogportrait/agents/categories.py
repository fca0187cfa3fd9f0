"""The category tables of the `rules` backend (paper §3.3 and its supplement's category-to-control
mappings): per EMH category, its staged events with channel targets, natural blink statistics, the
target channel set S_y of AU-F1 and the co-activations the critic accepts.

The tables are data (``datasets/emh/categories.yaml``, path in ``compile.categories``) so that a
psychologist can tune a category without reading code; this module validates them strictly on load
(a typo in a channel name would otherwise silently drop a target) and offers the lookups the
planner, critic and metrics share. ``direct_trajectory`` is the paper's Table 3 "direct
label -> controls" baseline: the table's stages drawn as a trajectory with no retrieval at all.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, TypeVar

import numpy as np
import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from cogportrait.agents.models import StrictModel, Target, _check_targets, interval
from cogportrait.config import CompileConfig
from cogportrait.schema import (
    AU_CHANNELS,
    CHANNEL_INDEX,
    CLIP_FPS,
    CONTROL_CHANNELS,
    GAZE_CHANNELS,
    HEAD_CHANNELS,
    N_CHANNELS,
    PROTOTYPE_EVENT_TYPES,
)

ModelT = TypeVar("ModelT", bound=BaseModel)
NEUTRAL_CATEGORY = "neutral talking"  # the background of instruction-only plans
STAGE_EVENT_TYPES = PROTOTYPE_EVENT_TYPES
# Co-activations the critic accepts only where a category allows them (closed vocabulary).
ALLOW_EXCEPTIONS: dict[str, str] = {
    "brow_raise_with_droop": "raised brows (AU1/AU2) together with drooping lids (AU41): fighting heavy lids, sad brows",
    "brow_raise_with_frown": "raised inner brows with a brow lowerer (AU1 + AU4): the fear and sadness brow",
    "asymmetric_brow": "one outer brow raised and the other not (AU2L vs AU2R): contempt, scepticism",
    "gaze_without_head": "gaze held off-centre without the head following: evasive glances",
}


class UnknownCategoryError(ValueError):
    """A label the category tables do not know (a user error; the message lists the known ones)."""


class CategoryTableError(ValueError):
    """categories.yaml is malformed; the message names the category and key."""


def _range(value: tuple[float, float], name: str, lo_min: float = 0.0) -> tuple[float, float]:
    lo, hi = value
    if not lo_min <= lo <= hi:
        raise ValueError(f"{name} [{lo}, {hi}] must satisfy {lo_min} <= lo <= hi")
    return value


def _durations(value: tuple[float, float]) -> tuple[float, float]:
    """A [lo, hi] range of durations in seconds: ordered, and nothing lasts 0 s."""
    _range(value, "duration_s")
    if value[0] <= 0:
        raise ValueError("duration_s must be positive")
    return value


class StageAction(StrictModel):
    """A phasic eye action a stage contains (drowsiness: a prolonged closure), placed by the seed."""

    kind: Literal["blink", "wink", "closure"]
    eyes: Literal["both", "left", "right"] = "both"
    duration_s: tuple[float, float]
    count: int = Field(1, ge=1)

    @field_validator("duration_s")
    @classmethod
    def _duration(cls, v: tuple[float, float]) -> tuple[float, float]:
        return _durations(v)

    @model_validator(mode="after")
    def _eyes(self) -> StageAction:
        if (self.kind == "wink") != (self.eyes != "both"):
            raise ValueError(f"a {self.kind} with eyes={self.eyes!r}: a wink closes one eye, blinks and closures both")
        return self


class Stage(StrictModel):
    """One staged event of a category: semantics, share of the duration, channel targets."""

    stage: str = Field(min_length=1)
    share: tuple[float, float]
    targets: dict[str, Target] = Field(default_factory=dict)
    event_type: str | None = None
    actions: list[StageAction] = Field(default_factory=list)
    main: bool = False
    # AU/gaze channels this stage deliberately holds well below the face's rest (drowsiness letting
    # AU5 sag): declared so that a target far under rest reads as intent, not as a scale mistake
    below_rest: list[str] = Field(default_factory=list)

    @field_validator("share")
    @classmethod
    def _share(cls, v: tuple[float, float]) -> tuple[float, float]:
        lo, hi = v
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"share [{lo}, {hi}] must satisfy 0 < lo <= hi <= 1")
        return v

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: dict[str, Target]) -> dict[str, Target]:
        return _check_targets(v)

    @field_validator("event_type")
    @classmethod
    def _event_type(cls, v: str | None) -> str | None:
        if v is not None and v not in STAGE_EVENT_TYPES:
            raise ValueError(f"event_type {v!r} is not one of {', '.join(STAGE_EVENT_TYPES)}")
        return v

    @model_validator(mode="after")
    def _below_rest(self) -> Stage:
        bad = [c for c in self.below_rest if c not in self.targets or c in HEAD_CHANNELS]
        if bad:
            raise ValueError(f"below_rest: {', '.join(bad)} must be AU/gaze channels the stage targets")
        return self

    @property
    def mid_share(self) -> float:
        return 0.5 * (self.share[0] + self.share[1])


class BlinkSpec(StrictModel):
    """Natural blinks of a category: rate per minute and duration in seconds, both [lo, hi]."""

    rate_per_min: tuple[float, float]
    duration_s: tuple[float, float]

    @field_validator("rate_per_min")
    @classmethod
    def _rate(cls, v: tuple[float, float]) -> tuple[float, float]:
        return _range(v, "rate_per_min")

    @field_validator("duration_s")
    @classmethod
    def _duration(cls, v: tuple[float, float]) -> tuple[float, float]:
        return _durations(v)


class Category(StrictModel):
    """One category table (see the header of categories.yaml for every key's meaning)."""

    name: str = ""  # filled from the mapping key on load
    aliases: list[str] = Field(default_factory=list)
    prompt: str = ""  # the text prompt EMH pairs with the category's cases (datasets/emh/README.md)
    target_aus: list[str] = Field(min_length=1)
    allow: list[str] = Field(default_factory=list)
    blink: BlinkSpec
    stages: list[Stage] = Field(min_length=1)

    @field_validator("target_aus")
    @classmethod
    def _target_aus(cls, v: list[str]) -> list[str]:
        bad = [c for c in v if c not in CONTROL_CHANNELS]
        if bad:
            raise ValueError(f"unknown channel(s) {', '.join(bad)}; channels: {', '.join(CONTROL_CHANNELS)}")
        if len(set(v)) != len(v):
            raise ValueError("lists a channel twice")
        return v

    @field_validator("allow")
    @classmethod
    def _allow(cls, v: list[str]) -> list[str]:
        bad = [a for a in v if a not in ALLOW_EXCEPTIONS]
        if bad:
            raise ValueError(f"unknown exception(s) {', '.join(bad)}; valid: {', '.join(ALLOW_EXCEPTIONS)}")
        return v

    @model_validator(mode="after")
    def _stages_tile(self) -> Category:
        lo = sum(s.share[0] for s in self.stages)
        hi = sum(s.share[1] for s in self.stages)
        if lo > 1 + 1e-9 or hi < 1 - 1e-9:
            raise ValueError(f"stages: shares cannot tile the clip (the lo's sum to {lo:g}, must be <= 1; "
                             f"the hi's sum to {hi:g}, must be >= 1)")
        if sum(s.main for s in self.stages) > 1:
            raise ValueError("stages: more than one stage is marked main")
        targeted = {c for s in self.stages for c in s.targets}
        missing = [c for c in self.target_aus if c not in targeted and c not in ("AU45L", "AU45R")]
        if missing:
            raise ValueError(f"target_aus: {', '.join(missing)} not targeted by any stage")
        return self

    @property
    def main_index(self) -> int:
        """The stage marked main, else the one with the largest mean share (first on ties)."""
        for k, s in enumerate(self.stages):
            if s.main:
                return k
        shares = [s.mid_share for s in self.stages]
        return int(np.argmax(shares))

    @property
    def main_stage(self) -> Stage:
        return self.stages[self.main_index]


class CategoryFile(StrictModel):
    version: int
    au_thresholds: dict[str, float]
    # the rest levels the absolute AU/gaze targets were calibrated against (documentation and the
    # calibration test; the compiler measures from each face's own rest)
    reference_rest: dict[str, float] | None = None
    categories: dict[str, Category]

    @field_validator("reference_rest")
    @classmethod
    def _reference_rest(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        channels = (*AU_CHANNELS, *GAZE_CHANNELS)
        unknown = [c for c in v if c not in channels]
        if unknown:
            raise ValueError(f"unknown channel(s) {', '.join(unknown)} (AU and gaze channels only)")
        missing = [c for c in channels if c not in v]
        if missing:
            raise ValueError(f"missing channel(s) {', '.join(missing)}")
        bad = [c for c, r in v.items() if not 0.0 <= r <= 1.0]
        if bad:
            raise ValueError(f"{', '.join(bad)}: a rest level lies in [0, 1]")
        return v

    @field_validator("au_thresholds")
    @classmethod
    def _thresholds(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = [c for c in v if c not in CONTROL_CHANNELS]
        if unknown:
            raise ValueError(f"unknown channel(s) {', '.join(unknown)}")
        missing = [c for c in CONTROL_CHANNELS if c not in v]
        if missing:
            raise ValueError(f"missing channel(s) {', '.join(missing)} (give tau_u for all 17)")
        bad = [c for c, t in v.items() if not t > 0]
        if bad:
            raise ValueError(f"{', '.join(bad)}: tau_u must be positive")
        return v


def normalise_label(label: str) -> str:
    """Case, hyphens, underscores and repeated spaces do not distinguish labels."""
    return re.sub(r"\s+", " ", re.sub(r"[-_]", " ", label.strip().lower())).strip()


class CategoryTable:
    """The loaded tables: look-ups by name or alias, S_y and tau_u."""

    def __init__(self, spec: CategoryFile, source: str = "categories.yaml"):
        self.spec = spec
        self.source = source
        self.version = spec.version
        self._categories: dict[str, Category] = {}
        self._lookup: dict[str, str] = {}
        for name, cat in spec.categories.items():
            self._categories[name] = cat.model_copy(update={"name": name})
            for key in (name, *cat.aliases):
                norm = normalise_label(key)
                if norm in self._lookup and self._lookup[norm] != name:
                    raise CategoryTableError(
                        f"{source}: categories.{name}.aliases: {key!r} already names {self._lookup[norm]!r}")
                self._lookup[norm] = name
        if NEUTRAL_CATEGORY not in self._categories:
            raise CategoryTableError(f"{source}: categories: needs a {NEUTRAL_CATEGORY!r} table (the background of "
                                     "instruction-only plans)")

    @property
    def known(self) -> list[str]:
        """The category names, in table order."""
        return list(self._categories)

    @property
    def au_thresholds(self) -> dict[str, float]:
        """tau_u per channel (control units; degrees for head angles)."""
        return dict(self.spec.au_thresholds)

    @property
    def reference_rest(self) -> dict[str, float]:
        """The AU/gaze rest levels the targets were calibrated against (empty when not given)."""
        return dict(self.spec.reference_rest or {})

    @property
    def neutral(self) -> Category:
        return self._categories[NEUTRAL_CATEGORY]

    def canonical(self, label: str) -> str | None:
        """The canonical name of a label or alias, or None."""
        return self._lookup.get(normalise_label(label))


    def thresholds_vector(self) -> np.ndarray:
        """tau_u as a (17,) array in channel order (for the metrics)."""
        return np.array([self.spec.au_thresholds[c] for c in CONTROL_CHANNELS], dtype=np.float64)

    def characteristic_targets(self, category: Category | str) -> dict[str, Target]:
        """One query that stands for the whole category (Table 3's "retrieval by label only"): the
        main stage's targets, plus each S_y channel the main stage leaves out, from the first stage
        that targets it."""
        cat = self.get(category) if isinstance(category, str) else category
        targets = dict(cat.main_stage.targets)
        for name in cat.target_aus:
            if name not in targets:
                for stage in cat.stages:
                    if name in stage.targets:
                        targets[name] = stage.targets[name]
                        break
        return {c: targets[c] for c in CONTROL_CHANNELS if c in targets}

    def direct_trajectory(self, category: Category | str, n_frames: int, fps: int = CLIP_FPS,
                          rest: np.ndarray | None = None, ramp_s: float | None = None) -> np.ndarray:
        """``direct_trajectory`` of a category given by object or label."""
        cat = self.get(category) if isinstance(category, str) else category
        return direct_trajectory(cat, n_frames, fps, rest=rest, ramp_s=ramp_s)

    def __contains__(self, label: object) -> bool:
        return isinstance(label, str) and self.canonical(label) is not None

    def get(self, label: str) -> Category:
        name = self.canonical(label)
        if name is None:
            raise UnknownCategoryError(f"unknown category {label!r}; known: {', '.join(self.known)}")
        return self._categories[name]

    def target_aus(self, label: str) -> list[str]:
        """S_y of a category (the channels that characterise it)."""
        return list(self.get(label).target_aus)

    def allows(self, label: str, exception: str) -> bool:
        if exception not in ALLOW_EXCEPTIONS:
            raise ValueError(f"unknown exception {exception!r}; valid: {', '.join(ALLOW_EXCEPTIONS)}")
        return exception in self.get(label).allow


def format_validation_error(err: ValidationError) -> str:
    """The first pydantic error as 'a.b.c: message' (one line)."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{loc}: {msg}{more}"


def read_yaml_model(path: Path, model: type[ModelT], error: type[ValueError], what: str) -> ModelT:
    """A YAML data file validated by a pydantic model; every problem is one line of ``error``."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{what} {path} do not exist") from None
    except yaml.YAMLError as err:
        raise error(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise error(f"{path}: {format_validation_error(err)}") from None


def load_categories(path: str | Path) -> CategoryTable:
    """Read and validate categories.yaml; errors name the category and key, in one line."""
    path = Path(path)
    spec = read_yaml_model(path, CategoryFile, CategoryTableError, "category tables (compile.categories)")
    return CategoryTable(spec, source=str(path))


# --------------------------------------------------------------------------------------------
# Frame allocation (shared with the planner) and the direct label -> controls baseline
# --------------------------------------------------------------------------------------------
def allocate_frames(weights: np.ndarray | list[float], total: int, minimum: list[int] | None = None) -> list[int]:
    """Split ``total`` frames in proportion to ``weights``, each part at least its minimum, summing
    exactly to ``total`` (largest remainders). The minimums must fit: sum(minimum) <= total."""
    w = np.asarray(weights, dtype=float)
    n = len(w)
    mins = np.asarray(minimum if minimum is not None else [0] * n, dtype=int)
    if n == 0:
        return []
    if mins.sum() > total:
        raise ValueError(f"cannot fit minimums {mins.tolist()} into {total} frames")
    w = np.where(w > 0, w, 0.0)
    if w.sum() <= 0:
        w = np.ones(n)
    # give each part its minimum, share the rest by weight among the parts the minimum does not bind
    alloc = mins.astype(float)
    free = np.ones(n, bool)
    for _ in range(n + 1):
        rest = total - alloc[~free].sum()
        ideal = np.where(free, rest * w / max(w[free].sum(), 1e-12), alloc)
        binding = free & (ideal < mins)
        if not binding.any():
            alloc = np.where(free, ideal, alloc)
            break
        alloc[binding] = mins[binding]
        free &= ~binding
    base = np.maximum(np.floor(alloc + 1e-9).astype(int), mins)
    diff = total - int(base.sum())
    order = np.argsort(-(alloc - np.floor(alloc + 1e-9)), kind="stable")
    k = 0
    while diff > 0:
        base[order[k % n]] += 1
        diff -= 1
        k += 1
    while diff < 0:
        surplus = base - mins
        j = int(np.argmax(surplus))
        base[j] -= 1
        diff += 1
    return base.tolist()


def target_midpoint(target: Target) -> float:
    lo, hi = interval(target)
    return 0.5 * (lo + hi)


def stage_spans(category: Category, n_frames: int) -> list[tuple[int, int, Stage]]:
    """The stages at their mean shares as frame spans tiling [0, n_frames); stages that cannot get a
    frame are dropped (the main stage alone when n_frames is below the number of stages)."""
    stages = category.stages if n_frames >= len(category.stages) else [category.main_stage]
    frames = allocate_frames([s.mid_share for s in stages], n_frames, [1] * len(stages))
    spans, edge = [], 0
    for stage, n in zip(stages, frames, strict=True):
        spans.append((edge, edge + n, stage))
        edge += n
    return spans


def direct_trajectory(category: Category, n_frames: int, fps: int = CLIP_FPS, rest: np.ndarray | None = None,
                      ramp_s: float | None = None) -> np.ndarray:
    """The "direct label -> controls" baseline of the paper's Table 3: (n_frames, 17) controls.

    Each stage (at its mean share) holds the midpoints of its target ranges on a plateau; between
    stages the channels ramp linearly over ``ramp_s`` (default ``compile.transition_s``), and the
    clip ramps in from the rest state at frame 0. Channels a stage does not target sit at ``rest``
    (AU and gaze channels; default zeros) or at 0 for head angles, which are relative to the
    reference pose. No retrieval and no blinks: it is what the table alone says.
    """
    if n_frames < 1:
        raise ValueError(f"n_frames must be >= 1, got {n_frames}")
    if ramp_s is None:
        ramp_s = CompileConfig().transition_s
    base = np.zeros(N_CHANNELS) if rest is None else np.asarray(rest, dtype=float).copy()
    if base.shape != (N_CHANNELS,):
        raise ValueError(f"rest must have {N_CHANNELS} values, got shape {base.shape}")
    for name in HEAD_CHANNELS:
        base[CHANNEL_INDEX[name]] = 0.0
    spans = stage_spans(category, n_frames)
    ramp = max(1, int(round(ramp_s * fps)))
    xs: list[float] = []
    ys: list[np.ndarray] = []
    for k, (s, e, stage) in enumerate(spans):
        value = base.copy()
        for name, target in stage.targets.items():
            value[CHANNEL_INDEX[name]] = target_midpoint(target)
        room = (e - 1 - s) // 2  # plateau keeps the stage's middle frame
        h_in = min(ramp if k == 0 else ramp // 2, room)
        h_out = 0 if k == len(spans) - 1 else min(ramp - ramp // 2, room)
        if k == 0 and h_in > 0:
            xs.append(0.0)
            ys.append(base)
        xs.extend([float(s + h_in), float(e - 1 - h_out)])
        ys.extend([value, value])
    x = np.asarray(xs)
    y = np.stack(ys)
    keep = np.concatenate([[True], np.diff(x) > 0])  # a one-frame plateau lists its frame twice
    x, y = x[keep], y[keep]
    t = np.arange(n_frames, dtype=float)
    return np.stack([np.interp(t, x, y[:, c]) for c in range(N_CHANNELS)], axis=1)


__all__ = ["ALLOW_EXCEPTIONS", "BlinkSpec", "Category", "CategoryTable", "CategoryTableError", "NEUTRAL_CATEGORY",
           "Stage", "StageAction", "UnknownCategoryError", "allocate_frames", "direct_trajectory", "load_categories",
           "normalise_label", "stage_spans", "target_midpoint"]
