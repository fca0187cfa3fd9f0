"""The one-decode scan: shots at the known cuts, face samples on a time grid, bounded memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cogportrait.config import CurateConfig
from cogportrait.curate.scan import FrameReservoir, scan_video
from cogportrait.curate.tracking import FaceTracker
from cogportrait.io.video import probe_video

FIXTURE = Path(__file__).resolve().parents[1] / "datasets" / "sample" / "videos"
MULTISHOT = FIXTURE / "constructed_multishot_5shots_512_25fps.mp4"


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


def test_scan_streams_shots_at_the_cuts_with_samples_on_a_time_grid():
    cfg = CurateConfig()
    info = probe_video(MULTISHOT)
    tracker = FaceTracker(cfg.face_min_confidence, cfg.min_face_px, cfg.multi_face_area_ratio)
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
