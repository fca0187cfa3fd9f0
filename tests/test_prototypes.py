"""prototypes stage: segmentation rules (pure) and the Ray job (same output as the local build)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from cogportrait.config import PrototypesConfig
from cogportrait.schema import CHANNEL_INDEX, N_CHANNELS, PROTOTYPE_FLAT_STAT_COLUMNS, PROTOTYPES_SCHEMA
from prototype_store.fingerprint import parquet_fingerprint, stored_fingerprint
from cogportrait.behavior.segment import ClipTrajectory, channel_stats, kept_prototypes, segment_clip


def _clip(n=100, events=(), present=None) -> ClipTrajectory:
    rng = np.random.default_rng(0)
    c = rng.uniform(0, 0.1, size=(n, N_CHANNELS)).astype(np.float32)
    return ClipTrajectory(
        clip_id="c1", controls=c, present=np.ones(n, bool) if present is None else present,
        keypoints=rng.uniform(0, 1, size=(n, 62, 2)).astype(np.float32), residual=np.full(n, 0.02, np.float32),
        events=list(events), label="drowsiness", identity="p1", video_id="v1",
    )


def test_event_prototypes_have_context_and_windows_carry_label():
    cfg = PrototypesConfig(context_pad_s=0.2, window_s=2.0, window_hop_s=1.0)
    ev = {"event_type": "blink", "start_frame": 40, "end_frame": 45, "apex_frame": 42, "eyes": "both"}
    rows, dropped = kept_prototypes(segment_clip(_clip(events=[ev]), cfg))
    assert not dropped
    blinks = [r for r in rows if r["event_type"] == "blink"]
    assert len(blinks) == 1
    b = blinks[0]
    assert (b["start_frame"], b["end_frame"], b["T"]) == (35, 51, 16)  # 5 frames of context each side
    windows = [r for r in rows if r["event_type"] == "window"]
    assert [w["start_frame"] for w in windows] == [0, 25, 50]
    assert all(w["T"] == 50 and w["label"] == "drowsiness" for w in rows if w["event_type"] == "window")
    assert set(PROTOTYPES_SCHEMA.names) - set(PROTOTYPE_FLAT_STAT_COLUMNS) == set(b)  # flat stats: derived on write
    assert np.asarray(b["controls"]).shape == (16, N_CHANNELS)
    assert np.asarray(b["keypoints"]).shape == (16, 124)
    # deterministic ids
    rows2, _ = kept_prototypes(segment_clip(_clip(events=[ev]), cfg))
    assert [r["prototype_id"] for r in rows] == [r["prototype_id"] for r in rows2]


def test_long_events_truncated_and_flags():
    cfg = PrototypesConfig(context_pad_s=0.2, max_event_s=1.0)
    ev = {"event_type": "fixation", "start_frame": 0, "end_frame": 89, "apex_frame": 60, "eyes": ""}
    present = np.ones(100, bool)
    present[70:73] = False
    rows, _ = kept_prototypes(segment_clip(_clip(events=[ev], present=present), cfg))
    fix = [r for r in rows if r["event_type"] == "fixation"][0]
    assert fix["T"] == 25 + 2 * 5
    assert {"truncated", "face_gaps"} <= set(fix["quality_flags"])
    assert 0.9 < fix["face_coverage"] < 1.0
    low, dropped = kept_prototypes(segment_clip(_clip(events=[ev], present=np.zeros(100, bool)), cfg))
    assert low == [] and dropped["low_face_coverage"] > 0  # every candidate ends as a row: dropped, with its reason


def test_channel_peak_keeps_sign_of_head_angles():
    c = np.zeros((10, N_CHANNELS), np.float32)
    c[:, CHANNEL_INDEX["pitch"]] = [0, -3, -9, -14, -8, -2, 0, 1, 2, 1]
    c[:, CHANNEL_INDEX["AU45L"]] = [0, 0.2, 0.9, 0.3, 0, 0, 0, 0, 0, 0]
    mean, peak = channel_stats(c)
    assert peak[CHANNEL_INDEX["pitch"]] == pytest.approx(-14)
    assert peak[CHANNEL_INDEX["AU45L"]] == pytest.approx(0.9)
    assert mean[CHANNEL_INDEX["AU45L"]] == pytest.approx(0.14)


def test_ray_job_matches_local_build(ray_session, synthetic_upstream, tmp_path):
    from pipelines.prototypes import run
    from prototype_store.build import build_prototypes_local

    kwargs = dict(controls=str(synthetic_upstream["controls"]), clips=str(synthetic_upstream["clips"]))
    metrics = run(PrototypesConfig(out=str(tmp_path / "ray"), **kwargs))
    local = build_prototypes_local(PrototypesConfig(out=str(tmp_path / "local"), **kwargs))
    ray_file, local_file = tmp_path / "ray" / "prototypes.parquet", tmp_path / "local" / "prototypes.parquet"
    assert metrics["prototypes"] == local["prototypes"] > 0
    assert parquet_fingerprint(ray_file) == parquet_fingerprint(local_file) == stored_fingerprint(ray_file)
    table = pq.read_table(ray_file)
    assert table.schema.remove_metadata() == PROTOTYPES_SCHEMA
    ids = table.column("prototype_id").to_pylist()
    keys = list(zip(table.column("label").to_pylist(), table.column("event_type").to_pylist(), ids))
    assert keys == sorted(keys) and len(set(ids)) == len(ids)
    assert set(table.column("event_type").to_pylist()) >= {"window", "blink"}
    assert None not in table.column("label").to_pylist()
    row = table.slice(0, 1).to_pylist()[0]
    ctrl = np.asarray(row["controls"])
    np.testing.assert_allclose(ctrl.mean(axis=0), row["channel_mean"], atol=1e-5)
    # flat copies of the statistics for fast column filters
    assert row["peak_AU45L"] == row["channel_max"][CHANNEL_INDEX["AU45L"]]
    assert row["mean_pitch"] == row["channel_mean"][CHANNEL_INDEX["pitch"]]
    assert (tmp_path / "ray" / "prototypes_metrics.json").exists()


def test_ray_job_on_real_sample(ray_session, library_upstream, sample_library, tmp_path):
    """The Ray job on invert's real sample output equals the local build (the sample library)."""
    from pipelines.prototypes import run

    from cogportrait.schema import EVENT_TYPES

    metrics = run(PrototypesConfig(controls=str(library_upstream["controls"]), frames=str(library_upstream["frames"]),
                                   clips=str(library_upstream["clips"]), out=str(tmp_path)))
    out = tmp_path / "prototypes.parquet"
    assert metrics["prototypes"] > 50
    assert parquet_fingerprint(out) == parquet_fingerprint(sample_library / "prototypes.parquet")
    table = pq.read_table(out)
    assert set(table.column("event_type").to_pylist()) <= set(EVENT_TYPES) | {"window"}
    assert None not in table.column("label").to_pylist() and None not in table.column("identity").to_pylist()
    for row in table.slice(0, 20).to_pylist():
        kp = np.asarray(row["keypoints"])
        assert kp.shape == (row["T"], 124) and 0.0 <= kp.min() and kp.max() <= 1.0
        assert "no_keypoints" not in row["quality_flags"]
