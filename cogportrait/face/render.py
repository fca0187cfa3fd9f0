"""Draw the 62 eye-region keypoints: Stage 1's preview on an image, and Stage 2's pose video.

Keypoints are DESIGN.md's: x, y in [0, 1] of the image (x right, y down), groups in
``schema.KEYPOINT_GROUPS`` order. Each eye contour is a closed loop (its 16 points run round the lid
margin), each brow the closed outline of its lower edge (5 points, outer to inner) and its upper
edge (5 points, outer to inner, drawn back), each iris a circle through its 4 rim points round its
centre, plus a dot at the centre. The subject's left and right get different colours so a mirrored
or swapped sequence shows at a glance. The pose video (``render_pose_video``), the video model's
conditioning, draws the same shapes on black with one fixed colour per group instead. Both go
through one drawing routine (``_draw_group``). Lines are anti-aliased at sub-pixel precision.
"""

from __future__ import annotations

import numpy as np

from cogportrait.schema import KEYPOINT_GROUPS, N_KEYPOINTS, keypoint_slice

Colour = tuple[int, int, int]
LEFT_COLOUR: Colour = (70, 200, 255)  # RGB; the subject's left (image right for a non-mirrored view)
RIGHT_COLOUR: Colour = (255, 120, 60)
CANVAS_COLOUR: Colour = (28, 28, 32)
_SHIFT = 4  # OpenCV fixed-point bits: coordinates are drawn to 1/16 pixel
_ONE = 1 << _SHIFT


class RenderInputError(ValueError):
    """An image or keypoint array of the wrong shape or type."""


def blank_canvas(size: int | tuple[int, int], colour: Colour = CANVAS_COLOUR) -> np.ndarray:
    """A uniform RGB uint8 image, ``size`` x ``size`` or (width, height): the preview without a portrait."""
    w, h = (size, size) if isinstance(size, int) else size
    if w <= 0 or h <= 0:
        raise RenderInputError(f"canvas size must be positive, got {size}")
    return np.full((h, w, 3), colour, dtype=np.uint8)


def default_thickness(image_shape: tuple[int, ...]) -> int:
    """Line width that reads at any size: 1 px up to ~450 px, 2 px at 512-750, and so on."""
    return max(1, int(round(min(image_shape[:2]) / 300)))


def _fixed(points: np.ndarray, width: int, height: int) -> np.ndarray:
    """[0, 1] image coordinates -> OpenCV fixed-point pixel coordinates (int32, N x 2)."""
    return np.round(points * np.array([width, height]) * _ONE).astype(np.int32)


def _check_keypoints(keypoints: np.ndarray) -> np.ndarray:
    """One frame's keypoints as float64 (62 x 2|3), or ``RenderInputError``."""
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.ndim != 2 or kp.shape[0] != N_KEYPOINTS or kp.shape[1] not in (2, 3):
        raise RenderInputError(f"keypoints must be ({N_KEYPOINTS}, 2|3), got {kp.shape}")
    return kp


def _draw_group(image: np.ndarray, group: str, points: np.ndarray, colour: Colour, thickness: int) -> None:
    """Draw one keypoint group (its x, y in [0, 1]) on ``image`` in place: the one drawing routine
    of the preview and the pose video. The group's kind is its name's suffix (eye, brow, iris); a
    group with a non-finite point (a frame without a face) is left out rather than drawn to a corner.
    """
    import cv2

    if not np.isfinite(points).all():
        return
    h, w = image.shape[:2]
    colour = tuple(int(c) for c in colour)
    aa = cv2.LINE_AA
    kind = group.rsplit("_", 1)[-1]
    if kind == "eye":
        cv2.polylines(image, [_fixed(points, w, h)], True, colour, thickness, aa, _SHIFT)
    elif kind == "brow":
        outline = np.concatenate([points[:5], points[5:][::-1]])
        cv2.polylines(image, [_fixed(outline, w, h)], True, colour, thickness, aa, _SHIFT)
    elif kind == "iris":
        cx, cy = (int(v) for v in _fixed(points[:1], w, h)[0])
        rim = (points[1:] - points[0]) * np.array([w, h])
        radius = int(round(float(np.linalg.norm(rim, axis=1).mean()) * _ONE))
        cv2.circle(image, (cx, cy), max(radius, _ONE), colour, thickness, aa, _SHIFT)
        cv2.circle(image, (cx, cy), max(thickness, 1) * _ONE, colour, -1, aa, _SHIFT)
    else:
        raise KeyError(f"no drawing for keypoint group {group!r}")


def _draw_groups(image: np.ndarray, keypoints: np.ndarray, colours: dict[str, Colour], thickness: int) -> None:
    """Draw the groups named in ``colours``, in its order (later groups on top), in place."""
    for group, colour in colours.items():
        _draw_group(image, group, keypoints[keypoint_slice(group), :2], colour, thickness)


def draw_keypoints(
    image: np.ndarray,
    keypoints: np.ndarray,
    left_colour: Colour = LEFT_COLOUR,
    right_colour: Colour = RIGHT_COLOUR,
    thickness: int | None = None,
) -> np.ndarray:
    """Return a copy of ``image`` (H x W x 3 uint8, RGB) with one frame's keypoints (62 x 2|3) drawn.

    A group with a non-finite point (a frame without a face) is left out rather than drawn to a
    corner; z, when present, is ignored.
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise RenderInputError(f"image must be H x W x 3 uint8, got {img.shape} {img.dtype}")
    kp = _check_keypoints(keypoints)
    out = np.ascontiguousarray(img.copy())
    t = default_thickness(out.shape) if thickness is None else int(thickness)
    colours = {
        f"{side}_{kind}": colour
        for side, colour in (("left", left_colour), ("right", right_colour))
        for kind in ("eye", "brow", "iris")
    }
    _draw_groups(out, kp, colours, t)
    return out


# --------------------------------------------------------------------------------------------
# Stage 2's pose video: the conditioning signal, not a preview
# --------------------------------------------------------------------------------------------
# One fixed, saturated colour per group on black, so the video model can tell eye from brow from
# iris and left from right by hue alone (the preview's two side colours cannot). Fixed for good:
# a trained model depends on them. Six hues 60° apart, each eye between its brow and its iris:
# an anti-aliased overlap blends two colours to a hue between theirs, and with neighbours that hue
# is no group's (with pure primaries a green lid under a blue iris would blend to a cyan brow).
# Keys in drawing order: irises last, on top of the lids.
POSE_GROUP_COLOURS: dict[str, Colour] = {
    "left_eye": (255, 0, 0),  # hue 0°: between the left brow (60°) and the left iris (300°)
    "right_eye": (0, 255, 255),  # 180°: between the right brow (120°) and the right iris (240°)
    "left_brow": (255, 255, 0),
    "right_brow": (0, 255, 0),
    "left_iris": (255, 0, 255),
    "right_iris": (0, 0, 255),
}
POSE_CANVAS_COLOUR: Colour = (0, 0, 0)
assert set(POSE_GROUP_COLOURS) == set(KEYPOINT_GROUPS)


def render_pose_frame(
    keypoints: np.ndarray, size: int | tuple[int, int], thickness: int | None = None
) -> np.ndarray:
    """One frame of the pose video: ``keypoints`` (62 x 2|3, x, y in [0, 1]) drawn in
    ``POSE_GROUP_COLOURS`` on black, ``size`` x ``size`` or (width, height); H x W x 3 uint8 RGB.

    Groups with a non-finite point are left out (a frame without a face is all black); z is ignored.
    """
    kp = _check_keypoints(keypoints)
    out = blank_canvas(size, POSE_CANVAS_COLOUR)
    t = default_thickness(out.shape) if thickness is None else int(thickness)
    _draw_groups(out, kp, POSE_GROUP_COLOURS, t)
    return out


def render_pose_video(
    keypoints: np.ndarray, size: int | tuple[int, int], thickness: int | None = None
) -> np.ndarray:
    """Stage 2's pose video: ``render_pose_frame`` of every frame of ``keypoints`` (T x 62 x 2|3),
    as one T x H x W x 3 uint8 array (drawn in place, frame by frame, into one allocation)."""
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.ndim != 3 or kp.shape[1] != N_KEYPOINTS or kp.shape[2] not in (2, 3):
        raise RenderInputError(f"keypoints must be (T, {N_KEYPOINTS}, 2|3), got {kp.shape}")
    first = blank_canvas(size, POSE_CANVAS_COLOUR)
    video = np.empty((kp.shape[0],) + first.shape, dtype=np.uint8)
    video[:] = first
    t = default_thickness(first.shape) if thickness is None else int(thickness)
    for frame, frame_keypoints in zip(video, kp):
        _draw_groups(frame, frame_keypoints, POSE_GROUP_COLOURS, t)
    return video
