"""Scoring a generated KTO candidate against its conditions (paper §3.4): is it an undesirable sample?

The Stage 2 checkpoint regenerates a desirable window (kto_mine) from the same reference, audio,
keypoints and prompt; the extract stage's landmarker re-extracts the video, and the candidate is
kept as undesirable when it shows poor control, for the first reason that holds
(``schema.KTO_NEGATIVE_REASONS``, in that order):

* no_face: fewer than ``min_face_ratio`` of the generated frames hold a face (a video with no face
  at all is the commonest failure of an undertrained model);
* eye_lmd: Eye-LMD (``metrics.stage1.eye_lmd``, crop units, not centred: the conditioning keypoints
  are real detections of the same face in the same crop, so placement is part of control) above
  ``max_eye_lmd``;
* criterion: the category's own measure on the generated video is below ``min_criterion_ratio`` of
  the same measure on the real window. Both sides go through one extractor (extract's proxies and
  lid geometry: frames.parquet for the real window, the re-extraction for the video), so the
  ratio compares like with like; inverted controls would need the face model and invert's solve
  per video, and the proxies are what those controls are fitted to. The measures reuse the mining
  rules (``behavior.kto``) and the one blink detector (``behavior.events.eye_closures``):

  - large_head_motion, ``head_angle_ratio``: peak over frames of max(|yaw|/40°, |pitch|/30°,
    |roll|/30°) (``head_hits``; head pose from the landmarker's transform, degrees);
  - asymmetric_brow, ``brow_asymmetry``: peak rest-corrected left-right brow difference where one
    brow is active (``brow_asymmetry``; AU2/AU4 blendshape proxies, rest = the window's median);
  - erratic_gaze, ``gaze_shifts``: zig-zag legs of the horizontal gaze (``gaze_legs``);
  - rapid_blink, ``blink_count``: blinks found by ``eye_closures`` on the lid aperture of the
    pose-normalised keypoints and the AU45 proxies.

  A real window whose measure is 0 (or that cannot be measured) gives the criterion nothing to
  compare: it does not fail.

Otherwise the video follows its conditions and is rejected as ``well_controlled``. Identity
similarity to the reference would need a face-recognition model; none is installed, so
``identity_sim`` is null (``IDENTITY_UNMEASURED`` says why) and never decides.

Frame 0 of a Stage 2 video is the reference slot (the reference's own latent, decoded), not a
controlled frame: every score is taken over frames ``CONTROLLED_FROM`` onwards, on both sides.
Pure numpy; ``pipelines/kto_negatives.py`` runs the generator and the landmarker around it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from cogportrait.behavior.events import eye_closures
from cogportrait.behavior.kto import brow_asymmetry, gaze_legs, head_hits
from cogportrait.config import EventsConfig, KtoConfig, KtoNegativesConfig
from cogportrait.face.extract import list_column
from cogportrait.face.signals import prepare_frames
from cogportrait.metrics.stage1 import eye_lmd
from cogportrait.schema import AU_PROXY_NAMES, CHANNEL_INDEX, GAZE_PROXY_NAMES, HEAD_POSE_NAMES, KTO_CATEGORIES, N_KEYPOINTS, make_id
from cogportrait.timeseries import fill_gaps

CONTROLLED_FROM = 1  # frame 0 of a generated video is the reference slot
WELL_CONTROLLED = "well_controlled"  # the reject reason of a candidate that shows good control
CRITERIA: dict[str, str] = {  # category -> the name of its measure (the `criterion` column)
    "large_head_motion": "head_angle_ratio",
    "asymmetric_brow": "brow_asymmetry",
    "erratic_gaze": "gaze_shifts",
    "rapid_blink": "blink_count",
}
IDENTITY_UNMEASURED = ("no identity backend is installed (no face-recognition model ships with the project), "
                       "so identity_sim is null and never decides")
assert set(CRITERIA) == set(KTO_CATEGORIES)


def sample_seed(seed: int, source_sample_id: str) -> int:
    """The generation seed of one candidate: fixed by the job's seed and the desirable row, so a rerun
    (or another worker) makes the same video, and two windows never share their noise."""
    return int(make_id("kto-negative-seed", seed, source_sample_id)[:8], 16)


def negative_id(source_sample_id: str, checkpoint_sha256: str, seed: int, steps: int) -> str:
    """sample_id of a generated candidate: what decides its video (conditions, weights, noise, steps)."""
    return make_id("kto-negative", source_sample_id, checkpoint_sha256, seed, steps)


@dataclass(frozen=True)
class WindowSignals:
    """One window's face signals as the extract stage measures them, frame-aligned."""

    present: np.ndarray  # (T,) bool
    keypoints: np.ndarray  # (T, 62, 2) x, y in [0, 1] of the frame; NaN without a face
    controls: np.ndarray  # (T, 17) extract's proxies in CONTROL_CHANNELS order (AU41 has none: NaN)
    aperture: np.ndarray  # (T, 2) lid aperture, left and right (pose-normalised keypoints)

    def __len__(self) -> int:
        return len(self.present)

    def after(self, start: int) -> WindowSignals:
        return WindowSignals(self.present[start:], self.keypoints[start:], self.controls[start:], self.aperture[start:])


def window_signals(frames: pa.Table, mirrored: bool, refine: str) -> WindowSignals:
    """FRAMES_SCHEMA rows of one window (any order) -> its signals. ``mirrored`` and ``refine`` as the
    invert stage reads the clip (subject's own left; pose refinement of the canonical keypoints)."""
    table = frames.sort_by("frame")
    t = table.num_rows
    present = np.asarray(table.column("face_present").to_numpy(zero_copy_only=False), dtype=bool)
    keypoints = list_column(table, "keypoints", N_KEYPOINTS * 3).reshape(t, N_KEYPOINTS, 3)[..., :2]
    controls = np.concatenate([list_column(table, "au", len(AU_PROXY_NAMES)), list_column(table, "gaze", len(GAZE_PROXY_NAMES)),
                               list_column(table, "head_pose", len(HEAD_POSE_NAMES))], axis=1).astype(np.float64)
    lid = prepare_frames(table, "", mirrored, refine).lid
    aperture = np.stack([lid["aperture_left"], lid["aperture_right"]], axis=1)
    return WindowSignals(present, keypoints.astype(np.float64), controls, aperture)


def criterion_value(category: str, sig: WindowSignals, kto_cfg: KtoConfig, events_cfg: EventsConfig) -> float | None:
    """The category's measure (``CRITERIA``) on a window; None when no frame holds a face."""
    if category not in CRITERIA:
        raise ValueError(f"unknown KTO category {category!r}; known: {', '.join(KTO_CATEGORIES)}")
    present = np.asarray(sig.present, dtype=bool)
    if not present.any():
        return None
    # gaps bridged linearly (a zero-filled gap would read as a gaze shift or a head jump); AU41 -> 0
    controls = np.nan_to_num(fill_gaps(sig.controls, present))
    if category == "large_head_motion":
        return float(head_hits(controls, kto_cfg)[present].max())
    if category == "asymmetric_brow":
        asym, _ = brow_asymmetry(controls, present, kto_cfg)
        return float(asym[present].max())
    if category == "erratic_gaze":
        return float(len(gaze_legs(controls, kto_cfg)))
    au45 = controls[:, [CHANNEL_INDEX["AU45L"], CHANNEL_INDEX["AU45R"]]]
    return float(sum(e.event_type == "blink" for e in eye_closures(sig.aperture, au45, events_cfg)))


@dataclass(frozen=True)
class CandidateScores:
    """What a generated video is judged on (the negatives table's score columns)."""

    face_ratio: float
    eye_lmd: float | None
    criterion: str
    criterion_value: float | None
    criterion_target: float | None
    identity_sim: float | None = None

    def detail(self) -> str:
        """The scores as one JSON line (the ``detail`` of a well_controlled reject)."""
        return json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}, sort_keys=True)


def score_candidate(generated: WindowSignals, conditioning: np.ndarray, target: WindowSignals | None, category: str,
                    kto_cfg: KtoConfig, events_cfg: EventsConfig) -> CandidateScores:
    """Scores of one generated window: its re-extracted signals against the conditioning keypoints
    (T, 62, 2|3) it was made from and, for the criterion, against the real window's signals."""
    cond = np.asarray(conditioning, dtype=np.float64)[..., :2]
    if len(cond) != len(generated):
        raise ValueError(f"{len(generated)} generated frames for {len(cond)} conditioning frames")
    gen = generated.after(CONTROLLED_FROM)
    cond = cond[CONTROLLED_FROM:]
    face_ratio = float(gen.present.mean()) if len(gen) else 0.0
    try:
        lmd: float | None = eye_lmd(gen.keypoints, cond)
    except ValueError:  # no generated frame with a face
        lmd = None
    value = criterion_value(category, gen, kto_cfg, events_cfg)
    real = criterion_value(category, target.after(CONTROLLED_FROM), kto_cfg, events_cfg) if target is not None and len(target) else None
    return CandidateScores(face_ratio=face_ratio, eye_lmd=lmd, criterion=CRITERIA[category], criterion_value=value,
                           criterion_target=real)


def decide(scores: CandidateScores, cfg: KtoNegativesConfig) -> str:
    """Why the candidate is undesirable (a ``KTO_NEGATIVE_REASONS`` key, first that holds), or
    ``WELL_CONTROLLED`` when it follows its conditions."""
    if scores.eye_lmd is None or scores.face_ratio < cfg.min_face_ratio:
        return "no_face"
    if scores.eye_lmd > cfg.max_eye_lmd:
        return "eye_lmd"
    target = scores.criterion_target
    if target is not None and target > 0 and (scores.criterion_value or 0.0) < cfg.min_criterion_ratio * target:
        return "criterion"
    return WELL_CONTROLLED
