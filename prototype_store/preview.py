"""A prototype's 62 eye-region keypoints as a small looping GIF: the motion at a glance.

The library stores the keypoints of every frame (``PROTOTYPES_SCHEMA``: T x 62 x 2, x, y in [0, 1]
of the 512² face crop), so the preview draws those, not a re-derivation from the controls. They are
drawn by Stage 1's own preview routine (``cogportrait.face.render.draw_keypoints``: left and right
in different colours), so the report shows the shapes the rest of the project draws.

The eye region is a small part of the face crop, so each preview is zoomed to the square around
every frame's keypoints (one box per prototype, so head motion still shows as motion).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from cogportrait.face.render import blank_canvas, draw_keypoints
from cogportrait.schema import CLIP_FPS, N_KEYPOINTS

PREVIEW_SIZE = 128  # pixels per side
MAX_PREVIEW_FRAMES = 48
_MARGIN = 1.3  # the box is this much larger than the keypoints' extent
_PALETTE_COLOURS = 64


def gif_frame_indices(keypoints: np.ndarray, max_frames: int = MAX_PREVIEW_FRAMES) -> tuple[np.ndarray, int]:
    """The frame indices a preview shows and each one's duration in ms.

    Every ``step``-th frame, the smallest step that keeps at most ``max_frames`` frames, each shown
    ``step`` clip frames long: the GIF plays at the clip's real speed.
    """
    T = len(keypoints)
    step = max(1, math.ceil(T / max_frames))
    return np.arange(0, T, step), int(round(1000 * step / CLIP_FPS))


def zoom_to_keypoints(keypoints: np.ndarray) -> np.ndarray:
    """``keypoints`` (T x 62 x 2 in the crop) mapped to [0, 1] of the square around all frames.

    Frames without keypoints (non-finite, or the all-zero rows of a ``no_keypoints`` prototype)
    become NaN, which the drawing leaves out (a blank frame) instead of drawing to a corner.
    """
    kp = np.asarray(keypoints, dtype=np.float64).copy()
    if kp.ndim != 3 or kp.shape[1:] != (N_KEYPOINTS, 2):
        raise ValueError(f"keypoints must be (T, {N_KEYPOINTS}, 2), got {kp.shape}")
    missing = ~np.isfinite(kp).all(axis=(1, 2)) | (np.abs(np.nan_to_num(kp)).sum(axis=(1, 2)) == 0)
    kp[missing] = np.nan
    if missing.all():
        return kp
    present = kp[~missing].reshape(-1, 2)
    lo, hi = present.min(axis=0), present.max(axis=0)
    side = max(float((hi - lo).max()) * _MARGIN, 1e-3)
    origin = (lo + hi) / 2 - side / 2
    return (kp - origin) / side


def write_keypoint_gif(
    keypoints: np.ndarray, out: str | Path, size: int = PREVIEW_SIZE, max_frames: int = MAX_PREVIEW_FRAMES
) -> dict[str, int]:
    """Write an animated GIF of ``keypoints`` (T x 62 x 2), ``size`` px square, at most ``max_frames``.

    Returns the frames written and their duration (ms). Writes ``out`` directly: the report builds in
    a temporary folder that is renamed into place as a whole.
    """
    from PIL import Image

    if len(keypoints) == 0:
        raise ValueError("no frames to preview")
    zoomed = zoom_to_keypoints(keypoints)
    index, duration = gif_frame_indices(zoomed, max_frames)
    canvas = blank_canvas(size)
    rgb = [draw_keypoints(canvas, zoomed[i]) for i in index]
    # one palette for every frame (a GIF's per-frame palettes made the files ~1.6x larger for the
    # same picture): the frames' colours are a few anti-aliased blends of three
    palette = Image.fromarray(np.concatenate(rgb, axis=0)).quantize(
        colors=_PALETTE_COLOURS, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
    )
    frames = [Image.fromarray(f).quantize(palette=palette, dither=Image.Dither.NONE) for f in rgb]
    frames[0].save(
        out, format="GIF", save_all=True, append_images=frames[1:], duration=duration, loop=0, optimize=False,
    )
    return {"frames": len(frames), "duration_ms": duration}
