"""Burnt-in text detection with RapidOCR (PP-OCR detection model only, ONNX on the CPU).

Captions and tickers sit in bands at the top and bottom of the frame, so only those bands are
scanned: both are cut from the frame, scaled so the frame would be ``det_side_px`` tall, and
stacked into one image (top band, a blank gap, bottom band) so each sampled frame costs one
detector call on about half a frame's pixels. The stack is sized to multiples of 32 here and
RapidOCR is told to take it as it is: its own resize (``Det.limit_type: min``) would scale the
*short* side of a short, wide stack up to ``limit_side_len`` and multiply the cost.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

log = logging.getLogger(__name__)

BANDS = ("top", "bottom")
STACK_GAP_PX = 16  # blank rows between the bands: the detector never joins text across them
STACK_MULTIPLE = 32  # the detection network's stride: image sides must be multiples of it
PAD_GREY = 128


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class BandLayout:
    """Where the top and bottom bands of a frame sit in the detector's stacked image.

    Rows of the stack: ``[0, top_rows)`` top band, then ``STACK_GAP_PX`` blank rows, then
    ``bottom_rows`` rows of bottom band, then padding. The frame at detection scale is
    ``det_w`` x ``det_h`` (``scale`` stack px per source px); its bottom band starts at row
    ``det_h - bottom_rows``.
    """

    frame_w: int
    frame_h: int
    scale: float
    det_w: int
    det_h: int
    top_rows: int
    bottom_rows: int
    stack_w: int
    stack_h: int

    @property
    def bottom_offset(self) -> int:
        """First stack row of the bottom band."""
        return self.top_rows + STACK_GAP_PX

    def band_rows(self, band: str) -> tuple[int, int]:
        """Stack rows [start, end) of a band."""
        if band == "top":
            return 0, self.top_rows
        return self.bottom_offset, self.bottom_offset + self.bottom_rows

    def band_of(self, y: float) -> str:
        """The band a stack row belongs to (rows in the gap go to the nearer band)."""
        return "top" if y < self.top_rows + STACK_GAP_PX / 2 else "bottom"

    def frame_y(self, y: float, band: str) -> float:
        """A stack row as a share of the frame height (0 top, 1 bottom)."""
        det_y = y if band == "top" else y - self.bottom_offset + self.det_h - self.bottom_rows
        return float(det_y) / self.det_h

    def stack_box(self, box: tuple[float, float, float, float], band: str) -> tuple[float, float, float, float] | None:
        """A source-pixel box (x0, y0, x1, y1) in stack coordinates, cut to one band (None: outside it)."""
        x0, y0, x1, y1 = (float(v) * self.scale for v in box)
        if band == "top":
            y0, y1 = max(y0, 0.0), min(y1, float(self.top_rows))
        else:
            start = self.det_h - self.bottom_rows
            y0, y1 = max(y0, float(start)) - start + self.bottom_offset, min(y1, float(self.det_h)) - start + self.bottom_offset
        return (x0, y0, x1, y1) if y1 > y0 else None


def band_layout(frame_w: int, frame_h: int, det_side_px: int, band_top: float, band_bottom: float) -> BandLayout:
    """The stack geometry for frames of one size: the frame is scaled to ``det_side_px`` rows
    (text size is a share of the frame *height*, whatever the aspect), the bands are
    ``band_top`` and ``band_bottom`` of it."""
    scale = det_side_px / frame_h
    det_w, det_h = max(1, round(frame_w * scale)), det_side_px
    top_rows, bottom_rows = round(band_top * det_h), round(band_bottom * det_h)
    return BandLayout(
        frame_w=frame_w, frame_h=frame_h, scale=scale, det_w=det_w, det_h=det_h, top_rows=top_rows, bottom_rows=bottom_rows,
        stack_w=_round_up(det_w, STACK_MULTIPLE), stack_h=_round_up(top_rows + STACK_GAP_PX + bottom_rows, STACK_MULTIPLE),
    )


def stack_bands(rgb: np.ndarray, layout: BandLayout) -> np.ndarray:
    """The top and bottom bands of an RGB frame, scaled and stacked as ``layout`` says (RGB).

    Each band is cut from the source first and scaled on its own: the middle of the frame is
    never resized.
    """
    if rgb.shape[:2] != (layout.frame_h, layout.frame_w):
        raise ValueError(f"frame is {rgb.shape[1]}x{rgb.shape[0]}, layout is for {layout.frame_w}x{layout.frame_h}")
    stack = np.full((layout.stack_h, layout.stack_w, 3), PAD_GREY, np.uint8)
    h = layout.frame_h
    src_top = round(layout.top_rows / layout.scale)
    src_bottom = h - round(layout.bottom_rows / layout.scale)
    if layout.top_rows and src_top:
        stack[: layout.top_rows, : layout.det_w] = cv2.resize(rgb[:src_top], (layout.det_w, layout.top_rows), interpolation=cv2.INTER_AREA)
    if layout.bottom_rows and src_bottom < h:
        start = layout.bottom_offset
        stack[start : start + layout.bottom_rows, : layout.det_w] = cv2.resize(
            rgb[src_bottom:], (layout.det_w, layout.bottom_rows), interpolation=cv2.INTER_AREA
        )
    return stack


class TextDetector:
    """RapidOCR's text *detection* (no recognition) on band stacks.

    ``det_side_px`` is the frame height at which the bands are scanned: at 320 small type (2-3 %
    of the frame height) is 6-10 px tall, which the detector still finds on the variant set, at a
    third of the cost of 576 (``bench/text_filter.py``; at 256 large captions are missed).
    """

    def __init__(self, det_side_px: int, threads: int) -> None:
        from rapidocr import RapidOCR

        self.det_side_px = det_side_px
        self._engine = RapidOCR(
            params={
                # the stack arrives sized to multiples of 32: no resize, no padding on RapidOCR's side
                "Det.limit_type": "max",
                "Det.limit_side_len": 100_000,
                "Global.use_preprocess_img": False,
                "Global.use_vertical_padding": False,
                "EngineConfig.onnxruntime.intra_op_num_threads": threads,
                "EngineConfig.onnxruntime.inter_op_num_threads": 1,
                "Global.log_level": "error",
            }
        )
        logging.getLogger("RapidOCR").setLevel(logging.ERROR)

    def layout(self, frame_w: int, frame_h: int, band_top: float, band_bottom: float) -> BandLayout:
        return band_layout(frame_w, frame_h, self.det_side_px, band_top, band_bottom)

    def detect(self, rgb: np.ndarray) -> np.ndarray:
        """Text polygons (N x 4 x 2, pixels of ``rgb``) in an RGB image whose sides are multiples
        of 32 (a band stack); other sizes would be resized by the detector."""
        result = self._engine(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), use_det=True, use_cls=False, use_rec=False)
        boxes = getattr(result, "boxes", None)
        if boxes is None or len(boxes) == 0:
            return np.zeros((0, 4, 2), np.float32)
        return np.asarray(boxes, dtype=np.float32).reshape(-1, 4, 2)


def encode_frames(frames: dict[int, np.ndarray], quality: int = 95) -> tuple[list[int], list[bytes]]:
    """Frames as (source indices ascending, one JPEG each): two typed row columns, read back with
    ``decode_frames``. JPEG bytes are image data, not a serialised structure."""
    indices = sorted(frames)
    return [int(i) for i in indices], [jpeg_bytes(frames[i], quality) for i in indices]


def jpeg_bytes(rgb: np.ndarray, quality: int) -> bytes:
    """One RGB frame as JPEG bytes (OpenCV encodes BGR)."""
    ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"JPEG encoding of a {rgb.shape} frame failed")
    return jpg.tobytes()


def decode_frames(indices: list[int], jpegs: list[bytes]) -> dict[int, np.ndarray]:
    """RGB frames by source index from ``encode_frames``' two lists."""
    if len(indices) != len(jpegs):
        raise ValueError(f"{len(indices)} frame indices for {len(jpegs)} JPEGs")
    return {int(i): cv2.cvtColor(cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB) for i, j in zip(indices, jpegs)}
