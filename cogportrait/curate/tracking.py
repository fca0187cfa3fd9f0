"""Face tracking on sampled frames with MediaPipe's full-range face detector.

Each sampled frame of the scan's decode pass (``scan.py``) is classified (ok / no_face /
multi_face / small_face) and, where the dominant face is found, measured for the quality and
motion filters (sharpness, brightness, a small thumbnail), so later steps never decode for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from cogportrait.face.model_files import face_detector_path

THUMB = 32
SHARPNESS_SIDE = 128


@dataclass
class FaceSample:
    frame: int
    label: str  # ok / no_face / multi_face / small_face
    box: tuple[float, float, float, float] = (np.nan, np.nan, np.nan, np.nan)  # x0, y0, x1, y1 px
    score: float = np.nan
    sharpness: float = np.nan
    brightness: float = np.nan
    thumb: np.ndarray | None = field(default=None, repr=False)


def classify_detections(
    boxes: list[tuple[float, float, float, float, float]], min_face_px: float, multi_ratio: float
) -> tuple[str, int]:
    """Label one frame's detections; returns (label, index of the dominant face or -1)."""
    if not boxes:
        return "no_face", -1
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
    order = np.argsort(areas)[::-1]
    main = int(order[0])
    if len(boxes) > 1 and areas[int(order[1])] >= multi_ratio * areas[main]:
        return "multi_face", main
    x0, y0, x1, y1, _ = boxes[main]
    if max(x1 - x0, y1 - y0) < min_face_px:
        return "small_face", main
    return "ok", main


def face_region_stats(rgb: np.ndarray, box: tuple[float, float, float, float]) -> tuple[float, float, np.ndarray]:
    """Sharpness (variance of the Laplacian at a fixed size), mean luma and a 32² thumbnail."""
    h, w = rgb.shape[:2]
    x0, y0 = max(0, int(box[0])), max(0, int(box[1]))
    x1, y1 = min(w, int(np.ceil(box[2]))), min(h, int(np.ceil(box[3])))
    if x1 - x0 < 4 or y1 - y0 < 4:
        return np.nan, np.nan, np.zeros((THUMB, THUMB), np.float32)
    grey = cv2.cvtColor(rgb[y0:y1, x0:x1], cv2.COLOR_RGB2GRAY)
    norm = cv2.resize(grey, (SHARPNESS_SIDE, SHARPNESS_SIDE), interpolation=cv2.INTER_AREA)
    sharpness = float(cv2.Laplacian(norm, cv2.CV_32F).var())
    brightness = float(grey.mean())
    thumb = cv2.resize(grey, (THUMB, THUMB), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    return sharpness, brightness, thumb


class FaceTracker:
    """Holds one MediaPipe FaceDetector (IMAGE mode: samples are sparse, not a video stream)."""

    def __init__(self, min_confidence: float, min_face_px: float, multi_ratio: float) -> None:
        # mediapipe (0.5 s, matplotlib with it) is imported here: of the curate job's processes,
        # only the scan actor, which holds the detector, pays for it
        import mediapipe as mp
        from mediapipe.tasks.python import BaseOptions, vision

        self._mp = mp
        options = vision.FaceDetectorOptions(
            base_options=BaseOptions(model_asset_path=str(face_detector_path())),
            running_mode=vision.RunningMode.IMAGE,
            min_detection_confidence=min_confidence,
        )
        self._detector = vision.FaceDetector.create_from_options(options)
        self.min_face_px = min_face_px
        self.multi_ratio = multi_ratio

    def detect(self, rgb: np.ndarray) -> list[tuple[float, float, float, float, float]]:
        mp = self._mp
        result = self._detector.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(rgb)))
        boxes = []
        for det in result.detections:
            bb = det.bounding_box
            score = det.categories[0].score if det.categories else 0.0
            boxes.append((float(bb.origin_x), float(bb.origin_y), float(bb.origin_x + bb.width), float(bb.origin_y + bb.height), float(score)))
        return boxes

    def sample(self, frame_index: int, rgb: np.ndarray) -> FaceSample:
        """Classify one sampled frame and, where the dominant face is found, measure what the
        quality and motion filters need, so later steps never decode for them."""
        boxes = self.detect(rgb)
        label, main = classify_detections(boxes, self.min_face_px, self.multi_ratio)
        sample = FaceSample(frame=frame_index, label=label)
        if main >= 0:
            sample.box = boxes[main][:4]
            sample.score = boxes[main][4]
            sample.sharpness, sample.brightness, sample.thumb = face_region_stats(rgb, sample.box)
        return sample

    def close(self) -> None:
        self._detector.close()


def motion_scores(samples: list[FaceSample], frame_period_s: float) -> tuple[float, float]:
    """(median thumbnail change between consecutive samples, 90th-pct box-centre speed in sides/s)."""
    diffs, speeds = [], []
    for a, b in zip(samples[:-1], samples[1:]):
        if a.thumb is None or b.thumb is None:
            continue
        dt = max(1e-6, (b.frame - a.frame) * frame_period_s)
        diffs.append(float(np.abs(a.thumb - b.thumb).mean()))
        ca = np.array([(a.box[0] + a.box[2]) / 2, (a.box[1] + a.box[3]) / 2])
        cb = np.array([(b.box[0] + b.box[2]) / 2, (b.box[1] + b.box[3]) / 2])
        side = max(1.0, (a.box[2] - a.box[0] + b.box[2] - b.box[0]) / 2)
        speeds.append(float(np.linalg.norm(cb - ca) / side / dt))
    if not diffs:
        return np.nan, np.nan
    return float(np.median(diffs)), float(np.percentile(speeds, 90))
