"""MediaPipe Tasks FaceLandmarker in VIDEO mode: one fresh landmarker per clip, always closed.

VIDEO mode tracks across frames and needs strictly increasing timestamps; it has no reset, so a
new clip gets a new landmarker (creating one costs ~30 ms).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from cogportrait.config import ExtractConfig
from cogportrait.face.model_files import face_landmarker_path
from cogportrait.schema import N_BLENDSHAPES, N_LANDMARKS

log = logging.getLogger("cogportrait.face.landmarker")


@dataclass(frozen=True)
class FaceObservation:
    """One frame's FaceLandmarker output as arrays."""

    landmarks: np.ndarray  # 478 x 3, normalised x, y (image, y down) and z
    blendshapes: np.ndarray  # 52, BLENDSHAPE_NAMES order
    transform: np.ndarray  # 4 x 4 facial transformation matrix (metric camera space)


class VideoLandmarker:
    """Context manager around one FaceLandmarker in VIDEO mode (use one per clip)."""

    def __init__(self, cfg: ExtractConfig) -> None:
        # mediapipe is imported here so that importing cogportrait.face stays cheap
        import mediapipe as mp
        from mediapipe.tasks.python import BaseOptions, vision

        self._mp = mp
        options = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=str(face_landmarker_path(cfg.landmarker_model or None))),
            running_mode=vision.RunningMode.VIDEO,
            num_faces=1,
            min_face_detection_confidence=cfg.min_detection_confidence,
            min_face_presence_confidence=cfg.min_presence_confidence,
            min_tracking_confidence=cfg.min_tracking_confidence,
            output_face_blendshapes=True,
            output_facial_transformation_matrixes=True,
        )
        self._landmarker = vision.FaceLandmarker.create_from_options(options)
        self._last_ts = -1

    def detect(self, rgb: np.ndarray, timestamp_ms: int) -> FaceObservation | None:
        """Landmarks for one RGB frame; None when no face is found (the frame is kept upstream)."""
        if timestamp_ms <= self._last_ts:
            raise ValueError(f"timestamps must increase: {timestamp_ms} after {self._last_ts}")
        self._last_ts = timestamp_ms
        image = self._mp.Image(image_format=self._mp.ImageFormat.SRGB, data=np.ascontiguousarray(rgb))
        result = self._landmarker.detect_for_video(image, int(timestamp_ms))
        if not result.face_landmarks:
            return None
        lms = np.array([(p.x, p.y, p.z) for p in result.face_landmarks[0]], dtype=np.float32)
        bs = np.array([c.score for c in result.face_blendshapes[0]], dtype=np.float32)
        mat = np.asarray(result.facial_transformation_matrixes[0], dtype=np.float32).reshape(4, 4)
        if lms.shape != (N_LANDMARKS, 3) or bs.shape != (N_BLENDSHAPES,):
            raise RuntimeError(f"unexpected FaceLandmarker output shapes {lms.shape}, {bs.shape}")
        return FaceObservation(landmarks=lms, blendshapes=bs, transform=mat)

    def close(self) -> None:
        self._landmarker.close()

    def __enter__(self) -> VideoLandmarker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
