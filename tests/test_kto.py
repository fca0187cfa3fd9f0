"""KTO boundary-case mining: finds planted windows, none in calm clips; identity split has no overlap."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from cogportrait.config import KtoConfig
from cogportrait.io.atomic import write_table
from cogportrait.behavior.kto import mine_clip, split_identities
from cogportrait.schema import CHANNEL_INDEX as C, CLIPS_SCHEMA, CONTROLS_SCHEMA, EVENTS_SCHEMA, KTO_SCHEMA, N_CHANNELS

FPS = 25
CFG = KtoConfig()


def calm(n=150, seed=0) -> np.ndarray:
    """Talking-head rest: small noise, a normal blink every ~3 s, head within ±6°."""
    rng = np.random.default_rng(seed)
    c = np.zeros((n, N_CHANNELS))
    c[:, :14] = 0.05 + rng.normal(0, 0.01, size=(n, 14))
    c[:, 14:] = 4 * np.sin(np.linspace(0, 3, n))[:, None] + rng.normal(0, 0.5, size=(n, 3))
    for t in range(20, n - 6, 75):
        c[t : t + 5, [C["AU45L"], C["AU45R"]]] = 0.8
    return c


def with_head_turn(c, start=40, peak=52.0):
    c = c.copy()
    shape = np.sin(np.linspace(0, np.pi, 30))
    c[start : start + 30, C["yaw"]] += peak * shape
    return c


def with_asym_brow(c, start=50, side="L"):
    c = c.copy()
    c[start : start + 15, C["AU2" + side]] = 0.7
    return c


def with_erratic_gaze(c, start=30):
    c = c.copy()
    for i in range(6):
        s = start + i * 10
        ch = "gaze_left" if i % 2 == 0 else "gaze_right"
        c[s : s + 10, C[ch]] = 0.45
    return c


def with_rapid_blinks(c, start=20, count=7, every=13):
    c = c.copy()
    for i in range(count):
        s = start + i * every
        c[s : s + 4, [C["AU45L"], C["AU45R"]]] = 0.85
    return c


def cats(windows):
    return {w.category for w in windows}


def planted_events(c: np.ndarray, clip_id: str = "c") -> list[dict]:
    """The blink events invert would report for the planted closures (mean AU45 above 0.5; end inclusive)."""
    closed = np.r_[False, c[:, [C["AU45L"], C["AU45R"]]].mean(axis=1) > 0.5, False]
    edges = np.flatnonzero(np.diff(closed.astype(int)))
    return [{"clip_id": clip_id, "event_type": "blink", "start_frame": int(s), "end_frame": int(e) - 1, "apex_frame": int(s),
             "eyes": "both", "peak": 0.8, "amplitude": 0.8} for s, e in zip(edges[::2], edges[1::2])]


def mine(c: np.ndarray, cfg: KtoConfig = CFG):
    return mine_clip(c, None, planted_events(c), cfg)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_calm_clips_give_nothing(seed):
    assert mine(calm(seed=seed)) == []


@pytest.mark.parametrize(
    "build, category",
    [
        (with_head_turn, "large_head_motion"),
        (with_asym_brow, "asymmetric_brow"),
        (with_erratic_gaze, "erratic_gaze"),
        (with_rapid_blinks, "rapid_blink"),
    ],
)
def test_planted_boundary_cases_are_found(build, category):
    windows = mine(build(calm()))
    assert cats(windows) == {category}
    for w in windows:
        assert 3 * FPS <= w.end_frame - w.start_frame <= 5 * FPS
        assert w.start_frame <= w.reference_frame < w.end_frame
        assert w.prompt
    # the window covers the planted behaviour
    assert any(w.start_frame <= 45 and w.end_frame >= 60 for w in windows)


def test_details_and_near_misses():
    head = mine(with_head_turn(calm(), peak=-50.0))
    assert "right" in head[0].prompt and head[0].detail["channel"] == "yaw"
    assert mine(with_head_turn(calm(), peak=35.0)) == []  # below 40°
    brow = mine(with_asym_brow(calm(), side="R"))
    assert brow[0].detail["side"] == "right"
    sym = calm()
    sym[50:65, [C["AU2L"], C["AU2R"]]] = 0.7  # both brows: not asymmetric
    assert mine(sym) == []
    one_look = calm()
    one_look[40:80, C["gaze_left"]] = 0.5  # one look aside and back: not erratic
    assert mine(one_look) == []
    assert mine(with_rapid_blinks(calm(), count=3)) == []  # too few
    assert mine(with_head_turn(calm(n=70), start=10)) == []  # clip shorter than 3 s


def test_identity_split_has_no_overlap():
    ids = [f"p{i}" for i in range(40)] * 3
    split = split_identities(ids, 0.125, seed=0)
    test = {i for i, s in split.items() if s == "test"}
    assert len(test) == 5 and len(set(split) - test) == 35
    assert split == split_identities(list(reversed(ids)), 0.125, seed=0)  # order-independent
    assert set(split_identities(["only"], 0.5).values()) == {"train"}


def test_kto_job(ray_session, tmp_path):
    from pipelines.kto import run

    builders = [with_head_turn, with_asym_brow, with_erratic_gaze, with_rapid_blinks, lambda c: c, lambda c: c]
    clips, controls, events = [], [], []
    for i, b in enumerate(builders):
        cid = f"clip{i}"
        ctrl = b(calm(seed=i))
        events += planted_events(ctrl, cid)
        clips.append(dict(clip_id=cid, video_id=f"v{i}", clip_path=f"clips/{cid}.mp4", audio_path=f"audio/{cid}.wav",
                          has_audio=True, label="x", identity=f"person{i % 4}"))
        controls += [dict(clip_id=cid, frame=f, face_present=True, controls=ctrl[f].tolist(), residual_error=0.02)
                     for f in range(len(ctrl))]
    write_table(tmp_path / "curate" / "clips.parquet", clips, CLIPS_SCHEMA)
    write_table(tmp_path / "invert" / "controls.parquet", controls, CONTROLS_SCHEMA)
    write_table(tmp_path / "invert" / "events.parquet", events, EVENTS_SCHEMA)
    metrics = run(KtoConfig(controls=str(tmp_path / "invert"), clips=str(tmp_path / "curate" / "clips.parquet"),
                            out=str(tmp_path / "kto"), test_fraction=0.25,
                            frames=str(tmp_path / "extract" / "frames.parquet")))  # not the repo's data/extract
    table = pq.read_table(tmp_path / "kto" / "kto.parquet")
    assert table.schema == KTO_SCHEMA
    rows = table.to_pylist()
    assert {r["category"] for r in rows} == {"large_head_motion", "asymmetric_brow", "erratic_gaze", "rapid_blink"}
    assert {r["clip_id"] for r in rows} <= {"clip0", "clip1", "clip2", "clip3"}
    train = {r["identity"] for r in rows if r["split"] == "train"}
    test = {r["identity"] for r in rows if r["split"] == "test"}
    assert train and test and not (train & test) and metrics["identities"]["overlap"] == 0
    for r in rows:
        assert r["desirable"] and r["prompt"] and r["audio_path"].endswith(".wav")
        assert r["audio_end_s"] - r["audio_start_s"] == pytest.approx((r["end_frame"] - r["start_frame"]) / FPS)
        assert r["keypoints"] is None  # this synthetic upstream has no frames.parquet


def test_kto_job_on_real_sample(ray_session, library_upstream, tmp_path):
    from pipelines.kto import run

    metrics = run(KtoConfig(controls=str(library_upstream["controls"]), frames=str(library_upstream["frames"]),
                            clips=str(library_upstream["clips"]), out=str(tmp_path), test_fraction=0.3))
    rows = pq.read_table(tmp_path / "kto.parquet").to_pylist()
    assert metrics["identities"]["overlap"] == 0
    train = {r["identity"] for r in rows if r["split"] == "train"}
    test = {r["identity"] for r in rows if r["split"] == "test"}
    assert not (train & test)
    for r in rows:
        n = r["end_frame"] - r["start_frame"]
        assert 3 * FPS <= n <= 5 * FPS and r["start_frame"] <= r["reference_frame"] < r["end_frame"]
        assert len(r["keypoints"]) == n and len(r["keypoints"][0]) == 124
        assert r["prompt"] and r["video_path"]
