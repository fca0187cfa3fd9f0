"""Clip filters. Each returns (keep, reason) so the job can count drops per reason.

Text rule (documented in the README): RapidOCR *detection* runs on a few frames spread over the
span, on the whole frame (long side <= 512 px). Boxes shorter than ``text_min_box_height`` of
the frame height, or centred inside the face box (facial features read as glyphs), are ignored.
A frame shows text when the remaining boxes cover at least ``text_max_area`` of the frame; the
span is rejected as ``text_overlay`` when at least ``text_min_frames_ratio`` of its sampled
frames show text. Whole frame rather than the crop, because burnt-in subtitles and captions
mark edited footage even where the 1.5x face crop would cut them off.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cogportrait.config import CurateConfig


@dataclass(frozen=True)
class TextFrame:
    area_fraction: float  # share of the frame covered by text boxes that count
    n_boxes: int


def text_area(
    boxes: np.ndarray, frame_w: int, frame_h: int, face_box: tuple[float, float, float, float] | None, min_box_height: float
) -> TextFrame:
    """Area share of detected text boxes (N x 4 x 2 polygons in frame pixels) that count as text."""
    total, count = 0.0, 0
    for poly in np.asarray(boxes, dtype=np.float64).reshape(-1, 4, 2):
        xs, ys = poly[:, 0], poly[:, 1]
        height = ys.max() - ys.min()
        if height < min_box_height * frame_h:
            continue
        cx, cy = xs.mean(), ys.mean()
        if face_box is not None and face_box[0] <= cx <= face_box[2] and face_box[1] <= cy <= face_box[3]:
            continue
        # shoelace area of the quadrilateral
        total += 0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))
        count += 1
    return TextFrame(total / float(frame_w * frame_h), count)


def text_decision(frames: list[TextFrame], cfg: CurateConfig) -> tuple[bool, str, float]:
    """(keep, reason, text_score) where text_score is the mean covered share over sampled frames."""
    if not frames:
        return True, "", 0.0
    score = float(np.mean([f.area_fraction for f in frames]))
    with_text = sum(f.area_fraction >= cfg.text_max_area for f in frames)
    if with_text / len(frames) >= cfg.text_min_frames_ratio:
        return False, "text_overlay", score
    return True, "", score


def quality_decision(sharpness: float, brightness: float, cfg: CurateConfig) -> tuple[bool, str]:
    """Exposure first: a dark face also has little Laplacian energy, and 'underexposed' is the cause."""
    if brightness < cfg.min_brightness:
        return False, "underexposed"
    if brightness > cfg.max_brightness:
        return False, "overexposed"
    if not np.isfinite(sharpness) or sharpness < cfg.min_sharpness:
        return False, "blurry"
    return True, ""


def motion_decision(motion: float, head_speed: float, cfg: CurateConfig) -> tuple[bool, str]:
    if not np.isfinite(motion) or motion < cfg.min_motion:
        return False, "static"
    if head_speed > cfg.max_head_speed:
        return False, "chaotic_motion"
    return True, ""
