"""The caption filter on real clips with text burnt in (tests/media.py), through ``text_step``
with the real RapidOCR detector and the job's MediaPipe face boxes: captions and tickers are
rejected, logos, name plates and scene text (still, shaken, hidden by the head) are kept, each
with the kind of text it shows. Only the sampled frames are built (no video encoding), passed
through JPEG as the scan hands them over."""

from __future__ import annotations

from pathlib import Path

import pytest

from cogportrait.config import CurateConfig
from cogportrait.curate.steps import new_row, text_step
from cogportrait.curate.text import TextDetector, encode_frames
from cogportrait.curate.tracking import FaceTracker, classify_detections
from cogportrait.io.video import probe_video, read_frames_at
from cogportrait.schema import TEXT_KIND_NAMES
from media import TEXT_VARIANTS, TextVariant, spread_frames

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "datasets" / "sample" / "videos"
HAMILTON = REPO.parent / "shared" / "data" / "fixture" / "videos" / "facerec_short_hamilton_multishot.mp4"

# every variant of one clip, and the hard ones of the others (bench/text_filter.py runs them all)
TESTED = {v.name for v in TEXT_VARIANTS if v.name.startswith("lp_d10_")} | {
    "lp_d0_subtitle", "lp_d20_captions_pauses", "lp_d20_ticker", "lp_d20_book_shelf_behind_head",
    "tpsmm_driving_captions_small", "tpsmm_driving_sign_shaky_camera", "tpsmm_driving_book_shelf_behind_head",
}


@pytest.fixture(scope="module")
def models():
    cfg = CurateConfig()
    tracker = FaceTracker(cfg.face_min_confidence, cfg.min_face_px, cfg.multi_face_area_ratio)
    yield cfg, TextDetector(cfg.text_det_side_px, threads=1), tracker
    tracker.close()


def run_text_step(frames: dict, cfg: CurateConfig, detector: TextDetector, tracker: FaceTracker) -> dict:
    """``text_step`` on a span row holding ``frames`` as the scan leaves them: JPEGs, and
    the face box of each frame where exactly one dominant face is found."""
    row = new_row({"video_id": "v", "manifest_row": 0})
    row["text_frames"], row["text_jpegs"] = encode_frames(frames)
    for idx, rgb in sorted(frames.items()):
        dets = tracker.detect(rgb)
        _, main = classify_detections(dets, cfg.min_face_px, cfg.multi_face_area_ratio)
        if main >= 0:
            row["track_frames"].append(idx)
            row["track_boxes"].append(list(dets[main][:4]))
    return text_step(row, cfg, detector)


@pytest.mark.parametrize("variant", [v for v in TEXT_VARIANTS if v.name in TESTED], ids=lambda v: v.name)
def test_captions_are_rejected_and_other_text_kept(variant: TextVariant, models):
    cfg, detector, tracker = models
    out = run_text_step(spread_frames(SAMPLE / variant.source, cfg.text_frames, variant.transform), cfg, detector, tracker)
    assert out["text_kind"] == variant.kind
    assert out["text_frames"] == [] and out["text_jpegs"] == []  # the JPEGs do not travel further
    if variant.caption:
        assert (out["reject_stage"], out["reject_reason"]) == ("text", "text_overlay")
        # the detail says what was seen, where, and on which frames
        assert out["reject_detail"].startswith(f"{variant.kind} in the ")
        assert " band at " in out["reject_detail"] and "samples (frames " in out["reject_detail"]
    else:
        assert out["reject_reason"] == "" and out["reject_detail"] == ""
    assert (out["text_score"] > 0) == (variant.kind != "none")


def test_every_expected_kind_is_in_the_vocabulary():
    assert {v.kind for v in TEXT_VARIANTS} <= set(TEXT_KIND_NAMES)
    assert {v.kind for v in TEXT_VARIANTS if v.caption} == {"caption", "ticker"}


def test_sampled_frames_of_the_job_variant_show_changing_subtitles():
    """tests/test_curate.py's `subtitled` clip must stay a caption: its builder shows a different
    line on the frames a span of it samples."""
    from media import SUBTITLES, subtitle

    cfg = CurateConfig()
    frames = spread_frames(SAMPLE / "lp_d0_man_greenscreen_gaze_blink.mp4", cfg.text_frames, subtitle)
    assert len({SUBTITLES[(i // 25) % len(SUBTITLES)] for i in frames}) >= 2


@pytest.mark.skipif(not HAMILTON.exists(), reason="the ../shared fixture clip is not on this machine")
def test_a_real_broadcast_shot_with_a_logo_is_kept(models):
    """A real stage shot with a channel bug in the corner (the hamilton fixture, frames 95-275)."""
    cfg, detector, tracker = models
    info = probe_video(HAMILTON)
    frames = read_frames_at(HAMILTON, info, [95 + int((k + 0.5) * 180 / cfg.text_frames) for k in range(cfg.text_frames)])
    out = run_text_step(frames, cfg, detector, tracker)
    assert out["reject_reason"] == "" and out["text_kind"] in ("none", "static")


@pytest.mark.parametrize("name", ["lp_d3_woman_frown_eyeclose.mp4", "edtalk_mouth_source_woman_talking.mp4"])
def test_real_clips_without_text_are_kept(name: str, models):
    cfg, detector, tracker = models
    out = run_text_step(spread_frames(SAMPLE / name, cfg.text_frames), cfg, detector, tracker)
    assert (out["reject_reason"], out["text_kind"], out["text_score"]) == ("", "none", 0.0)
