"""The extract job on the curated sample clips and on hand-made edge cases (real frames)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cogportrait.face.extract import list_column, read_frames
from cogportrait.schema import CLIPS_SCHEMA, FRAMES_SCHEMA, KEYPOINT_INDICES, REJECT_REASONS

pytestmark = pytest.mark.slow


def _clip(table, clip_id):
    return table.filter(pc.equal(table.column("clip_id"), clip_id)).sort_by("frame")


def test_every_clip_frame_has_a_row(curated_sample, extracted_sample):
    clips = pq.read_table(curated_sample / "clips.parquet")
    frames = read_frames(extracted_sample)
    assert frames.schema.equals(FRAMES_SCHEMA)
    assert (extracted_sample / "frames.parquet").exists()
    assert not list(extracted_sample.glob(".frames-parts.*")), "temporary parts left behind"
    counts = dict(zip(*np.unique(frames.column("clip_id").to_pylist(), return_counts=True)))
    kept = pq.read_table(extracted_sample / "clips.parquet", schema=CLIPS_SCHEMA)
    rejects = pq.read_table(extracted_sample / "rejects.parquet")
    assert kept.num_rows + rejects.num_rows == clips.num_rows
    for row in clips.select(["clip_id", "n_frames"]).to_pylist():
        assert counts[row["clip_id"]] == row["n_frames"]
        frame = _clip(frames, row["clip_id"]).column("frame").to_numpy()
        assert np.array_equal(frame, np.arange(row["n_frames"]))  # 0-based, 25 fps, no gaps
    # kept clips' paths are rewritten relative to the new table's folder
    for p in kept.column("clip_path").to_pylist():
        assert (extracted_sample / p).is_file()


def test_no_nan_where_a_face_is_present(extracted_sample):
    frames = read_frames(extracted_sample)
    present = np.asarray(frames.column("face_present").to_pylist())
    assert present.mean() > 0.95
    for name, n in (("landmarks", 478 * 3), ("blendshapes", 52), ("transform", 16), ("keypoints", 186), ("gaze", 4), ("head_pose", 3)):
        arr = list_column(frames, name, n)
        assert np.isfinite(arr[present]).all(), name
    au = list_column(frames, "au", 10)
    assert np.isfinite(np.delete(au[present], 7, axis=1)).all()
    assert np.isnan(au[:, 7]).all()  # AU41 is left to invert (it needs the neutral)
    assert ((au[present][:, [0, 1, 2, 3, 4, 5, 6, 8, 9]] >= 0) & (au[present][:, [0, 1, 2, 3, 4, 5, 6, 8, 9]] <= 1)).all()
    # keypoints are the 62 listed landmarks, in [0, 1] of the 512 crop
    lm = list_column(frames, "landmarks", 478 * 3)[present].reshape(-1, 478, 3)
    kp = list_column(frames, "keypoints", 186)[present].reshape(-1, 62, 3)
    assert np.allclose(kp, lm[:, list(KEYPOINT_INDICES)])
    assert (kp[..., :2] > 0).all() and (kp[..., :2] < 1).all()
    assert set(frames.column("width").to_pylist()) == {512}


def test_metrics_written(extracted_sample):
    m = json.loads((extracted_sample / "metrics.json").read_text())
    assert m["frames"] > 1000 and m["clips"] == m["clips_in"] and m["face_present_ratio"] > 0.95


def test_edge_cases_end_in_a_table(edge_clips, edge_extracted):
    frames = read_frames(edge_extracted)
    kept = set(pq.read_table(edge_extracted / "clips.parquet").column("clip_id").to_pylist())
    rejects = {r["video_id"]: r for r in pq.read_table(edge_extracted / "rejects.parquet").to_pylist()}
    assert kept | set(rejects) == {f"edge-{n}" for n in ("face_loss", "one_frame", "mirrored", "missing", "zero_frame")}
    assert not kept & set(rejects)
    assert rejects["edge-missing"]["reason"] == "missing_file"
    assert rejects["edge-zero_frame"]["reason"] == "no_frames"
    assert all(r["reason"] in REJECT_REASONS and r["stage"] == "extract" for r in rejects.values())
    one = _clip(frames, "edge-one_frame")
    assert one.num_rows == 1 and one.column("face_present")[0].as_py()


def test_face_loss_keeps_row_counts(edge_extracted):
    clip = _clip(read_frames(edge_extracted), "edge-face_loss")
    assert clip.num_rows == 78
    present = np.asarray(clip.column("face_present").to_pylist())
    assert not present[31:44].any()  # the blacked-out frames (the tracker may hold one frame)
    assert present[:29].all() and present[47:].all()
    lost = clip.filter(pc.invert(clip.column("face_present")))
    assert lost.column("landmarks").null_count == lost.num_rows  # null, not made-up values
    assert lost.column("face_score").to_pylist() == [0.0] * lost.num_rows


def test_mirrored_clip_keeps_the_subjects_left(edge_extracted, extracted_sample, curated_sample):
    """lp_d3 frames 6-16: the subject's LEFT eye is closed (looked at). The flipped copy,
    flagged mirrored, must report the same eye; its keypoints follow the subject's eyes."""
    from conftest import clip_ids_by_video

    mir = _clip(read_frames(edge_extracted), "edge-mirrored")
    orig = _clip(read_frames(extracted_sample), clip_ids_by_video(curated_sample / "clips.parquet")["lp_d3"][0])
    for table in (orig, mir):
        au = list_column(table, "au", 10)[6:17]
        assert np.median(au[:, 8] - au[:, 9]) > 0.2  # AU45L > AU45R: the left eye is the closed one
    kp_m = list_column(mir, "keypoints", 186).reshape(-1, 62, 3)
    kp_o = list_column(orig, "keypoints", 186)[:60].reshape(-1, 62, 3)
    # the subject's left eye sits on the image right normally, on the image left when mirrored
    assert (kp_o[:, :16, 0].mean(axis=1) > kp_o[:, 16:32, 0].mean(axis=1)).all()
    assert (kp_m[:, :16, 0].mean(axis=1) < kp_m[:, 16:32, 0].mean(axis=1)).all()
    assert np.allclose(kp_m[:, :16, 0], 1 - kp_o[:, :16, 0], atol=0.02)
    yaw_o = list_column(orig, "head_pose", 3)[:60, 0]
    yaw_m = list_column(mir, "head_pose", 3)[:, 0]
    assert np.abs(yaw_m - yaw_o).mean() < 2.0  # mirrored yaw was negated back


def test_rerun_into_a_new_folder_is_byte_identical(curated_sample, extracted_sample, ray_session):
    """Same clips, same config: byte-identical tables, whatever order Ray finished the clips in.
    frames.parquet follows the input clips' order, frames ascending, one row group per clip."""
    import hashlib

    from cogportrait.config import ExtractConfig
    from pipelines.extract import run

    # a sibling of the first output: the clip paths it stores, relative to itself, are then the same
    again = Path(tempfile.mkdtemp(prefix="extracted_again", dir=extracted_sample.parent))
    run(ExtractConfig(clips=str(curated_sample / "clips.parquet"), out=str(again), num_workers=2))
    for name in ("frames.parquet", "clips.parquet", "rejects.parquet"):
        first = hashlib.sha256((extracted_sample / name).read_bytes()).hexdigest()
        assert hashlib.sha256((again / name).read_bytes()).hexdigest() == first, name
    order = pq.read_table(curated_sample / "clips.parquet", columns=["clip_id"]).column("clip_id").to_pylist()
    assert pq.read_table(again / "clips.parquet", columns=["clip_id"]).column("clip_id").to_pylist() == order
    pf = pq.ParquetFile(again / "frames.parquet")
    assert pf.num_row_groups == len(order)
    for i, cid in enumerate(order):
        group = pf.read_row_group(i, columns=["clip_id", "frame"])
        assert set(group.column("clip_id").to_pylist()) == {cid}
        assert group.column("frame").to_pylist() == list(range(group.num_rows))


def test_a_clip_that_breaks_after_probing_keeps_its_reason(curated_sample, tmp_path_factory, ray_session):
    """A clip the probe accepted, then decoding fails in the landmark step: the reject carries that
    step's VideoError (reason and detail), not a generic ``decode_error``."""
    import pyarrow as pa

    from conftest import SAMPLE, clip_ids_by_video
    from media import truncated_faststart

    from cogportrait.config import ExtractConfig
    from cogportrait.io.atomic import write_table
    from pipelines.extract import LandmarkClip, probe_clip, run

    folder = tmp_path_factory.mktemp("broken_after_probe")
    src = curated_sample / "clips" / f"{clip_ids_by_video(curated_sample / 'clips.parquet')['lp_d0'][0]}.mp4"
    clip = folder / "clip.mp4"
    clip.write_bytes(src.read_bytes())
    row = {"index": 0, "clip_id": "clip", "abs_path": str(clip), "mirrored": False, "part_path": str(folder / "part.parquet"),
           "reason": "", "detail": "", "n_src_frames": 0, "n_frames": 0, "n_face": 0}
    probed = probe_clip(row)
    assert probed["reason"] == "" and probed["n_src_frames"] > 0
    clip.write_bytes(src.read_bytes()[: src.stat().st_size // 2])  # cut after probing: the index (at the end) is lost

    step = LandmarkClip(ExtractConfig())
    out = step(probed)
    assert out["reason"] == "undecodable" and out["detail"].startswith("clip.mp4"), out
    assert out["n_frames"] == 0 and not (folder / "part.parquet").exists()
    clip.unlink()
    gone = step(probed)  # deleted after probing
    assert gone["reason"] == "missing_file" and "clip.mp4" in gone["detail"]
    rejected = dict(probed, reason="no_frames", detail="from the probe")
    assert step(rejected) == rejected  # a probe reject passes through untouched

    # the whole job: a faststart file cut in half opens (its index is intact) and passes the
    # probe, then breaks part-way through decoding in the landmark step
    truncated_faststart(SAMPLE / "videos" / "lp_d0_man_greenscreen_gaze_blink.mp4", folder / "cut.mp4", keep=0.5)
    rows = [{"clip_id": "cut", "video_id": "cut", "clip_path": "cut.mp4", "label": "edge case"}]
    write_table(folder / "clips.parquet", pa.Table.from_pylist(rows, schema=CLIPS_SCHEMA), CLIPS_SCHEMA)
    assert probe_clip(dict(row, abs_path=str(folder / "cut.mp4")))["reason"] == ""
    out_dir = folder / "out"
    run(ExtractConfig(clips=str(folder / "clips.parquet"), out=str(out_dir), num_workers=2))
    rejects = pq.read_table(out_dir / "rejects.parquet").to_pylist()
    assert [(r["video_id"], r["stage"], r["reason"]) for r in rejects] == [("cut", "extract", "decode_error")]
    assert rejects[0]["detail"].startswith("cut.mp4 frame "), rejects[0]["detail"]  # the VideoError's own detail
    assert pq.read_table(out_dir / "clips.parquet").num_rows == 0
    assert pq.read_table(out_dir / "frames.parquet").num_rows == 0
    assert json.loads((out_dir / "metrics.json").read_text())["rejects_by_reason"] == {"extract/decode_error": 1}
