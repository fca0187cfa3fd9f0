"""The one-decode scan: shots at the known cuts, face samples on a time grid, bounded memory;
spans cut on the video's own timeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cogportrait.config import CurateConfig
from cogportrait.curate.scan import FrameReservoir, scan_video
from cogportrait.curate.steps import crop_step, filter_step, new_row, probe_step, scan_step, text_step
from cogportrait.curate.text import TextDetector
from cogportrait.curate.tracking import FaceTracker
from cogportrait.io.audio import read_wav
from cogportrait.io.video import iter_frames, probe_video
from media import late_start_variant

FIXTURE = Path(__file__).resolve().parents[1] / "datasets" / "sample" / "videos"
MULTISHOT = FIXTURE / "constructed_multishot_5shots_512_25fps.mp4"
TALKING_WITH_AUDIO = FIXTURE / "lp_d10_woman_browraise_wink_audio.mp4"


def test_reservoir_stays_bounded_and_evenly_spread():
    res = FrameReservoir(capacity=8, stride=1)
    frame = np.zeros((4, 4, 3), np.uint8)
    for i in range(1000):
        res.offer(i * 3, frame)
    held = sorted(res.frames())
    assert 4 <= len(held) <= 8
    gaps = np.diff(held)
    assert gaps.min() == gaps.max(), held  # an even grid over everything offered
    assert held[0] == 0 and held[-1] >= 3 * 1000 - 3 * gaps[0]  # covers the whole stream
    tail = res.split_off(held[len(held) // 2])
    assert sorted(tail.frames()) == held[len(held) // 2:] and sorted(res.frames()) == held[: len(held) // 2]


def test_scan_streams_shots_at_the_cuts_with_samples_on_a_time_grid(request):
    cfg = CurateConfig()
    info = probe_video(MULTISHOT)
    tracker = FaceTracker(cfg.face_min_confidence, cfg.min_face_px, cfg.multi_face_area_ratio)
    request.addfinalizer(tracker.close)  # a detector left to the interpreter's exit makes MediaPipe print a TypeError
    scan, shots = scan_video(MULTISHOT, info, tracker, 1 / cfg.track_fps, cfg.scene_detector, cfg.scene_threshold,
                             cfg.scene_min_len_frames, cfg.scene_downscale_px, text_capacity=6, text_stride=2)
    seen, sample_frames = [], []
    for shot in shots:
        seen.append((shot.start, shot.end, scan.n_frames))
        sample_frames += [s.frame for s in shot.samples]
        assert all(shot.start <= s.frame < shot.end for s in shot.samples)
        assert 0 < len(shot.candidates) <= 6 and all(shot.start <= i < shot.end for i in shot.candidates)
        assert all(s.label == "ok" for s in shot.samples), [s.label for s in shot.samples]
    starts = [a for a, _, _ in seen]
    for cut in (75, 135, 210, 285):  # ../shared/data/fixture/annotations/constructed_multishot_cuts.json
        assert any(abs(s - cut) <= 2 for s in starts), starts
    assert [b for _, b, _ in seen[:-1]] == starts[1:] and seen[-1][1] == scan.n_frames == 360
    assert all(n_seen < 360 for _, _, n_seen in seen[:-1])  # handed out while decoding, not at the end
    # one sample per 0.2 s of stream time (25 fps: every 5th frame), whatever the shots
    assert sample_frames == list(range(0, 360, 5))


def _curate_one(path: Path, out: Path, cfg: CurateConfig, tracker: FaceTracker, detector: TextDetector) -> list[dict]:
    """Every step of the job on one video, without Ray: its span rows, clips written to ``out``."""
    manifest_row = {"video_id": path.stem, "path": str(path), "source": "", "license": "", "label": "", "identity": "x",
                    "mirrored": False, "manifest_row": 0}
    row = probe_step(new_row(manifest_row), cfg)
    return [crop_step(filter_step(text_step(span, cfg, detector), cfg), cfg, str(out))
            for spans in scan_step(row, cfg, tracker) for span in spans]


def test_a_stream_that_starts_late_is_cut_on_its_own_timeline(tmp_path, request):
    """The same packets with timestamps from 1 s (MPEG-TS): the same spans, the same clip frames
    and the audio of the same moments. Spans count from the first video frame; a crop that took
    them as stream times held its first frame and ran 1 s late, and its audio was 1 s early."""
    cfg = CurateConfig()
    tracker = FaceTracker(cfg.face_min_confidence, cfg.min_face_px, cfg.multi_face_area_ratio)
    request.addfinalizer(tracker.close)
    detector = TextDetector(cfg.text_det_side_px, threads=1)
    late = late_start_variant(TALKING_WITH_AUDIO, tmp_path / "late.ts", delay_s=1.0)
    assert probe_video(late).start_time_s >= 1.0 and probe_video(TALKING_WITH_AUDIO).start_time_s == 0.0
    ref = _curate_one(TALKING_WITH_AUDIO, tmp_path / "ref", cfg, tracker, detector)
    got = _curate_one(late, tmp_path / "late", cfg, tracker, detector)
    assert [(r["start_frame"], r["end_frame"], r["reject_reason"]) for r in got] == \
           [(r["start_frame"], r["end_frame"], r["reject_reason"]) for r in ref]
    kept = [(a, b) for a, b in zip(ref, got) if a["clip_path"]]
    assert kept and all(b["clip_path"] and b["has_audio"] for _, b in kept)
    for a, b in kept:
        clip_a, clip_b = tmp_path / "ref" / a["clip_path"], tmp_path / "late" / b["clip_path"]
        frames_a = [f for _, f in iter_frames(clip_a, probe_video(clip_a))]
        frames_b = [f for _, f in iter_frames(clip_b, probe_video(clip_b))]
        assert len(frames_a) == len(frames_b) == a["n_frames"]
        assert all(np.array_equal(x, y) for x, y in zip(frames_a, frames_b))
        wav_a, rate, _ = read_wav(tmp_path / "ref" / a["audio_path"])
        wav_b, _, _ = read_wav(tmp_path / "late" / b["audio_path"])
        assert len(wav_a) == len(wav_b) == round(a["n_frames"] / 25 * rate)
        # in sync to the sample: the AAC frames decode alike once the decoder has primed
        middle = slice(rate, len(wav_a) - rate)
        lags = range(-rate // 50, rate // 50 + 1)  # +-20 ms
        score = [np.dot(wav_a[middle].astype(float), np.roll(wav_b, -lag)[middle].astype(float)) for lag in lags]
        assert list(lags)[int(np.argmax(score))] == 0
        assert np.corrcoef(wav_a[middle], wav_b[middle])[0, 1] > 0.95
