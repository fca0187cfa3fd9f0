"""Clip filters. Each returns (keep, reason, ...) so the job can count drops per reason.

Text rule (documented in the README). Practice removes *captions*: subtitles and tickers burnt
in over the picture, which change while the speaker talks; it keeps logos and text that belongs
to the scene (signs, badges, book spines). So the rule looks where captions live and asks
whether the text changes in place:

1. RapidOCR detection runs on the top and bottom bands of ``text_frames`` sampled frames (text.py
   stacks both bands into one image per frame). A detection counts as a text *line* when it is
   ``text_min_box_height``..``text_max_box_height`` of the frame height tall, at least
   ``text_min_aspect`` times as wide as tall (after joining boxes on one row), and not centred in
   the face box above its chin (``text_face_chin``): eyes and mouths may read as glyphs, while
   the subtitles of a close-up sit over the chin.
2. Each line of each sample is compared with every other sample by normalised cross-correlation
   (NCC) of its grey patch, searched over shifts up to ``text_shake`` (camera shake and
   re-encoding do not count). The line is, in the other sample:
   *same* when it matches in place, or when the other sample shows a part of it at the same
   height and that part matches (the rest hidden, e.g. behind the speaker's head);
   *changed* when a line box stands exactly where it stood but holds other pixels (a subtitle
   replaced, a ticker scrolled);
   *moved* when it matches only further away (``text_max_move``): text moving with the picture;
   *changed* when a line stands at the same height, or nothing stands there any more (the
   subtitle is gone) and the speaker cannot be hiding it; *hidden* when nothing stands there and
   the speaker might (``speaker_region``); *unanchored* when other-shaped text stands there.
3. A line that moved or is unanchored against any sample is scene text; one that changed
   against any sample is changing; otherwise (same or hidden everywhere) it is static. A band is
   a caption band when at least ``text_min_frames_ratio`` of the samples show a changing line in
   it (fewer: scene text that comes and goes), a ticker band when one of those lines spans
   ``text_ticker_min_width`` of the width. Captions and tickers are rejected
   (``text_overlay``); the span's ``text_kind`` is the most intrusive kind seen (TEXT_KINDS).

``text_score`` is the share of the frame covered by counted text lines, averaged over samples.
The detector's whole-band boxes on frames without any text (PP-OCRv6 marks the entire image
when it finds nothing) are taller than any text line and fall out at step 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np

from cogportrait.config import CurateConfig
from cogportrait.curate.text import BANDS, BandLayout
from cogportrait.schema import TEXT_KIND_NAMES

FLAT_STD = 4.0  # grey-level std below which a patch holds no text to compare


@dataclass(frozen=True)
class TextSample:
    """One sampled frame as the text rule sees it: its band stack and the text lines in it."""

    frame: int  # source frame index
    grey: np.ndarray  # the band stack (text.stack_bands), grey uint8
    lines: np.ndarray  # L x 4 line boxes (x0, y0, x1, y1), stack pixels
    bands: tuple[str, ...]  # the band of each line
    face: tuple[float, float, float, float] | None = None  # the tracked face box, source pixels


class TextVerdict(NamedTuple):
    keep: bool
    reason: str  # "" or "text_overlay"
    score: float  # text_score
    kind: str  # TEXT_KINDS
    detail: str  # what was seen, for the reject's detail


def _join_rows(boxes: np.ndarray, bands: list[str], max_gap: float) -> tuple[np.ndarray, list[str]]:
    """Boxes of one band on one row (vertical overlap >= half the smaller height) with a
    horizontal gap of at most ``max_gap`` times the taller height joined into one line box."""
    boxes, bands = [b.copy() for b in boxes], list(bands)
    joined = True
    while joined:
        joined = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                if bands[i] != bands[j]:
                    continue
                ha, hb = a[3] - a[1], b[3] - b[1]
                overlap_y = min(a[3], b[3]) - max(a[1], b[1])
                gap_x = max(a[0], b[0]) - min(a[2], b[2])
                if overlap_y >= 0.5 * min(ha, hb) and gap_x <= max_gap * max(ha, hb):
                    boxes[i] = np.array([min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])])
                    del boxes[j], bands[j]
                    joined = True
                    break
            if joined:
                break
    return np.array(boxes, np.float64).reshape(-1, 4), bands


def _on_face(layout: BandLayout, face_box: tuple[float, float, float, float], band: str, cx: float, cy: float, chin: float) -> bool:
    """Whether a stack point lies in the face box above its bottom ``chin`` share: eyes, brows
    and mouth may read as glyphs, while close-up subtitles sit over the chin."""
    x0, y0, x1, y1 = face_box
    upper = layout.stack_box((x0, y0, x1, y1 - chin * (y1 - y0)), band)
    return upper is not None and upper[0] <= cx <= upper[2] and upper[1] <= cy <= upper[3]


def line_boxes(
    polys: np.ndarray, layout: BandLayout, face_box: tuple[float, float, float, float] | None, cfg: CurateConfig
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Text lines (L x 4 boxes in stack pixels, and their bands) from detector polygons on a
    band stack: too-tall boxes dropped, boxes on one row joined, then lines kept when tall
    enough, line-shaped and not centred in the face box above its chin (``face_box`` in source
    pixels)."""
    min_h, max_h = cfg.text_min_box_height * layout.det_h, cfg.text_max_box_height * layout.det_h
    boxes, bands = [], []
    for poly in np.asarray(polys, dtype=np.float64).reshape(-1, 4, 2):
        band = layout.band_of(poly[:, 1].mean())
        top, bottom = layout.band_rows(band)
        x0, x1 = np.clip([poly[:, 0].min(), poly[:, 0].max()], 0, layout.det_w)
        y0, y1 = np.clip([poly[:, 1].min(), poly[:, 1].max()], top, bottom)
        if y1 - y0 > max_h or x1 <= x0 or y1 <= y0:
            continue
        boxes.append(np.array([x0, y0, x1, y1]))
        bands.append(band)
    lines, bands = _join_rows(np.array(boxes).reshape(-1, 4), bands, cfg.text_line_gap)
    keep = [
        y1 - y0 >= min_h and x1 - x0 >= cfg.text_min_aspect * (y1 - y0)
        and not (face_box is not None and _on_face(layout, face_box, band, (x0 + x1) / 2, (y0 + y1) / 2, cfg.text_face_chin))
        for (x0, y0, x1, y1), band in zip(lines, bands)
    ]
    return lines[np.array(keep, bool).reshape(-1)], tuple(b for b, k in zip(bands, keep) if k)


def best_ncc(template_img: np.ndarray, search_img: np.ndarray, box: np.ndarray, max_shift: int, rows: tuple[int, int]) -> float:
    """Highest normalised cross-correlation of ``box`` of ``template_img`` against
    ``search_img`` shifted by up to ``max_shift`` px, the search kept within ``rows`` (a band).
    A flat patch holds nothing to compare and counts as a match (1.0)."""
    h, w = search_img.shape[:2]
    x0, y0 = max(0, int(np.floor(box[0]))), max(rows[0], int(np.floor(box[1])))
    x1, y1 = min(w, int(np.ceil(box[2]))), min(rows[1], int(np.ceil(box[3])))
    template = template_img[y0:y1, x0:x1].astype(np.float32)
    if template.size == 0 or template.std() < FLAT_STD:
        return 1.0
    search = search_img[max(rows[0], y0 - max_shift) : min(rows[1], y1 + max_shift), max(0, x0 - max_shift) : min(w, x1 + max_shift)]
    scores = cv2.matchTemplate(search.astype(np.float32), template, cv2.TM_CCOEFF_NORMED)
    return float(np.nanmax(scores)) if np.isfinite(scores).any() else 0.0


def speaker_region(face: tuple[float, float, float, float] | None, margin: float) -> tuple[float, float, float, float] | None:
    """Where the speaker may hide the background (source pixels): the face box widened by
    ``margin`` of its width on each side, raised by ``margin`` of its height (hair), down to
    the bottom of the frame (neck, shoulders)."""
    if face is None:
        return None
    x0, y0, x1, y1 = face
    fw, fh = x1 - x0, y1 - y0
    return x0 - margin * fw, y0 - margin * fh, x1 + margin * fw, float("inf")


def _intersects(box: np.ndarray, region: tuple[float, float, float, float] | None) -> bool:
    return region is not None and box[0] < region[2] and box[2] > region[0] and box[1] < region[3] and box[3] > region[1]


def pair_verdict(a: TextSample, line: int, b: TextSample, layout: BandLayout, cfg: CurateConfig) -> str:
    """What became of line ``line`` of sample ``a`` in sample ``b``: "same", "moved",
    "changed", "hidden" or "unanchored" (rule in the module docstring)."""
    box, band = a.lines[line], a.bands[line]
    rows = layout.band_rows(band)
    shake = max(1, round(cfg.text_shake * layout.det_h))
    if best_ncc(a.grey, b.grey, box, shake, rows) >= cfg.text_same_ncc:
        return "same"
    others = np.array([o for o, ob in zip(b.lines, b.bands) if ob == band]).reshape(-1, 4)
    overlaps_x = (others[:, 0] < box[2]) & (others[:, 2] > box[0])
    level = overlaps_x & (np.abs(others[:, 1] - box[1]) <= shake) & (np.abs(others[:, 3] - box[3]) <= shake)
    for other in others[level]:  # a part of the line still shows (the rest hidden): compare that part
        part = np.array([max(box[0], other[0]), box[1], min(box[2], other[2]), box[3]])
        if part[2] - part[0] < (other[2] - other[0]) - shake:
            continue  # b's line sticks out of a's: different text, not a part of it
        if best_ncc(a.grey, b.grey, part, shake, rows) >= cfg.text_same_ncc:
            return "same"
    in_place = level & (np.abs(others[:, 0] - box[0]) <= shake) & (np.abs(others[:, 2] - box[2]) <= shake)
    if in_place.any():  # the box stayed and its content did not: replaced, or scrolling
        return "changed"
    if best_ncc(a.grey, b.grey, box, max(shake, round(cfg.text_max_move * layout.det_h)), rows) >= cfg.text_same_ncc:
        return "moved"
    if level.any():
        return "changed"
    overlaps_y = (others[:, 1] < box[3]) & (others[:, 3] > box[1])
    if (overlaps_x & overlaps_y).any():
        return "unanchored"
    # nothing left where the line was: gone, unless the speaker may stand in front of it
    for sample in (a, b):
        region = speaker_region(sample.face, cfg.text_speaker_margin)
        if region is not None and _intersects(box, layout.stack_box(region, band)):
            return "hidden"
    return "changed"


def line_kind(a: TextSample, line: int, samples: list[TextSample], layout: BandLayout, cfg: CurateConfig) -> str:
    """"scene" (moved or unanchored against some sample), "changing" (changed against some
    sample) or "static" (the same, or hidden, everywhere)."""
    verdicts = {pair_verdict(a, line, b, layout, cfg) for b in samples if b is not a}
    if verdicts & {"moved", "unanchored"}:
        return "scene"
    return "changing" if "changed" in verdicts else "static"


def caption_possible(samples: list[TextSample], total: int, cfg: CurateConfig) -> bool:
    """Whether a span could still be a caption after examining ``samples`` of its ``total``.

    A caption needs changing lines in ``text_min_frames_ratio`` of the samples; once the samples
    with any line at all plus those not yet examined fall short of that, the verdict is "keep"
    whatever the rest show, so the text step stops detecting (a quarter of the detector's work on
    a clean span at 4 samples). ``text_decision`` on the examined samples then keeps the span too.
    """
    with_lines = sum(len(s.lines) > 0 for s in samples)
    return with_lines + (total - len(samples)) >= cfg.text_min_frames_ratio * total


def text_decision(samples: list[TextSample], layout: BandLayout | None, cfg: CurateConfig) -> TextVerdict:
    """(keep, reason, text_score, text_kind, detail) of a span from its sampled frames."""
    if not samples or layout is None:
        return TextVerdict(True, "", 0.0, "none", "")
    frame_area = float(layout.det_w * layout.det_h)
    score = float(np.mean([np.sum((s.lines[:, 2] - s.lines[:, 0]) * (s.lines[:, 3] - s.lines[:, 1])) / frame_area for s in samples]))
    seen: set[str] = set()
    changing: dict[str, list[tuple[int, np.ndarray]]] = {band: [] for band in BANDS}  # band -> (sample, box)
    for k, s in enumerate(samples):
        for i, band in enumerate(s.bands):
            kind = line_kind(s, i, samples, layout, cfg)
            if kind == "changing":
                changing[band].append((k, s.lines[i]))
            else:
                seen.add(kind)
    details = []
    for band, hits in changing.items():
        if not hits:
            continue
        shown = sorted({k for k, _ in hits})
        if len(samples) < 2 or len(shown) < cfg.text_min_frames_ratio * len(samples):
            seen.add("scene")  # comes and goes, in too few samples to call a caption
            continue
        wide = max((box[2] - box[0]) / layout.det_w for _, box in hits) >= cfg.text_ticker_min_width
        kind = "ticker" if wide else "caption"
        seen.add(kind)
        y0 = min(layout.frame_y(box[1], band) for _, box in hits)
        y1 = max(layout.frame_y(box[3], band) for _, box in hits)
        details.append(
            f"{kind} in the {band} band at {y0:.0%}-{y1:.0%} of the height, changing in {len(shown)}/{len(samples)} "
            f"samples (frames {', '.join(str(samples[k].frame) for k in shown)})"
        )
    kind = max(seen, key=TEXT_KIND_NAMES.index, default="none")
    if kind in ("caption", "ticker"):
        return TextVerdict(False, "text_overlay", score, kind, "; ".join(details))
    return TextVerdict(True, "", score, kind, "")


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
