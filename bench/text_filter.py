"""Benchmark the curate text filter: CPU per span, old rule vs new, and precision/recall of
``text_overlay`` on the caption variant set (tests/media.py TEXT_VARIANTS, built from the
sample clips), plus the real sample clips as they are. Prints one JSON document.

    python bench/text_filter.py                 # every variant, 3 timing repeats
    python bench/text_filter.py --repeats 1

*Old* is the rule this replaced (commit c6c78c2): RapidOCR detection on 3 whole frames (long
side shrunk to 512, then RapidOCR's own ``limit_type: min`` scaling the short side to 512),
rejecting when text boxes outside the face cover >= 0.2 % of the frame in at least half of them;
it is re-stated here, in a few lines, only to measure it. *New* is ``text_step`` as the job runs
it, on ``text_frames`` (4) frames of the same clip. Both run with one ONNX Runtime thread; CPU
time is ``time.process_time`` of the whole per-span call (JPEG decode, detection, rule). Face
boxes come from the job's MediaPipe detector on the same frames (not timed).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from common import machine_info  # noqa: E402

SAMPLE = REPO / "datasets" / "sample" / "videos"
HAMILTON = REPO.parent / "shared" / "data" / "fixture" / "videos" / "facerec_short_hamilton_multishot.mp4"
HAMILTON_SHOT = (95, 275)  # one shot of it (a singer on stage, a static "WH.GOV" bug top right)
OLD_FRAMES, OLD_SIDE, OLD_MIN_BOX_HEIGHT, OLD_MAX_AREA, OLD_RATIO = 3, 512, 0.02, 0.002, 0.5


class OldRule:
    """The previous text filter, for comparison only."""

    def __init__(self) -> None:
        from rapidocr import RapidOCR

        self.engine = RapidOCR(params={
            "Det.limit_side_len": OLD_SIDE, "EngineConfig.onnxruntime.intra_op_num_threads": 1,
            "EngineConfig.onnxruntime.inter_op_num_threads": 1, "Global.log_level": "error",
        })
        logging.getLogger("RapidOCR").setLevel(logging.ERROR)

    def __call__(self, frames: dict[int, np.ndarray], faces: dict[int, tuple | None]) -> bool:
        """True when the span would have been rejected as text_overlay."""
        import cv2

        with_text = 0
        for idx, rgb in frames.items():
            h, w = rgb.shape[:2]
            scale = min(1.0, OLD_SIDE / max(h, w))
            small = cv2.resize(rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA) if scale < 1 else rgb
            boxes = getattr(self.engine(np.ascontiguousarray(small[..., ::-1]), use_det=True, use_cls=False, use_rec=False), "boxes", None)
            area = 0.0
            for poly in np.asarray(boxes if boxes is not None else np.zeros((0, 4, 2)), np.float64).reshape(-1, 4, 2) / scale:
                xs, ys = poly[:, 0], poly[:, 1]
                face = faces[idx]
                if ys.max() - ys.min() < OLD_MIN_BOX_HEIGHT * h or (
                    face is not None and face[0] <= xs.mean() <= face[2] and face[1] <= ys.mean() <= face[3]
                ):
                    continue
                area += 0.5 * abs(np.dot(xs, np.roll(ys, 1)) - np.dot(ys, np.roll(xs, 1)))
            with_text += area / (w * h) >= OLD_MAX_AREA
        return with_text / max(1, len(frames)) >= OLD_RATIO


def face_boxes(tracker, frames: dict[int, np.ndarray], cfg) -> dict[int, tuple | None]:
    from cogportrait.curate.tracking import classify_detections

    out = {}
    for idx, rgb in frames.items():
        dets = tracker.detect(rgb)
        _, main = classify_detections(dets, cfg.min_face_px, cfg.multi_face_area_ratio)
        out[idx] = tuple(dets[main][:4]) if main >= 0 else None
    return out


def new_span(frames: dict[int, np.ndarray], faces: dict[int, tuple | None], cfg, detector) -> dict:
    from cogportrait.curate.steps import new_row, text_step
    from cogportrait.curate.text import encode_frames

    row = new_row({"video_id": "bench"})
    row["text_frames"], row["text_jpegs"] = encode_frames(frames)
    tracked = sorted(i for i, f in faces.items() if f is not None)
    row["track_frames"], row["track_boxes"] = tracked, [list(faces[i]) for i in tracked]
    return text_step(row, cfg, detector)


def precision_recall(truth: list[bool], said: list[bool]) -> dict:
    tp = sum(t and s for t, s in zip(truth, said))
    fp = sum(s and not t for t, s in zip(truth, said))
    fn = sum(t and not s for t, s in zip(truth, said))
    return {"tp": tp, "fp": fp, "fn": fn, "precision": tp / max(1, tp + fp), "recall": tp / max(1, tp + fn)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats per span (the minimum counts)")
    parser.add_argument("--frames", type=int, default=None, help="override curate.text_frames")
    parser.add_argument("--det-side", type=int, default=None, help="override curate.text_det_side_px")
    args = parser.parse_args()

    from media import TEXT_VARIANTS, TextVariant, spread_frames

    from cogportrait.config import CurateConfig
    from cogportrait.curate.text import TextDetector
    from cogportrait.curate.tracking import FaceTracker
    from cogportrait.io.video import probe_video, read_frames_at

    from dataclasses import replace

    cfg = CurateConfig()
    cfg = replace(cfg, text_frames=args.frames or cfg.text_frames, text_det_side_px=args.det_side or cfg.text_det_side_px)
    detector, old, tracker = TextDetector(cfg.text_det_side_px, threads=1), OldRule(), FaceTracker(
        cfg.face_min_confidence, cfg.min_face_px, cfg.multi_face_area_ratio)
    cases: list[tuple[TextVariant, Path]] = [(v, SAMPLE / v.source) for v in TEXT_VARIANTS]
    # the real sample clips with a face, as they are: no captions, none to reject
    for name in ("lp_d0_man_greenscreen_gaze_blink.mp4", "lp_d3_woman_frown_eyeclose.mp4", "edtalk_mouth_source_woman_talking.mp4"):
        cases.append((TextVariant(f"real_{name.split('_')[0]}_{name.split('_')[1]}", name, None, "none", False), SAMPLE / name))

    rows = []
    for variant, path in cases:
        spans = {}
        for label, count in (("old", OLD_FRAMES), ("new", cfg.text_frames)):
            frames = spread_frames(path, count, variant.transform)
            spans[label] = (frames, face_boxes(tracker, frames, cfg))
        cpu = {"old": [], "new": []}
        for _ in range(args.repeats):
            t0 = time.process_time()
            old_rejects = old(*spans["old"])
            cpu["old"].append(time.process_time() - t0)
            t0 = time.process_time()
            out = new_span(*spans["new"], cfg, detector)
            cpu["new"].append(time.process_time() - t0)
        rows.append({
            "name": variant.name, "caption": variant.caption, "expected_kind": variant.kind,
            "old_rejects": bool(old_rejects), "new_rejects": out["reject_reason"] == "text_overlay",
            "new_kind": out["text_kind"], "new_score": round(out["text_score"], 4), "detail": out["reject_detail"],
            "old_cpu_ms": round(1000 * min(cpu["old"]), 1), "new_cpu_ms": round(1000 * min(cpu["new"]), 1),
        })
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    real = []
    if HAMILTON.exists():  # a real broadcast shot with a logo (../shared fixture), not in the repo
        info = probe_video(HAMILTON)
        a, b = HAMILTON_SHOT
        frames = read_frames_at(HAMILTON, info, sorted({a + int((k + 0.5) * (b - a) / cfg.text_frames) for k in range(cfg.text_frames)}))
        faces = face_boxes(tracker, frames, cfg)
        old_frames = read_frames_at(HAMILTON, info, sorted({a + int((k + 0.5) * (b - a) / OLD_FRAMES) for k in range(OLD_FRAMES)}))
        old_faces = face_boxes(tracker, old_frames, cfg)
        cpu = {"old": [], "new": []}
        for _ in range(args.repeats):  # a 16:9 source: the old rule's detector saw 896 x 512 per frame
            t0 = time.process_time()
            old_rejects = old(old_frames, old_faces)
            cpu["old"].append(time.process_time() - t0)
            t0 = time.process_time()
            out = new_span(frames, faces, cfg, detector)
            cpu["new"].append(time.process_time() - t0)
        real.append({"name": "hamilton_stage_shot_640x360", "old_rejects": bool(old_rejects), "new_rejects": out["reject_reason"] == "text_overlay",
                     "new_kind": out["text_kind"], "old_cpu_ms": round(1000 * min(cpu["old"]), 1), "new_cpu_ms": round(1000 * min(cpu["new"]), 1)})

    truth = [r["caption"] for r in rows]
    result = {
        "machine": machine_info(),
        "config": {"text_frames": cfg.text_frames, "text_det_side_px": cfg.text_det_side_px,
                   "bands": [cfg.text_band_top, cfg.text_band_bottom], "old_frames": OLD_FRAMES, "old_side": OLD_SIDE},
        "n_spans": len(rows), "n_captioned": sum(truth),
        "cpu_ms_per_span": {
            label: {"mean": round(float(np.mean([r[f"{label}_cpu_ms"] for r in rows])), 1),
                    "median": round(float(np.median([r[f"{label}_cpu_ms"] for r in rows])), 1)}
            for label in ("old", "new")
        },
        "text_overlay": {label: precision_recall(truth, [r[f"{label}_rejects"] for r in rows]) for label in ("old", "new")},
        "kind_correct": sum(r["new_kind"] == r["expected_kind"] for r in rows),
        "real_clips_outside_repo": real,
        "spans": rows,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
