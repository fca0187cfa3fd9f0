"""Draw the 62 eye-region keypoints on an image: the preview of Stage 1 and of Stage 2's pose videos.

Keypoints are DESIGN.md's: x, y in [0, 1] of the image (x right, y down), groups in
``schema.KEYPOINT_GROUPS`` order. Each eye contour is a closed loop (its 16 points run round the lid
margin), each brow the closed outline of its lower edge (5 points, outer to inner) and its upper
edge (5 points, outer to inner, drawn back), each iris a circle through its 4 rim points round its
centre, plus a dot at the centre. The subject's left and right get different colours so a mirrored
or swapped sequence shows at a glance. Lines are anti-aliased at sub-pixel precision.
"""

from __future__ import annotations

import numpy as np

from cogportrait.schema import N_KEYPOINTS, keypoint_slice

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
    import cv2

    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise RenderInputError(f"image must be H x W x 3 uint8, got {img.shape} {img.dtype}")
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.ndim != 2 or kp.shape[0] != N_KEYPOINTS or kp.shape[1] not in (2, 3):
        raise RenderInputError(f"keypoints must be ({N_KEYPOINTS}, 2|3), got {kp.shape}")
    out = np.ascontiguousarray(img.copy())
    h, w = out.shape[:2]
    t = default_thickness(out.shape) if thickness is None else int(thickness)
    aa = cv2.LINE_AA
    for side, colour in (("left", left_colour), ("right", right_colour)):
        colour = tuple(int(c) for c in colour)
        eye = kp[keypoint_slice(f"{side}_eye"), :2]
        if np.isfinite(eye).all():
            cv2.polylines(out, [_fixed(eye, w, h)], True, colour, t, aa, _SHIFT)
        brow = kp[keypoint_slice(f"{side}_brow"), :2]
        if np.isfinite(brow).all():
            outline = np.concatenate([brow[:5], brow[5:][::-1]])
            cv2.polylines(out, [_fixed(outline, w, h)], True, colour, t, aa, _SHIFT)
        iris = kp[keypoint_slice(f"{side}_iris"), :2]
        if np.isfinite(iris).all():
            centre = _fixed(iris[:1], w, h)[0]
            rim = (iris[1:] - iris[0]) * np.array([w, h])
            radius = int(round(float(np.linalg.norm(rim, axis=1).mean()) * _ONE))
            cv2.circle(out, (int(centre[0]), int(centre[1])), max(radius, _ONE), colour, t, aa, _SHIFT)
            cv2.circle(out, (int(centre[0]), int(centre[1])), max(t, 1) * _ONE, colour, -1, aa, _SHIFT)
    return out
