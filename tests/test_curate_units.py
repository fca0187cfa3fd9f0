"""Curation maths without Ray: manifest validation, span arithmetic, crop geometry, filters."""

from __future__ import annotations

import numpy as np
import pytest

from cogportrait.config import ConfigError, CurateConfig
from cogportrait.curate.crop import crop_track
from cogportrait.curate.filters import TextFrame, quality_decision, text_area, text_decision
from cogportrait.curate.manifest import ManifestError, read_manifest
from cogportrait.curate.spans import Span, apply_duration_limits, segment_face_runs
from cogportrait.curate.tracking import classify_detections
from cogportrait.schema import clip_id_for


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


def test_text_rule_ignores_small_boxes_and_the_face():
    sub = np.array([[[100, 900], [900, 900], [900, 960], [100, 960]]], float)
    in_face = np.array([[[400, 400], [600, 400], [600, 450], [400, 450]]], float)
    speck = np.array([[[10, 10], [30, 10], [30, 15], [10, 15]]], float)
    face = (300.0, 300.0, 700.0, 700.0)
    assert text_area(sub, 1000, 1000, face, 0.02).area_fraction == pytest.approx(0.048)
    assert text_area(in_face, 1000, 1000, face, 0.02).n_boxes == 0
    assert text_area(speck, 1000, 1000, face, 0.02).n_boxes == 0
    cfg = CurateConfig()
    assert text_decision([TextFrame(0.05, 1)] * 2 + [TextFrame(0.0, 0)], cfg)[:2] == (False, "text_overlay")
    assert text_decision([TextFrame(0.05, 1)] + [TextFrame(0.0, 0)] * 2, cfg)[0]


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

    from cogportrait.curate.steps import ROW_DEFAULTS, ROW_SCHEMA, apply_step, new_row, reject, rows_table

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

    def split(row: dict) -> list[dict]:  # a 1:N step
        return [dict(row, scene_index=i) for i in range(3)]

    out = apply_step(split, pa.concat_tables([empty, full]))
    assert out.schema.equals(ROW_SCHEMA) and out.column("scene_index").to_pylist() == [0, 1, 2, 0, 1, 2]


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
