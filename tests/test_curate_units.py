"""Curation maths without Ray: manifest validation, span arithmetic, crop geometry, filters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cogportrait.config import ConfigError, CurateConfig
from cogportrait.curate.crop import crop_frame, crop_frame_yuv420, crop_track
from cogportrait.curate.filters import TextSample, caption_possible, line_boxes, pair_verdict, quality_decision, text_decision
from cogportrait.curate.manifest import ManifestError, read_manifest
from cogportrait.curate.scan import area_shrink
from cogportrait.curate.spans import Span, apply_duration_limits, segment_face_runs
from cogportrait.curate.text import band_layout, stack_bands
from cogportrait.curate.tracking import classify_detections
from cogportrait.io.video import yuv420_planes
from cogportrait.schema import clip_id_for

REPO = Path(__file__).resolve().parents[1]


def test_manifest_without_required_columns_is_a_clear_error(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_text("video_id,path\nv1,a.mp4\n")
    with pytest.raises(ManifestError, match="source"):
        read_manifest(path)
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "nope.csv")


def test_manifest_rows_are_validated(tmp_path):
    (tmp_path / "a.mp4").write_bytes(b"x")
    path = tmp_path / "manifest.csv"
    path.write_text(
        "video_id,path,source,license,label,mirrored\n"
        "v1,a.mp4,s,l,x,true\n"
        "v1,a.mp4,s,l,x,\n"
        ",a.mp4,s,l,x,\n"
        "v2,../../etc/passwd,s,l,x,\n"
        "v3,a.mp4,s,l,x,sometimes\n"
    )
    valid, rejects, root = read_manifest(path)
    assert root == tmp_path.resolve()
    assert [r["video_id"] for r in valid] == ["v1"]
    assert valid[0]["mirrored"] is True and valid[0]["identity"] == "unknown"
    assert [r.reason for r in rejects] == ["duplicate_id", "invalid_row", "path_outside_root", "invalid_row"]


def test_duration_limits_split_long_and_reject_short():
    times = np.arange(0, 1100) / 25.0
    assert apply_duration_limits(Span(0, 50), times, 0.04, 3.0, 20.0) == [Span(0, 50, "too_short")]
    assert apply_duration_limits(Span(0, 75), times, 0.04, 3.0, 20.0) == [Span(0, 75)]
    pieces = apply_duration_limits(Span(0, 1100), times, 0.04, 3.0, 20.0)
    assert len(pieces) == 3 and pieces[0].start == 0 and pieces[-1].end == 1100
    assert all(a.end == b.start for a, b in zip(pieces, pieces[1:]))
    assert all(not p.reason and 3.0 <= p.n / 25 <= 20.0 for p in pieces)
    # with an offset (times of a sub-span)
    sub = apply_duration_limits(Span(500, 1000), times[500:], 0.04, 3.0, 15.0, offset=500)
    assert sub[0].start == 500 and sub[-1].end == 1000 and len(sub) == 2


def test_face_runs_bridge_short_gaps_and_split_long_ones():
    frames = list(range(0, 100, 5))  # 20 samples, span [0, 100)
    labels = ["ok"] * 20
    labels[4:6] = ["no_face"] * 2  # bridged (2 <= max gap 5)
    labels[10:17] = ["multi_face"] * 7  # splits
    runs = segment_face_runs(frames, labels, 100, max_gap_samples=5)
    assert runs == [Span(0, 50), Span(50, 85, "multi_face"), Span(85, 100)]
    # leading no-face stretch is rejected, never bridged
    assert segment_face_runs([0, 5, 10], ["no_face", "ok", "ok"], 15, 5) == [Span(0, 5, "no_face"), Span(5, 15)]


def test_detections_are_classified():
    big = (0, 0, 200, 200, 0.9)
    assert classify_detections([], 96, 0.2) == ("no_face", -1)
    assert classify_detections([big], 96, 0.2) == ("ok", 0)
    assert classify_detections([(0, 0, 50, 50, 0.9)], 96, 0.2)[0] == "small_face"
    assert classify_detections([(300, 0, 330, 30, 0.9), big], 96, 0.2) == ("ok", 1)  # tiny background face
    assert classify_detections([big, (300, 0, 450, 150, 0.9)], 96, 0.2)[0] == "multi_face"


def test_crop_track_is_square_smooth_and_inside_the_frame():
    t = np.arange(0, 3, 0.2)
    boxes = np.stack([np.full_like(t, 380), np.full_like(t, 100), np.full_like(t, 480), np.full_like(t, 200)], 1)
    boxes[5, :] += 30  # one jittery detection
    out_t = np.arange(0, 75) / 25
    track = crop_track(t, boxes, out_t, 512, 384, 1.5, 0.5, 25)
    cx, cy, side = track.T
    assert np.allclose(side, 150, atol=10)
    assert (cx + side / 2 <= 512 + 1e-3).all() and (cx - side / 2 >= -1e-3).all()
    assert np.abs(np.diff(cx)).max() < 3  # smoothed: no 30 px jump
    big = crop_track(t, boxes * [1, 1, 1, 3], out_t, 512, 384, 1.5, 0.5, 25)
    assert (big[:, 2] <= 384 + 1e-3).all()  # shrunk to fit the frame


def _decoded_frame(path: Path):
    import av

    with av.open(str(path)) as container:
        return next(container.decode(video=0))


def test_yuv420_planes_are_the_decoded_planes_upright_or_rotated():
    frame = _decoded_frame(REPO / "datasets/sample/videos/lp_d20_man_talking_outdoor_audio.mp4")
    h, w = frame.height, frame.width
    packed = frame.to_ndarray(format="yuv420p")
    y, u, v = yuv420_planes(frame)
    assert y.shape == (h, w) and u.shape == v.shape == (h // 2, w // 2)
    np.testing.assert_array_equal(y, packed[:h])
    np.testing.assert_array_equal(np.concatenate([u.reshape(-1), v.reshape(-1)]), packed[h:].reshape(-1))
    assert np.shares_memory(y, np.frombuffer(frame.planes[0], np.uint8))  # a view, not a copy
    turned = yuv420_planes(frame, 1)
    for a, b in zip(turned, (y, u, v)):
        np.testing.assert_array_equal(a, np.rot90(b))


def test_the_scene_shrink_is_opencvs_area_average_whole_or_close():
    """A whole factor is OpenCV's area shrink itself; a fractional one (two steps, the edge
    pixels a whole first step leaves out) stays within about a level of it on a real frame."""
    import cv2

    def area(plane, size):
        return cv2.resize(plane, size, interpolation=cv2.INTER_AREA).astype(np.int16)

    rng = np.random.default_rng(0)
    plane = rng.integers(0, 256, (720, 1280), dtype=np.uint8)
    np.testing.assert_array_equal(area_shrink(plane, (128, 72)), area(plane, (128, 72)))
    y, u, _ = yuv420_planes(_decoded_frame(REPO / "datasets/sample/videos/pyfeat_no_face_animation.mp4"))
    assert y.shape == (540, 960)
    for p, size in ((y, (128, 72)), (u, (64, 36))):
        small = area_shrink(p, size)
        assert small.shape == size[::-1] and small.dtype == np.uint8
        assert np.abs(small.astype(np.int16) - area(p, size)).mean() < 2.0


def test_planar_crop_paints_the_same_picture_as_the_rgb_crop():
    """The crop the curate job encodes (on the decoded planes, painted into the encoder's frame)
    shows what the RGB crop shows: up to chroma subsampling and rounding."""
    import av

    frame = _decoded_frame(REPO / "datasets/sample/videos/lp_d20_man_talking_outdoor_audio.mp4")
    rgb = frame.to_ndarray(format="rgb24")
    for cx, cy, side in ((240.0, 200.5, 300.25), (240.0, 240.0, 480.0), (100.0, 120.0, 90.0)):  # shrink, same, enlarge
        out = av.VideoFrame(256, 256, "yuv420p")
        crop_frame_yuv420(yuv420_planes(frame), cx, cy, side, yuv420_planes(out))
        painted = out.to_ndarray(format="rgb24").astype(np.int16)
        expected = crop_frame(rgb, cx, cy, side, 256).astype(np.int16)
        assert painted.std() > 10  # painted in place: the encoder's frame is not left blank
        assert np.median(np.abs(painted - expected)) <= 3


def test_band_stack_holds_both_bands_at_the_detection_scale():
    lay = band_layout(640, 360, 576, 0.2, 0.3)  # 16:9: the frame is scaled to 576 rows
    assert (lay.det_w, lay.det_h, lay.top_rows, lay.bottom_rows) == (1024, 576, 115, 173)
    assert lay.stack_w % 32 == 0 and lay.stack_h % 32 == 0 and lay.stack_h < lay.det_h  # ~half a frame
    frame = np.zeros((360, 640, 3), np.uint8)
    frame[:, :, 0] = np.arange(360)[:, None] * 255 // 359  # red = row
    stack = stack_bands(frame, lay)
    assert stack[0, 0, 0] == 0 and abs(int(stack[lay.top_rows - 1, 0, 0]) - 0.2 * 255) < 3
    first_bottom = lay.bottom_offset
    assert abs(int(stack[first_bottom, 0, 0]) - 0.7 * 255) < 3 and abs(int(stack[first_bottom + lay.bottom_rows - 1, 0, 0]) - 255) < 3
    # a source box in the bottom band maps to stack rows and back to shares of the frame height
    x0, y0, x1, y1 = lay.stack_box((64, 324, 320, 342), "bottom")
    assert (x0, x1) == (102.4, 512.0) and lay.frame_y(y0, "bottom") == pytest.approx(0.9) and lay.frame_y(y1, "bottom") == pytest.approx(0.95)
    assert lay.stack_box((0, 100, 10, 200), "bottom") is None and lay.band_of(y0) == "bottom" and lay.band_of(10) == "top"


def _poly(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], float)


def test_text_lines_are_joined_line_shaped_and_off_the_face():
    cfg, lay = CurateConfig(), band_layout(512, 512, 576, 0.2, 0.3)
    b = lay.bottom_offset  # bottom band rows start here; it shows frame rows 403..576 at scale 576/512
    polys = np.stack([
        _poly(100, b + 120, 200, b + 140), _poly(210, b + 121, 330, b + 141),  # two words of one line: joined
        _poly(0, b, 576, b + 170),  # the detector's whole-band box on a frame without text: too tall
        _poly(20, 30, 60, 50),  # 2:1, not line-shaped
        _poly(200, b + 20, 400, b + 40),  # on the face above the chin (mouth): ignored
    ])
    face = (150.0, 150.0, 400.0, 520.0)  # source px; chin = bottom 15 %: frame rows > 464.5
    lines, bands = line_boxes(polys, lay, face, cfg)
    assert lines.tolist() == [[100, b + 120, 330, b + 141]] and bands == ("bottom",)
    no_face, _ = line_boxes(polys, lay, None, cfg)
    assert len(no_face) == 2  # the mouth-level line counts without a face box


def _stack_with(texts: list[tuple[str, int, int]], seed: int = 0) -> np.ndarray:
    """A grey band stack (576 x 320, the layout of a 512² frame) of textured background with
    white text lines (text, x, baseline y)."""
    import cv2

    rng = np.random.default_rng(seed)
    grey = cv2.GaussianBlur(rng.integers(60, 140, (320, 576)).astype(np.uint8), (0, 0), 3)
    for text, x, y in texts:
        cv2.putText(grey, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, 0.6, 255, 2)
    return grey


def _sample(frame: int, texts: list[tuple[str, int, int]], seed: int, face=None) -> TextSample:
    """A TextSample whose line boxes are the drawn texts' own boxes (the detector's job done)."""
    import cv2

    lay = band_layout(512, 512, 576, 0.2, 0.3)
    boxes = []
    for text, x, y in texts:
        (w, h), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.6, 2)
        boxes.append([x - 4, y - h - 4, x + w + 4, y + base + 4])
    return TextSample(frame, _stack_with(texts, seed), np.array(boxes, float).reshape(-1, 4),
                      tuple(lay.band_of((b[1] + b[3]) / 2) for b in boxes), face)


def test_pair_verdicts_tell_replaced_moved_and_hidden_text_apart():
    cfg, lay = CurateConfig(), band_layout(512, 512, 576, 0.2, 0.3)
    y = lay.bottom_offset + 140  # a bottom-band line
    a = _sample(0, [("check the subtitles", 150, y)], seed=0)
    assert pair_verdict(a, 0, _sample(1, [("check the subtitles", 152, y + 2)], seed=1), lay, cfg) == "same"  # shake
    assert pair_verdict(a, 0, _sample(1, [("check the subtitles", 190, y - 20)], seed=1), lay, cfg) == "moved"
    assert pair_verdict(a, 0, _sample(1, [("before any training", 150, y)], seed=1), lay, cfg) == "changed"
    gone = _sample(1, [], seed=1)
    assert pair_verdict(a, 0, gone, lay, cfg) == "changed"  # nothing there any more, no one in front
    hidden = _sample(1, [], seed=1, face=(300.0, 100.0, 420.0, 350.0))  # the speaker (face box widened) covers it
    assert pair_verdict(a, 0, hidden, lay, cfg) == "hidden"
    # half of the line still shows (the rest hidden): the same text
    part = _sample(1, [("check the subtitles", 150, y)], seed=1)
    part.grey[:, 260:] = _stack_with([], seed=1)[:, 260:]
    part.lines[0, 2] = 262
    assert pair_verdict(a, 0, part, lay, cfg) == "same"


def test_text_decision_names_the_most_intrusive_kind():
    cfg, lay = CurateConfig(), band_layout(512, 512, 576, 0.2, 0.3)
    y, top = lay.bottom_offset + 140, 60
    lines = ["and that is why", "we always check", "the subtitles", "before training"]
    captions = [_sample(10 * k, [(t, 180, y), ("CP24", 480, top)], seed=k) for k, t in enumerate(lines)]
    keep, reason, score, kind, detail = text_decision(captions, lay, cfg)
    assert (keep, reason, kind) == (False, "text_overlay", "caption") and score > 0
    assert detail.startswith("caption in the bottom band at ") and "4/4 samples (frames 0, 10, 20, 30)" in detail
    logo_only = [_sample(10 * k, [("CP24", 480, top)], seed=k) for k in range(4)]
    assert text_decision(logo_only, lay, cfg)[:2] + text_decision(logo_only, lay, cfg)[3:4] == (True, "", "static")
    once = [_sample(0, [("and that is why", 180, y)], seed=0)] + [_sample(10 * k, [], seed=k) for k in range(1, 4)]
    assert text_decision(once, lay, cfg)[3] == "scene"  # comes and goes in 1 of 4 samples: not a caption
    twice = once[:1] + [_sample(10, [("we always check", 180, y)], seed=1)] + once[2:]
    assert text_decision(twice, lay, cfg)[3] == "caption"  # in half of the samples: text_min_frames_ratio
    news = "+++ MARKETS CLOSE HIGHER +++ STORM WARNING +++"
    ticker = [_sample(10 * k, [(news[k * 3:] + news[: k * 3], 2, y)], seed=k) for k in range(4)]
    for s in ticker:
        s.lines[0, 0], s.lines[0, 2] = 0, lay.det_w - 10  # the scrolling text runs (almost) edge to edge
    assert text_decision(ticker, lay, cfg)[3] == "ticker"
    assert text_decision([], None, cfg) == (True, "", 0.0, "none", "")
    assert text_decision([_sample(0, [], seed=0)] * 2, lay, cfg)[3] == "none"


def test_the_text_step_stops_only_when_no_caption_is_possible():
    cfg, lay = CurateConfig(), band_layout(512, 512, 576, 0.2, 0.3)
    y = lay.bottom_offset + 140
    clean = [_sample(10 * k, [], seed=k) for k in range(4)]
    assert caption_possible(clean[:2], 4, cfg)  # the last two could still hold a caption (2 of 4)
    assert not caption_possible(clean[:3], 4, cfg)  # one left: at most 1 of 4
    lined = [_sample(0, [("and that is why", 180, y)], seed=0)] + clean[1:]
    assert caption_possible(lined[:3], 4, cfg)
    # stopping never changes the verdict: every way of completing the examined samples keeps the span
    fills = [_sample(30, [("we always check", 180, y)], seed=9), _sample(30, [("CP24", 480, 60)], seed=9), clean[3]]
    for fill in fills:
        assert text_decision(clean[:3] + [fill], lay, cfg).keep
    assert text_decision(clean[:3], lay, cfg).keep


def test_dark_faces_are_underexposed_not_blurry():
    cfg = CurateConfig()
    assert quality_decision(5.0, 15.0, cfg) == (False, "underexposed")
    assert quality_decision(5.0, 120.0, cfg) == (False, "blurry")
    assert quality_decision(200.0, 240.0, cfg) == (False, "overexposed")
    assert quality_decision(200.0, 120.0, cfg) == (True, "")


def test_config_validation_names_valid_choices():
    with pytest.raises(ConfigError, match="adaptive, content"):
        CurateConfig(scene_detector="histogram")
    with pytest.raises(ConfigError, match="max_duration_s"):
        CurateConfig(min_duration_s=5, max_duration_s=8)


def test_clip_ids_are_deterministic():
    assert clip_id_for("v", 0, 75) == clip_id_for("v", 0, 75) != clip_id_for("v", 0, 76)


def test_rows_carry_typed_columns_with_one_schema():
    """A rejected row (empty lists) and a kept one give the same Arrow types: blocks share one schema."""
    import pyarrow as pa

    from cogportrait.curate.steps import ROW_DEFAULTS, ROW_SCHEMA, new_row, reject, rows_table

    assert ROW_SCHEMA.names == list(ROW_DEFAULTS)
    empty = rows_table([reject(new_row({"video_id": "a", "manifest_row": 0}), "probe", "missing_file")])
    kept = new_row({"video_id": "b", "manifest_row": 1})
    kept.update(
        times=np.arange(3, dtype=np.float64).tolist(), track_frames=[0, 2], track_boxes=[[1.0, 2.0, 3.0, 4.0]] * 2,
        text_frames=[1], text_jpegs=[b"\xff\xd8"], crop_box=[0.0, 0.0, 10.0, 10.0], crop_track=[[5.0, 5.0, 10.0]] * 3,
    )
    full = rows_table([kept])
    assert empty.schema.equals(ROW_SCHEMA) and full.schema.equals(ROW_SCHEMA)
    assert ROW_SCHEMA.field("times").type == pa.list_(pa.float64())
    assert ROW_SCHEMA.field("track_boxes").type == pa.list_(pa.list_(pa.float64(), 4))
    back = full.to_pylist()[0]
    assert back["track_frames"] == [0, 2] and back["track_boxes"][1] == [1.0, 2.0, 3.0, 4.0]
    assert back["times"] == [0.0, 1.0, 2.0] and back["text_jpegs"] == [b"\xff\xd8"]
    with pytest.raises(KeyError):
        rows_table([{"video_id": "x"}])
    both = rows_table([*empty.to_pylist(), *full.to_pylist()])  # a block of a rejected and a kept span
    assert both.schema.equals(ROW_SCHEMA) and both.column("video_id").to_pylist() == ["a", "b"]


def test_text_frames_round_trip_as_jpegs():
    from cogportrait.curate.text import decode_frames, encode_frames

    rng = np.random.default_rng(0)
    frames = {12: np.full((32, 48, 3), 200, np.uint8), 3: rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)}
    idx, jpegs = encode_frames(frames)
    assert idx == [3, 12] and all(isinstance(j, bytes) for j in jpegs)
    back = decode_frames(idx, jpegs)
    assert sorted(back) == [3, 12] and back[12].shape == (32, 48, 3)
    assert np.abs(back[12].astype(int) - 200).max() <= 2
    assert encode_frames({}) == ([], []) and decode_frames([], []) == {}


def test_reject_order_is_total_and_follows_the_manifest():
    from cogportrait.curate.steps import reject_sort_key

    def rec(row, stage, reason, start=None, end=None, start_s=None):
        return {"video_id": f"v{row}", "stage": stage, "reason": reason, "detail": "", "manifest_row": row,
                "path": "p", "start_frame": start, "end_frame": end, "start_s": start_s}

    recs = [
        rec(2, "face_track", "no_face", 75, 100, 3.0),
        rec(2, "scenes", "too_short", 0, 75, 0.0),
        {"video_id": "v0", "stage": "manifest", "reason": "duplicate_id", "detail": "", "manifest_row": 0, "path": "p"},
        rec(1, "probe", "too_short", None, None, 0.0),
        rec(2, "scenes", "decode_error", 300, 310, 12.0),
    ]
    ordered = sorted(recs, key=reject_sort_key)
    assert [(r["manifest_row"], r.get("start_frame")) for r in ordered] == [(0, None), (1, None), (2, 0), (2, 75), (2, 300)]
    assert sorted(reversed(recs), key=reject_sort_key) == ordered
