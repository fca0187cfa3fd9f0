"""Stage-2 training samples (training/data.py) on the real curated and extracted sample clips.

Oracles: windows are recomputed from frames.parquet with a plain loop; loader arrays are checked
against the tables' rows and an independent sequential decode (no seek) of the clip.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cogportrait.io.audio import read_wav
from cogportrait.io.video import iter_frames, probe_video
from cogportrait.schema import FRAMES_SCHEMA
from training.data import SampleLoader, Window, plan_windows, window_positions

F = 9  # 4k + 1 frames: small windows keep decoding cheap
STRIDE = 8
RESOLUTION = 96


@pytest.fixture(scope="module")
def tables(curated_sample: Path, extracted_sample: Path) -> dict[str, Path]:
    return {"clips": curated_sample / "clips.parquet", "frames": extracted_sample / "frames.parquet"}


@pytest.fixture(scope="module")
def gappy_frames(extracted_sample: Path, tmp_path_factory) -> Path:
    """The real frames.parquet with faces taken away: a gap in the middle of one clip, a clip with
    a face only on its first F frames, one frame's row deleted from another clip."""
    table = pq.read_table(extracted_sample / "frames.parquet")
    ids = sorted(set(table.column("clip_id").to_pylist()))
    ids_col = np.asarray(table.column("clip_id").to_pylist(), dtype=object)
    frame = table.column("frame").to_numpy()
    present = np.asarray(table.column("face_present").to_pylist(), dtype=bool)
    present[(ids_col == ids[0]) & (frame >= 30) & (frame < 45)] = False
    present[(ids_col == ids[0]) & (frame == 60)] = False
    present[(ids_col == ids[1]) & (frame >= F)] = False
    table = table.set_column(table.schema.get_field_index("face_present"), "face_present", pa.array(present))
    table = table.filter(pc.invert(pc.and_(pc.equal(table.column("clip_id"), ids[2]), pc.equal(table.column("frame"), 20))))
    out = tmp_path_factory.mktemp("gappy") / "frames.parquet"
    pq.write_table(table.cast(FRAMES_SCHEMA), out)
    return out


def _presence(frames_parquet: Path) -> dict[str, dict[int, bool]]:
    out: dict[str, dict[int, bool]] = {}
    for r in pq.read_table(frames_parquet, columns=["clip_id", "frame", "face_present"]).to_pylist():
        out.setdefault(r["clip_id"], {})[r["frame"]] = bool(r["face_present"])
    return out


def _expected_starts(present: dict[int, bool], n_frames: int, stride: int) -> list[int]:
    n = max(present) + 1
    return [s for s in range(0, n - n_frames + 1, stride) if all(present.get(f, False) for f in range(s, s + n_frames))]


def test_n_frames_must_be_4k_plus_1(tmp_path):
    for bad in (0, 8, 16, 48, 50):
        with pytest.raises(ValueError, match="4k"):
            plan_windows(tmp_path / "clips.parquet", tmp_path / "frames.parquet", bad, 1, 0)
    with pytest.raises(ValueError, match="stride"):
        plan_windows(tmp_path / "clips.parquet", tmp_path / "frames.parquet", 9, 0, 0)


@pytest.mark.slow
def test_windows_cover_exactly_the_face_present_spans(tables, gappy_frames):
    windows = plan_windows(tables["clips"], gappy_frames, F, STRIDE, seed=0)
    presence = _presence(gappy_frames)
    expected = {(c, s) for c, p in presence.items() for s in _expected_starts(p, F, STRIDE)}
    assert {(w.clip_id, w.start_frame) for w in windows} == expected
    ids = sorted(presence)
    starts0 = [w.start_frame for w in windows if w.clip_id == ids[0]]
    assert not any(s < 45 and s + F > 30 for s in starts0) and 32 not in starts0  # the gaps cut windows
    assert [w.start_frame for w in windows if w.clip_id == ids[1]] == [0]
    assert 16 not in [w.start_frame for w in windows if w.clip_id == ids[2]]  # covers the deleted row 20
    for w in windows:
        assert w.n_frames == F and Path(w.clip_path).is_absolute() and Path(w.clip_path).is_file()
        assert w.audio_path is None or Path(w.audio_path).is_file()


@pytest.mark.slow
def test_reference_is_outside_the_window_and_far_when_possible(tables, gappy_frames):
    presence = _presence(gappy_frames)
    gap = 25
    windows = plan_windows(tables["clips"], gappy_frames, F, STRIDE, seed=3, min_reference_gap=gap)
    for w in windows:
        outside = [f for f, p in presence[w.clip_id].items() if p and not w.start_frame <= f < w.end_frame]
        if not outside:  # the clip whose only face is its first window
            assert w.reference_frame == w.start_frame
            continue
        dist = {f: (w.start_frame - f if f < w.start_frame else f - w.end_frame + 1) for f in outside}
        assert w.reference_frame in dist
        if max(dist.values()) >= gap:
            assert dist[w.reference_frame] >= gap
    only_face = [w for w in windows if w.clip_id == sorted(presence)[1]]
    assert [w.reference_frame for w in only_face] == [0]
    # with an unreachable gap every reference is the farthest face-present frame (earliest on a tie)
    for w in plan_windows(tables["clips"], gappy_frames, F, STRIDE, seed=3, min_reference_gap=10_000):
        outside = [f for f, p in sorted(presence[w.clip_id].items()) if p and not w.start_frame <= f < w.end_frame]
        if outside:
            dist = [w.start_frame - f if f < w.start_frame else f - w.end_frame + 1 for f in outside]
            assert w.reference_frame == outside[int(np.argmax(dist))]


@pytest.mark.slow
def test_plan_is_deterministic_and_sorted(tables, extracted_sample):
    a = plan_windows(tables["clips"], tables["frames"], F, STRIDE, seed=0)
    assert a == plan_windows(tables["clips"], tables["frames"], F, STRIDE, seed=0)
    assert a == plan_windows(extracted_sample / "clips.parquet", tables["frames"], F, STRIDE, seed=0)  # both tables resolve
    assert a == sorted(a, key=lambda w: (w.clip_id, w.start_frame))
    assert len({w.sample_id for w in a}) == len(a) > 50
    b = plan_windows(tables["clips"], tables["frames"], F, STRIDE, seed=1)
    assert [(w.clip_id, w.start_frame) for w in b] == [(w.clip_id, w.start_frame) for w in a]
    assert any(x.reference_frame != y.reference_frame for x, y in zip(a, b))  # the seed draws references
    assert {w.sample_id for w in a} != {w.sample_id for w in b}
    for w in a:
        assert Window.from_row(w.to_row()) == w
        assert all(isinstance(v, (str, int)) for v in w.to_row().values())  # Arrow-friendly, no None


@pytest.fixture(scope="module")
def windows(tables) -> list[Window]:
    return plan_windows(tables["clips"], tables["frames"], F, STRIDE, seed=0)


def _decode_sequential(path: str, frame: int) -> np.ndarray:
    """Frame ``frame`` decoded from the start of the file (no seek), resized like the loader."""
    img = None
    for idx, rgb in iter_frames(path, probe_video(path), end_frame=frame + 1):
        img = rgb if idx == frame else img
    assert img is not None
    return cv2.resize(img, (RESOLUTION, RESOLUTION), interpolation=cv2.INTER_AREA)


@pytest.mark.slow
@pytest.mark.parametrize("with_audio", [True, False])
def test_loader_arrays_match_the_sources(tables, windows, with_audio):
    window = [w for w in windows if (w.audio_path is not None) == with_audio and w.start_frame >= 16][0]
    loader = SampleLoader(tables["frames"], RESOLUTION, prompt_template="{identity}: {label}")
    sample = loader(window.to_row())
    assert sample["video"].shape == (F, RESOLUTION, RESOLUTION, 3) and sample["video"].dtype == np.uint8
    assert sample["reference"].shape == (RESOLUTION, RESOLUTION, 3) and sample["reference"].dtype == np.uint8
    assert sample["keypoints"].shape == (F, 62, 3) and sample["keypoints"].dtype == np.float32
    assert sample["reference_keypoints"].shape == (62, 3) and sample["reference_keypoints"].dtype == np.float32
    assert sample["audio"].shape == (F * 16000 // 25,) and sample["audio"].dtype == np.float32
    assert (sample["sample_id"], sample["clip_id"], sample["start_frame"]) == (window.sample_id, window.clip_id, window.start_frame)
    assert sample["prompt"] == f"{window.identity}: {window.label}"
    # keypoints: the frames.parquet rows of those frames
    rows = {
        r["frame"]: r["keypoints"]
        for r in pq.read_table(tables["frames"], columns=["clip_id", "frame", "keypoints"]).to_pylist()
        if r["clip_id"] == window.clip_id
    }
    expected = np.asarray([rows[f] for f in range(window.start_frame, window.end_frame)], np.float32).reshape(F, 62, 3)
    assert np.array_equal(sample["keypoints"], expected)
    assert np.array_equal(sample["reference_keypoints"], np.asarray(rows[window.reference_frame], np.float32).reshape(62, 3))
    # frames: the same pixels as a decode from the file's start
    assert np.array_equal(sample["video"][0], _decode_sequential(window.clip_path, window.start_frame))
    assert np.array_equal(sample["video"][-1], _decode_sequential(window.clip_path, window.end_frame - 1))
    assert np.array_equal(sample["reference"], _decode_sequential(window.clip_path, window.reference_frame))
    # audio: the WAV's samples under the window (frame f starts at f / 25 s), or silence
    if with_audio:
        wav, rate, _ = read_wav(window.audio_path)
        first = window.start_frame * rate // 25
        assert np.array_equal(sample["audio"], wav[first : first + len(sample["audio"])] / np.float32(32768))
        assert np.abs(sample["audio"]).max() > 0.01
    else:
        assert not sample["audio"].any()
    assert "position" not in sample and loader({**window.to_row(), "position": 123})["position"] == 123
    again = loader(window.to_row())
    for key in ("video", "reference", "keypoints", "reference_keypoints", "audio"):
        assert np.array_equal(again[key], sample[key]), key


@pytest.mark.slow
def test_loader_prompt_without_label(tables, windows):
    window = dataclasses.replace(windows[0], label=None)
    assert SampleLoader(tables["frames"], RESOLUTION).prompt(window) == "a person talking"
    assert SampleLoader(tables["frames"], RESOLUTION).prompt(windows[0]) == windows[0].label
    with pytest.raises(ValueError, match="prompt_template"):
        SampleLoader(tables["frames"], RESOLUTION, prompt_template="{speaker}")


@pytest.mark.slow
def test_window_positions_resume_and_epochs(windows):
    n = len(windows)
    total = 2 * n + n // 2
    full = window_positions(windows, total, seed=7)
    assert [r["position"] for r in full] == list(range(total))
    all_ids = sorted(w.sample_id for w in windows)
    epochs = [[r["sample_id"] for r in full[e * n : (e + 1) * n]] for e in range(3)]
    assert sorted(epochs[0]) == all_ids and sorted(epochs[1]) == all_ids  # each epoch a permutation
    assert len(set(epochs[2])) == len(epochs[2]) == n // 2
    assert epochs[0] != epochs[1]  # epochs are reshuffled
    assert epochs[0] != [w.sample_id for w in windows]
    for start in (0, 1, n - 1, n, n + 5, total - 1, total):
        assert window_positions(windows, total, seed=7, start=start) == full[start:]
    assert window_positions(windows[::-1], total, seed=7) == full  # the list's order does not matter
    assert [r["sample_id"] for r in window_positions(windows, n, seed=8)] != epochs[0]
    assert all(Window.from_row(r) in set(windows) for r in full[:n])
