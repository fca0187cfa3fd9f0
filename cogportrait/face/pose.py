"""Head pose from the facial transformation matrix, and pose normalisation of keypoints.

Conventions (DESIGN.md): camera frame x right, y up, z toward the viewer. With f = R[:, 2]:
yaw = atan2(f_x, f_z) (+ toward the subject's left), pitch = atan2(f_y, hypot(f_x, f_z)) (+ chin
up), roll = atan2(R[0, 1], R[1, 1]) (+ top of head toward the subject's left shoulder).

Landmarks are normalised image coordinates; the matrix is metric camera space. Pose is removed in
pixel units: (x·W, −y·H, −z·W), centred on rigid anchors, rotated by Rᵀ, scaled by the clip's
median inter-ocular distance (IOD). The metric matrix is never applied to normalised coordinates.
"""

from __future__ import annotations

import numpy as np

from cogportrait.schema import KEYPOINT_GROUPS, KEYPOINT_INDICES, MIRROR_KEYPOINT_GROUP_PAIRS, N_KEYPOINTS, keypoint_slice

# Rigid anchors: nose bridge, forehead midline, temples. Never eyes or brows (they move with AUs).
RIGID_ANCHORS: tuple[int, ...] = (168, 6, 197, 195, 5, 4, 10, 151, 9, 8, 127, 356, 162, 389, 139, 368)
# Points the pose-normalisation step needs from the 478: the 62 keypoints, then the anchors.
NORMALISE_INDICES: tuple[int, ...] = KEYPOINT_INDICES + RIGID_ANCHORS
N_ANCHORS = len(RIGID_ANCHORS)

# Positions inside an eye's 16-point contour (same layout for both eyes; see schema).
EYE_OUTER, EYE_INNER = 0, 8
EYE_LOWER = (3, 4, 5)  # lower-lid points around the midpoint (374 / 145 in the middle)
EYE_UPPER = (13, 12, 11)  # upper-lid points facing EYE_LOWER (386 / 159 in the middle)
EYE_UPPER_MID = 12
EYE_LOWER_MID = 4

_MIRROR_X = np.diag([-1.0, 1.0, 1.0])


def orthonormalise(m: np.ndarray) -> np.ndarray:
    """Nearest rotation to a 3x3 (or ...x3x3) matrix by SVD; the matrix carries scale and noise."""
    u, _, vt = np.linalg.svd(m)
    r = u @ vt
    det = np.linalg.det(r)
    if np.ndim(det) == 0:
        if det < 0:
            u = u.copy()
            u[:, -1] *= -1
            r = u @ vt
        return r
    bad = det < 0
    if np.any(bad):
        u = u.copy()
        u[bad, :, -1] *= -1
        r = u @ vt
    return r


def rotation_from_transform(transform: np.ndarray) -> np.ndarray:
    """R (…x3x3) from flat 16-vectors or 4x4 matrices (row-major), orthonormalised."""
    t = np.asarray(transform, dtype=np.float64).reshape(*np.shape(transform)[:-1], 4, 4) if np.shape(transform)[-1] == 16 else np.asarray(transform, dtype=np.float64)
    return orthonormalise(t[..., :3, :3])


def head_pose_from_rotation(r: np.ndarray) -> np.ndarray:
    """yaw, pitch, roll in degrees (…x3) from rotation matrices (…x3x3)."""
    f = r[..., :, 2]
    yaw = np.arctan2(f[..., 0], f[..., 2])
    pitch = np.arctan2(f[..., 1], np.hypot(f[..., 0], f[..., 2]))
    roll = np.arctan2(r[..., 0, 1], r[..., 1, 1])
    return np.degrees(np.stack([yaw, pitch, roll], axis=-1))


def rotation_from_head_pose(pose_deg: np.ndarray) -> np.ndarray:
    """Exact inverse of head_pose_from_rotation for faces toward the camera (|yaw|, |pitch| < 90°)."""
    pose = np.radians(np.asarray(pose_deg, dtype=np.float64))
    yaw, pitch, roll = pose[..., 0], pose[..., 1], pose[..., 2]
    f = np.stack([np.sin(yaw) * np.cos(pitch), np.sin(pitch), np.cos(yaw) * np.cos(pitch)], axis=-1)
    # up vector u = R[:, 1]: u_x / u_y = tan(roll) and u ⟂ f
    ux, uy = np.sin(roll), np.cos(roll)
    uz = -(ux * f[..., 0] + uy * f[..., 1]) / f[..., 2]
    u = np.stack([ux, uy, uz], axis=-1)
    u /= np.linalg.norm(u, axis=-1, keepdims=True)
    x = np.cross(u, f)
    return np.stack([x, u, f], axis=-1)


def to_pixels(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """Normalised landmarks (…x3, x right, y down, z away) to pixel units with y up, z toward viewer."""
    p = np.asarray(points, dtype=np.float64)
    return np.stack([p[..., 0] * width, -p[..., 1] * height, -p[..., 2] * width], axis=-1)


def from_pixels(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """Inverse of to_pixels."""
    p = np.asarray(points, dtype=np.float64)
    return np.stack([p[..., 0] / width, -p[..., 1] / height, -p[..., 2] / width], axis=-1)


def eye_centres(kp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left and right eye-contour centroids of (…x62x3) keypoints."""
    return kp[..., keypoint_slice("left_eye"), :].mean(axis=-2), kp[..., keypoint_slice("right_eye"), :].mean(axis=-2)


def inter_ocular(kp: np.ndarray) -> np.ndarray:
    """Distance between the eye-contour centroids (IOD), per frame."""
    left, right = eye_centres(kp)
    return np.linalg.norm(left - right, axis=-1)


# Within-group order of each point's mirror twin. The eye and brow contours are listed in mirrored
# order (left outer corner ↔ right outer corner, ...); the iris points are not: MediaPipe numbers
# both irises centre, +x, +y, −x, −y in image terms, so the mirror twin of the left iris's +x
# point (474, lateral) is the right iris's −x point (471, lateral), and 476 pairs with 469.
MIRROR_GROUP_ORDER: dict[str, tuple[int, ...]] = {"left_iris": (0, 3, 2, 1, 4), "right_iris": (0, 3, 2, 1, 4)}


def _mirror_keypoints() -> np.ndarray:
    """The 62-point permutation m with m[j] = the position of keypoint j's mirror twin (an involution)."""
    twin = np.arange(N_KEYPOINTS)
    for a, b in MIRROR_KEYPOINT_GROUP_PAIRS:
        sa, sb = keypoint_slice(a), keypoint_slice(b)
        twin[sa] = sb.start + np.asarray(MIRROR_GROUP_ORDER.get(a, range(sb.stop - sb.start)))
        twin[sb] = sa.start + np.asarray(MIRROR_GROUP_ORDER.get(b, range(sa.stop - sa.start)))
    return twin


MIRROR_KEYPOINTS = _mirror_keypoints()


def mirror_keypoint_groups(kp: np.ndarray) -> np.ndarray:
    """Put every keypoint (…x62xC) in its mirror twin's place: left/right groups swap, each point
    landing on its twin (iris points included), so that after an x reflection "left" is the
    subject's left again and the mirror of a symmetric face is that face. Applying it twice is
    the identity."""
    return np.array(np.asarray(kp)[..., MIRROR_KEYPOINTS, :], copy=True)


def normalise_points(
    points_px: np.ndarray,
    rotation: np.ndarray,
    centre_px: np.ndarray,
    iod_px: float,
    mirrored: bool = False,
) -> np.ndarray:
    """Canonical keypoints (Tx62x3, IOD units): Rᵀ (p − centre) / IOD.

    For mirrored video the x axis is reflected first (R becomes F R F) and the left/right groups
    are swapped, so that "left" is always the subject's left (DESIGN.md).
    """
    p = np.asarray(points_px, dtype=np.float64) - centre_px[..., None, :]
    r = rotation
    if mirrored:
        p = p @ _MIRROR_X
        r = _MIRROR_X @ r @ _MIRROR_X
    canon = np.einsum("tji,tkj->tki", r, p) / iod_px
    return mirror_keypoint_groups(canon) if mirrored else canon


def similarity_align(src: np.ndarray, dst: np.ndarray, scale: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-frame least-squares similarity (Umeyama) taking src (T x K x 3) onto dst (K x 3).

    Returns (rotation T x 3 x 3, scale T, translation T x 3) with dst ≈ s R src + t.
    """
    mu_s = src.mean(axis=1)
    mu_d = dst.mean(axis=0)
    a = src - mu_s[:, None, :]
    b = dst - mu_d
    cov = np.einsum("kj,tki->tji", b, a)  # sum_k b_k a_kᵀ
    u, sv, vt = np.linalg.svd(cov)
    d = np.sign(np.linalg.det(u @ vt))
    fix = np.ones((len(src), 3))
    fix[:, 2] = d
    r = u @ (fix[:, :, None] * vt)
    if scale:
        var = (a**2).sum(axis=(1, 2))
        s = (sv * fix).sum(axis=1) / np.where(var > 0, var, 1.0)
    else:
        s = np.ones(len(src))
    t = mu_d - s[:, None] * np.einsum("tij,tj->ti", r, mu_s)
    return r, s, t


def canonical_clip(
    landmarks_sel: np.ndarray,
    transforms: np.ndarray,
    width: int,
    height: int,
    present: np.ndarray,
    mirrored: bool = False,
    refine: str = "similarity",
) -> tuple[np.ndarray, np.ndarray, float]:
    """Pose-normalise one clip.

    landmarks_sel: T x (62 + anchors) x 3 normalised landmarks at NORMALISE_INDICES.
    Returns (canonical keypoints T x 62 x 3 in IOD units, anchor centres T x 3 in px, median IOD px).
    Rows without a face come back as NaN.
    """
    t = landmarks_sel.shape[0]
    px = to_pixels(landmarks_sel, width, height)
    flat = np.asarray(transforms, dtype=np.float64).reshape(t, 16).copy()
    flat[~present] = np.eye(4).ravel()  # placeholders: SVD of NaN fails; these rows end as NaN
    px[~present] = 0.0
    kp_px, anchors_px = px[:, :62], px[:, 62:]
    centre = anchors_px.mean(axis=1)
    r = rotation_from_transform(flat) if t else np.zeros((0, 3, 3))
    # IOD in the rotated frame (in-plane distance would shrink with yaw)
    rotated = np.einsum("tji,tkj->tki", r, kp_px - centre[:, None, :]) if t else np.zeros((0, 62, 3))
    iods = inter_ocular(rotated)
    iods = iods[present & np.isfinite(iods)]
    iod = float(np.median(iods)) if iods.size else float("nan")
    pts = normalise_points(px, r, centre, iod, mirrored=False) if t else np.zeros((0, px.shape[1], 3))
    if refine != "none" and present.sum() >= 1:
        # Rᵀ leaves a small per-frame misfit between the matrix and the landmarks: align each
        # frame's rigid anchors onto the clip's median anchor shape (rotation, and scale for
        # distance changes), then the eye region moves only by expression.
        anchors = pts[:, 62:]
        template = np.median(anchors[present], axis=0)
        rr, ss, tt = similarity_align(anchors, template, scale=refine == "similarity")
        pts = ss[:, None, None] * np.einsum("tij,tkj->tki", rr, pts) + tt[:, None, :]
    canon = pts[:, :62]
    if mirrored:
        canon = mirror_keypoint_groups(canon * np.array([-1.0, 1.0, 1.0]))
    canon[~present] = np.nan
    return canon, centre, iod


def lid_features(canon: np.ndarray) -> dict[str, np.ndarray]:
    """Geometric eyelid signals per eye from canonical keypoints (y up, IOD units).

    aperture: mean upper–lower lid distance over three point pairs, divided by eye width.
    lid_above_iris: (upper-lid midpoint y − iris-centre y) / iris radius (DESIGN.md's c_t).
    """
    out: dict[str, np.ndarray] = {}
    for side in ("left", "right"):
        eye = canon[..., keypoint_slice(f"{side}_eye"), :]
        iris = canon[..., keypoint_slice(f"{side}_iris"), :]
        width = np.linalg.norm(eye[..., EYE_OUTER, :2] - eye[..., EYE_INNER, :2], axis=-1)
        gap = np.mean([eye[..., u, 1] - eye[..., lo, 1] for u, lo in zip(EYE_UPPER, EYE_LOWER)], axis=0)
        radius = np.linalg.norm(iris[..., 1:, :2] - iris[..., :1, :2], axis=-1).mean(axis=-1)
        out[f"aperture_{side}"] = gap / width
        out[f"lid_above_iris_{side}"] = (eye[..., EYE_UPPER_MID, 1] - iris[..., 0, 1]) / radius
        out[f"iris_radius_{side}"] = radius
    return out


__all__ = [
    "KEYPOINT_GROUPS",
    "MIRROR_KEYPOINTS",
    "NORMALISE_INDICES",
    "RIGID_ANCHORS",
    "canonical_clip",
    "head_pose_from_rotation",
    "inter_ocular",
    "lid_features",
    "mirror_keypoint_groups",
    "normalise_points",
    "orthonormalise",
    "rotation_from_head_pose",
    "rotation_from_transform",
    "to_pixels",
    "from_pixels",
]
