"""The face crop: a square 1.5x face box, smoothed over time, kept inside the frame, at 512²/25 fps."""

from __future__ import annotations

import os

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter1d

from cogportrait.io.video import VideoError, VideoInfo, VideoWriter, Yuv420, iter_frames


def crop_track(
    sample_times: np.ndarray,
    sample_boxes: np.ndarray,
    out_times: np.ndarray,
    frame_w: int,
    frame_h: int,
    scale: float,
    smooth_s: float,
    out_fps: float,
) -> np.ndarray:
    """Per output frame (cx, cy, side) in source pixels.

    Face boxes found at sampled times are interpolated to every output time, smoothed with a
    Gaussian of ``smooth_s`` seconds, enlarged to a square ``scale`` times the face side, then
    shrunk to fit and shifted inside the frame (never padded).
    """
    if len(sample_times) == 0:
        raise ValueError("crop_track needs at least one face box")
    centres_x = (sample_boxes[:, 0] + sample_boxes[:, 2]) / 2
    centres_y = (sample_boxes[:, 1] + sample_boxes[:, 3]) / 2
    sides = np.maximum(sample_boxes[:, 2] - sample_boxes[:, 0], sample_boxes[:, 3] - sample_boxes[:, 1])
    cx = np.interp(out_times, sample_times, centres_x)
    cy = np.interp(out_times, sample_times, centres_y)
    side = np.interp(out_times, sample_times, sides) * scale
    sigma = smooth_s * out_fps
    if sigma > 0 and len(out_times) > 1:
        cx, cy, side = (gaussian_filter1d(v, sigma, mode="nearest") for v in (cx, cy, side))
    side = np.minimum(side, min(frame_w, frame_h))
    cx = np.clip(cx, side / 2, frame_w - side / 2)
    cy = np.clip(cy, side / 2, frame_h - side / 2)
    return np.stack([cx, cy, side], axis=1).astype(np.float32)


def crop_plane(plane: np.ndarray, cx: float, cy: float, side: float, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """Sub-pixel square crop of one image (or plane) resized to size², into ``out`` when given;
    strong downscales are pre-shrunk by halves (area filter) so the bilinear warp does not alias."""
    scale = size / side
    while scale < 0.75:
        plane = cv2.resize(plane, (plane.shape[1] // 2, plane.shape[0] // 2), interpolation=cv2.INTER_AREA)
        cx, cy, side = cx / 2, cy / 2, side / 2
        scale = size / side
    x0, y0 = cx - side / 2, cy - side / 2
    matrix = np.array([[scale, 0, -scale * x0], [0, scale, -scale * y0]], dtype=np.float64)
    return cv2.warpAffine(plane, matrix, (size, size), dst=out, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def crop_frame(rgb: np.ndarray, cx: float, cy: float, side: float, size: int) -> np.ndarray:
    return crop_plane(rgb, cx, cy, side, size)


def crop_frame_yuv420(src: Yuv420, cx: float, cy: float, side: float, out: Yuv420) -> None:
    """The same crop on planar YUV 4:2:0 (as decoded), painted into ``out``'s planes (size² luma),
    so no colour conversion and no copy is ever done. Coordinates are in luma pixels; the chroma
    planes use half of them."""
    size = out[0].shape[0]
    crop_plane(src[0], cx, cy, side, size, out[0])
    for plane, dst in zip(src[1:], out[1:]):
        crop_plane(plane, cx / 2 - 0.25, cy / 2 - 0.25, side / 2, size // 2, dst)


def write_cropped_clip(
    path: str | os.PathLike,
    info: VideoInfo,
    start: int,
    end: int,
    times: np.ndarray,
    out_times: np.ndarray,
    track: np.ndarray,
    out_path: str | os.PathLike,
    size: int,
    fps: int,
    preset: str,
    crf: int,
) -> int:
    """Resample [start, end) to ``out_times`` (nearest earlier source frame) and encode the crop.

    ``times`` are the source frames' timestamps for [start, end). Returns frames written.
    """
    n_out = len(out_times)
    # for each output time, the source frame shown at that moment (sample and hold)
    src_for_out = start + np.clip(np.searchsorted(times, out_times + 1e-6, side="right") - 1, 0, len(times) - 1)
    planar = info.width % 2 == 0 and info.height % 2 == 0  # as displayed (iter_frames rotates)
    fmt = "yuv420p" if planar else "rgb24"
    written = 0
    with VideoWriter(out_path, fps=fps, size=size, preset=preset, crf=crf) as writer:
        for idx, img in iter_frames(path, info, start, end, times=times, fmt=fmt):
            while written < n_out and src_for_out[written] <= idx:
                cx, cy, side = (float(v) for v in track[written])
                if planar:
                    writer.write_yuv420(lambda out: crop_frame_yuv420(img, cx, cy, side, out))
                else:
                    writer.write(crop_frame(img, cx, cy, side, size))
                written += 1
            if written >= n_out:
                break
        if written < n_out:
            raise VideoError("decode_error", f"{os.path.basename(str(path))}: source ended after {written}/{n_out} clip frames")
    return written
