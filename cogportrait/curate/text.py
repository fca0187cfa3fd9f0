"""Burnt-in text detection with RapidOCR (PP-OCR detection model only, ONNX on the CPU)."""

from __future__ import annotations

import logging

import cv2
import numpy as np

log = logging.getLogger(__name__)


class TextDetector:
    """RapidOCR's text *detection* (no recognition: ~80 ms per 512 px frame on one core)."""

    def __init__(self, det_side_px: int, threads: int) -> None:
        from rapidocr import RapidOCR

        self.det_side_px = det_side_px
        self._engine = RapidOCR(
            params={
                "Det.limit_side_len": det_side_px,
                "EngineConfig.onnxruntime.intra_op_num_threads": threads,
                "EngineConfig.onnxruntime.inter_op_num_threads": 1,
                "Global.log_level": "error",
            }
        )
        logging.getLogger("RapidOCR").setLevel(logging.ERROR)

    def detect(self, rgb: np.ndarray) -> np.ndarray:
        """Text polygons (N x 4 x 2, frame pixels) found in an RGB frame.

        The frame is shrunk so its long side is at most ``det_side_px`` first: RapidOCR's own
        limit bounds the short side, so a 16:9 frame would otherwise cost three times as much.
        """
        h, w = rgb.shape[:2]
        scale = min(1.0, self.det_side_px / max(h, w))
        small = cv2.resize(rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA) if scale < 1 else rgb
        bgr = np.ascontiguousarray(small[..., ::-1])
        result = self._engine(bgr, use_det=True, use_cls=False, use_rec=False)
        boxes = getattr(result, "boxes", None)
        if boxes is None or len(boxes) == 0:
            return np.zeros((0, 4, 2), np.float32)
        return np.asarray(boxes, dtype=np.float32).reshape(-1, 4, 2) / scale


def encode_frames(frames: dict[int, np.ndarray], quality: int = 95) -> tuple[list[int], list[bytes]]:
    """Frames as (source indices ascending, one JPEG each): two typed row columns, read back with
    ``decode_frames``. JPEG bytes are image data, not a serialised structure."""
    indices, jpegs = [], []
    for idx in sorted(frames):
        ok, jpg = cv2.imencode(".jpg", np.ascontiguousarray(frames[idx][..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise ValueError(f"JPEG encoding of frame {idx} failed")
        indices.append(int(idx))
        jpegs.append(jpg.tobytes())
    return indices, jpegs


def decode_frames(indices: list[int], jpegs: list[bytes]) -> dict[int, np.ndarray]:
    """RGB frames by source index from ``encode_frames``' two lists."""
    if len(indices) != len(jpegs):
        raise ValueError(f"{len(indices)} frame indices for {len(jpegs)} JPEGs")
    return {int(i): cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR)[..., ::-1] for i, j in zip(indices, jpegs)}
