"""The mapping layer Π: 17 controls -> 62 keypoints in the 512² crop (paper §3.3, DESIGN.md).

Π is the exact inverse of inversion.py under one face model: AU activations deform the
identity's rest keypoints b along the basis (AU41 as the equivalent bilateral lid lowering),
gaze moves the iris points, yaw/pitch/roll rotate rigidly, and an orthographic projection puts
the face at its place in the crop. Stage 1 calls ``controls_to_keypoints``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cogportrait.face.inversion import AU41, AU45, lid_au45_gain
from cogportrait.face.model import FIT_AU_INDEX, N_DIMS, Baseline, LinearFaceModel, load_baselines, pose_terms
from cogportrait.face.pose import from_pixels, rotation_from_head_pose
from cogportrait.face.proxies import signed_gaze
from cogportrait.schema import CHANNEL_INDEX, CLIP_SIZE, N_CHANNELS, N_KEYPOINTS


@dataclass(frozen=True)
class Placement:
    """Where the face sits in the crop: rigid-anchor centre (px, y up) and inter-ocular distance."""

    centre_px: tuple[float, float, float] = (CLIP_SIZE / 2, -CLIP_SIZE * 0.42, 0.0)
    iod_px: float = CLIP_SIZE * 0.2
    width: int = CLIP_SIZE
    height: int = CLIP_SIZE


def canonical_keypoints(controls: np.ndarray, model: LinearFaceModel, baseline: Baseline) -> np.ndarray:
    """T x 62 x 3 pose-free keypoints (IOD units) for T x 17 controls."""
    c = np.asarray(controls, dtype=np.float64).reshape(-1, N_CHANNELS)
    a = c[:, list(FIT_AU_INDEX)].copy()
    gains = lid_au45_gain(model, baseline)
    for e, ch in enumerate(AU45):
        a[:, list(FIT_AU_INDEX).index(ch)] += gains[e] * c[:, AU41]
    da = a - baseline.au[list(FIT_AU_INDEX)]
    g = signed_gaze(c[:, CHANNEL_INDEX["gaze_left"] : CHANNEL_INDEX["gaze_down"] + 1])
    dg = g - baseline.gaze
    model = model.for_identity(baseline)
    d = da @ model.basis_au + dg @ model.basis_gaze + pose_terms(c[:, CHANNEL_INDEX["yaw"] :], baseline) @ model.basis_pose
    return (baseline.keypoints.reshape(1, N_DIMS) + d).reshape(-1, N_KEYPOINTS, 3)


def pose_and_project(canon: np.ndarray, head_pose_deg: np.ndarray, placement: Placement) -> np.ndarray:
    """Rotate canonical keypoints by the head pose and project into the crop ([0, 1], y down)."""
    r = rotation_from_head_pose(np.asarray(head_pose_deg, dtype=np.float64).reshape(-1, 3))
    px = placement.iod_px * np.einsum("tij,tkj->tki", r, canon) + np.asarray(placement.centre_px)[None, None, :]
    return from_pixels(px, placement.width, placement.height)


def controls_to_keypoints(
    controls: np.ndarray, model: LinearFaceModel, baseline: Baseline, placement: Placement = Placement()
) -> np.ndarray:
    """Π: T x 17 controls -> T x 62 x 3 keypoints, x, y in [0, 1] of the crop (z in x's scale)."""
    c = np.asarray(controls, dtype=np.float64).reshape(-1, N_CHANNELS)
    canon = canonical_keypoints(c, model, baseline)
    return pose_and_project(canon, c[:, CHANNEL_INDEX["yaw"] :], placement)


def load_face_model(folder: str | Path) -> tuple[LinearFaceModel, dict[str, Baseline]]:
    """The invert job's ``face_model/`` folder: the basis and every identity's baseline."""
    folder = Path(folder)
    return LinearFaceModel.load(folder), load_baselines(folder / "baselines.npz")


def average_baseline(baselines: dict[str, Baseline], name: str = "average") -> Baseline:
    """A generic identity (mean of the fitted ones) for a reference face the library has not seen."""
    if not baselines:
        raise ValueError("no baseline to average")
    items = list(baselines.values())
    mean = lambda attr: np.mean([getattr(b, attr) for b in items], axis=0)  # noqa: E731
    return Baseline(name, mean("keypoints"), mean("au"), mean("gaze"), mean("lid_above_iris"), mean("iris_radius"),
                    mean("head_pose"), int(sum(b.n_rest_frames for b in items)), mean("nuisance"))
