"""Scoring generated videos against reference videos (the paper's Table 2 on EMH).

Both videos of a pair go through the same extractor (the extract stage's landmarker, AU proxies,
gaze and head pose: ``behavior.kto_negatives.window_signals``), so every difference is one the
extractor sees in the pictures, and a video scored against itself is perfect. Per pair:

* **AU-F1** (Eq. 6) over the AU channels the extractor measures, **AU-Temp** (Eq. 7) over the
  case's category's S_y, with the functions and conventions of ``metrics.stage1``
  (``score_stage1``). Rest: both videos are the same person (the generated one is animated from
  the reference's portrait), so one rest serves both sides: the reference video's own, per channel
  its 10th percentile over face frames (head angles: the median; they are signed). Measured above
  one shared rest, a copy scores exactly 1 and an offset in level counts as the error it is.
  Channels the extractor cannot measure (AU41 has no proxy) are left out of both metrics and listed
  as ``unmeasured``.
* **Eye-LMD**: the 62 eye-region keypoints, frame-aligned over the shorter of the two videos.
* **ID-Sim**: the cosine similarity of identity embeddings (``metrics.identity``) between frames
  of the generated video (``id_frames``, evenly spread over its face frames) and the reference
  portrait (the reference video's first face frame), averaged.

Metrics whose models are not available are listed in ``skipped`` with the reason (``SKIPPED``,
plus ID-Sim when no identity backend runs), never reported as a number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from cogportrait.behavior.kto_negatives import WindowSignals
from cogportrait.metrics.stage1 import score_stage1
from cogportrait.schema import AU_CHANNELS, CHANNEL_INDEX, CONTROL_CHANNELS, HEAD_CHANNELS, N_CHANNELS

REST_PERCENTILE = 10.0
# Table 2's columns, in its order: (name, higher is better)
TABLE_COLUMNS: tuple[tuple[str, bool], ...] = (
    ("BRISQUE", False), ("DSL-FIQA", True), ("ID-Sim", True), ("Eye-LMD", False), ("AU-F1", True), ("AU-Temp", True),
)
SKIPPED: dict[str, str] = {  # metric -> why it is not computed (no silent zero)
    "BRISQUE": "the one packaged implementation with its model in the wheel (brisque 0.2.0) unpickles its "
               "normalize.pickle on load, and the project never unpickles files",
    "DSL-FIQA": "needs the DSL-FIQA network weights; none ship with the project and none are fetched",
    "FID": "needs Inception-v3 weights; none ship with the project and none are fetched",
    "FVD": "needs I3D weights; none ship with the project and none are fetched",
    "LPIPS": "needs AlexNet/VGG weights; none ship with the project and none are fetched",
    "Sync-C": "needs SyncNet weights; none ship with the project and none are fetched",
}


@dataclass(frozen=True)
class PairScores:
    """One generated video scored against its reference."""

    case_id: str
    category: str
    frames_generated: int
    frames_reference: int
    face_ratio: float  # share of generated frames with a face
    au_f1: float
    au_temp: float
    eye_lmd: float
    id_sim: float | None = None
    eye_lmd_centred: float = float("nan")
    au_temp_channels: dict[str, float] = field(default_factory=dict)
    generated_active: tuple[str, ...] = ()
    reference_active: tuple[str, ...] = ()
    unmeasured: tuple[str, ...] = ()

    def as_dict(self) -> dict:
        out = asdict(self)
        for key in ("generated_active", "reference_active", "unmeasured"):
            out[key] = list(out[key])
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


def clip_rest(controls: np.ndarray) -> np.ndarray:
    """A video's rest as a 17-vector: the 10th percentile of each channel over its finite frames
    (head angles: the median). NaN where a channel has no finite frame."""
    c = np.asarray(controls, dtype=np.float64).reshape(-1, N_CHANNELS)
    rest = np.full(N_CHANNELS, np.nan)
    for j, name in enumerate(CONTROL_CHANNELS):
        col = c[:, j][np.isfinite(c[:, j])]
        if col.size:
            rest[j] = np.median(col) if name in HEAD_CHANNELS else np.percentile(col, REST_PERCENTILE)
    return rest


def score_pair(case_id: str, category: str, generated: WindowSignals, reference: WindowSignals, target_channels: Sequence[str],
               thresholds: dict[str, float], id_sim: float | None = None) -> PairScores:
    """Score one pair of extracted videos; ``thresholds`` holds τ_u of at least every AU channel."""
    if not reference.present.any():
        raise ValueError(f"{case_id}: the reference video shows no face")
    if not generated.present.any():
        raise ValueError(f"{case_id}: the generated video shows no face")
    rest = clip_rest(reference.controls)
    measured = [c for c in CONTROL_CHANNELS if np.isfinite(rest[CHANNEL_INDEX[c]])]
    unmeasured = tuple(c for c in CONTROL_CHANNELS if c not in measured)
    au_set = {c: thresholds[c] for c in AU_CHANNELS if c in measured}
    s_y = [c for c in target_channels if c in measured]
    n = min(len(generated), len(reference))
    filled = np.where(np.isfinite(rest), rest, 0.0)  # unmeasured channels take no part
    scores = score_stage1(generated.controls, reference.controls, generated.keypoints[:n], reference.keypoints[:n], s_y, au_set,
                          rest_pred=filled, rest_ref=filled)
    return PairScores(
        case_id=case_id, category=category, frames_generated=len(generated), frames_reference=len(reference),
        face_ratio=float(generated.present.mean()), au_f1=scores.au_f1, au_temp=scores.au_temp, eye_lmd=scores.eye_lmd,
        id_sim=id_sim, eye_lmd_centred=scores.eye_lmd_centred, au_temp_channels=scores.au_temp_channels,
        generated_active=scores.pred_active, reference_active=scores.ref_active, unmeasured=unmeasured,
    )


def _mean(values: list[float | None]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def summarise(pairs: list[PairScores], id_name: str | None) -> dict:
    """Table 2's numbers per category and overall (a mean over cases; categories in first-seen order).
    ``id_name``: the identity backend's column name (None: ID-Sim is skipped)."""
    def row(group: list[PairScores]) -> dict:
        out = {"cases": len(group), "Eye-LMD": _mean([p.eye_lmd for p in group]), "AU-F1": _mean([p.au_f1 for p in group]),
               "AU-Temp": _mean([p.au_temp for p in group])}
        if id_name is not None:
            out[id_name] = _mean([p.id_sim for p in group])
        return out

    categories: dict[str, list[PairScores]] = {}
    for p in pairs:
        categories.setdefault(p.category, []).append(p)
    return {"per_category": {name: row(group) for name, group in categories.items()}, "overall": row(pairs)}


def markdown_table(summary: dict, id_name: str | None, skipped: dict[str, str]) -> str:
    """The summary shaped like the paper's Table 2 (rows: categories, then overall); a skipped
    metric shows "–" and its reason is given below the table."""
    columns = [(id_name if name == "ID-Sim" and id_name else name, better) for name, better in TABLE_COLUMNS]
    head = "| Category | cases | " + " | ".join(f"{name} {'↑' if better else '↓'}" for name, better in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 2)]

    def cell(values: dict, name: str) -> str:
        v = values.get(name)
        return "–" if v is None else (f"{v:.4f}")

    for label, values in [*summary["per_category"].items(), ("**Overall**", summary["overall"])]:
        lines.append(f"| {label} | {values['cases']} | " + " | ".join(cell(values, name) for name, _ in columns) + " |")
    notes = [f"- {name}: skipped ({why})" for name, why in skipped.items()]
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"
