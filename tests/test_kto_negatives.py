"""Undesirable KTO samples (`kto negatives`): every input in exactly one table, a no-face video kept with
its reason and scores, reruns give the same rows, and the keep/reject rules on known scores."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from cogportrait.behavior.kto_negatives import (
    CRITERIA,
    WELL_CONTROLLED,
    CandidateScores,
    WindowSignals,
    criterion_value,
    decide,
    negative_id,
    sample_seed,
    score_candidate,
    window_signals,
)
from cogportrait.config import EventsConfig, ExtractConfig, InvertConfig, KtoConfig, KtoNegativesConfig
from cogportrait.io.atomic import write_table
from cogportrait.schema import (
    CHANNEL_INDEX as C,
    FRAMES_SCHEMA,
    KTO_NEGATIVE_REASONS,
    KTO_NEGATIVES_SCHEMA,
    KTO_SCHEMA,
    N_CHANNELS,
    REJECT_REASONS,
    REJECTS_SCHEMA,
)

REPO = Path(__file__).resolve().parents[1]
CFG = KtoNegativesConfig()
KTO_CFG = KtoConfig()
EVENTS_CFG = EventsConfig()
SCORED = ("sample_id", "source_sample_id", "seed", "checkpoint_sha256", "face_ratio", "eye_lmd", "criterion",
          "criterion_value", "criterion_target", "reason")


# ------------------------------------------------------------------------------------------------
# the job on the real sample (tiny config at 64² with its random weights: ~5 s a window on CPU)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kto_input(library_upstream, ray_session, tmp_path_factory) -> dict:
    """kto_mine on the sample; then a small input table: the two shortest train windows, one window
    moved to the test split (not an input of the default job) and one without keypoints."""
    from pipelines.kto import run as mine

    folder = tmp_path_factory.mktemp("kto_neg_input")
    mine(KtoConfig(controls=str(library_upstream["controls"]), frames=str(library_upstream["frames"]),
                   clips=str(library_upstream["clips"]), out=str(folder / "kto")))
    rows = sorted(pq.read_table(folder / "kto" / "kto.parquet").to_pylist(), key=lambda r: (r["end_frame"] - r["start_frame"], r["sample_id"]))
    assert len(rows) >= 3, "the sample mines at least three windows"
    train = [dict(r, split="train") for r in rows[:2]]
    held_out = dict(rows[2], split="test")
    bare = dict(rows[0], sample_id="no-keypoints-window", keypoints=None)
    write_table(folder / "kto.parquet", train + [held_out, bare], KTO_SCHEMA)
    stage2 = yaml.safe_load((REPO / "training/configs/tiny.yaml").read_text())
    stage2["data"]["resolution"] = 64  # the VAE decode dominates: a quarter of the pixels
    (folder / "tiny64.yaml").write_text(yaml.safe_dump(stage2))
    cfg = KtoNegativesConfig(kto=str(folder / "kto.parquet"), frames=str(library_upstream["frames"]),
                             clips=str(library_upstream["clips"]), stage2_config=str(folder / "tiny64.yaml"), checkpoint="",
                             out=str(folder / "a"), sample_steps=2)
    return {"cfg": cfg, "train": train, "held_out": held_out, "bare": bare, "folder": folder}


@pytest.fixture(scope="module")
def negatives_run(kto_input) -> dict:
    from pipelines.kto_negatives import run

    metrics = run(kto_input["cfg"])
    out = Path(kto_input["cfg"].out)
    return {"metrics": metrics, "negatives": pq.read_table(out / "negatives.parquet"), "rejects": pq.read_table(out / "rejects.parquet")}


def test_every_input_ends_in_exactly_one_table(kto_input, negatives_run):
    negatives, rejects, metrics = negatives_run["negatives"], negatives_run["rejects"], negatives_run["metrics"]
    assert negatives.schema == KTO_NEGATIVES_SCHEMA and rejects.schema == REJECTS_SCHEMA
    kept = negatives.column("source_sample_id").to_pylist()
    dropped = rejects.column("video_id").to_pylist()
    inputs = [r["sample_id"] for r in kto_input["train"]] + [kto_input["bare"]["sample_id"]]
    assert sorted(kept + dropped) == sorted(inputs)  # each once, in one table
    assert kto_input["held_out"]["sample_id"] not in kept + dropped  # split=train: test rows are not inputs
    assert dropped == ["no-keypoints-window"]
    reject = rejects.to_pylist()[0]
    assert reject["stage"] == "kto_negatives" and reject["reason"] == "no_keypoints" and reject["reason"] in REJECT_REASONS
    assert metrics["selected"] == 3 and metrics["other_split"] == 1 and metrics["beyond_max_samples"] == 0 and metrics["negatives"] == len(kept) == 2
    assert metrics["identity_similarity"] is None and "no identity backend" in metrics["identity_similarity_note"]
    videos = sorted(p.name for p in (Path(kto_input["cfg"].out) / "videos").iterdir())
    assert videos == sorted(Path(p).name for p in negatives.column("video_path").to_pylist())  # no orphan, none missing


def test_no_face_generation_is_kept_with_its_scores(kto_input, library_upstream, negatives_run):
    from cogportrait.io.video import probe_video

    sources = {r["sample_id"]: r for r in kto_input["train"]}
    for row in negatives_run["negatives"].to_pylist():
        src = sources[row["source_sample_id"]]
        # random weights draw no face: kept, and why
        assert row["reason"] == "no_face" and row["face_ratio"] < CFG.min_face_ratio
        assert row["desirable"] is False and row["identity_sim"] is None
        # the same conditions as the desirable row
        for key in ("category", "split", "clip_id", "identity", "start_frame", "end_frame", "reference_frame", "audio_path",
                    "audio_start_s", "audio_end_s", "keypoints", "prompt", "score"):
            assert row[key] == src[key], key
        assert row["seed"] == sample_seed(CFG.seed, src["sample_id"])
        assert row["sample_id"] == negative_id(src["sample_id"], row["checkpoint_sha256"], row["seed"], 2)
        assert len(row["checkpoint_sha256"]) == 64
        # the video: relative to the working directory like kto.parquet's paths, the window's frames
        assert not Path(row["video_path"]).is_absolute()
        info = probe_video(row["video_path"])
        assert (info.width, info.n_frames) == (64, src["end_frame"] - src["start_frame"])
        # the criterion's target is the category's measure on the real window, read from frames.parquet
        real = pq.read_table(library_upstream["frames"], schema=FRAMES_SCHEMA, filters=[
            ("clip_id", "=", src["clip_id"]), ("frame", ">=", src["start_frame"]), ("frame", "<", src["end_frame"])])
        signals = window_signals(real, False, InvertConfig().pose_refine).after(1)
        assert row["criterion"] == CRITERIA[src["category"]]
        assert row["criterion_target"] == pytest.approx(criterion_value(src["category"], signals, KTO_CFG, EVENTS_CFG), rel=1e-6)
        assert row["criterion_target"] > 0


def test_rerun_writes_the_same_rows(kto_input, negatives_run):
    from pipelines.kto_negatives import run

    out = kto_input["folder"] / "b"
    run(replace(kto_input["cfg"], out=str(out)))
    again = pq.read_table(out / "negatives.parquet")
    first = negatives_run["negatives"]
    assert again.drop_columns(["video_path"]).equals(first.drop_columns(["video_path"]))
    assert pq.read_table(out / "rejects.parquet").equals(negatives_run["rejects"])
    for a, b in zip(first.column("video_path").to_pylist(), again.column("video_path").to_pylist()):
        assert Path(a).name == Path(b).name and Path(a).read_bytes() == Path(b).read_bytes()


# ------------------------------------------------------------------------------------------------
# the scores on real frames: a perfect "generator" (the real window) is well controlled, a still one is not
# ------------------------------------------------------------------------------------------------
def test_real_window_is_well_controlled_and_a_still_face_is_not(kto_input, library_upstream, tmp_path):
    from cogportrait.face.au_backends import make_backend
    from cogportrait.face.extract import extract_clip
    from cogportrait.io.video import VideoWriter, iter_frames, probe_video
    from training.data import resize_square

    src = kto_input["train"][0]
    extract_cfg, invert_cfg = ExtractConfig(), InvertConfig()
    backend = make_backend(extract_cfg.au_backend, None, extract_cfg.gaze_down_blink_coupling)
    clip = src["video_path"]
    real = [resize_square(x, 128) for _, x in iter_frames(clip, probe_video(clip), start_frame=src["start_frame"], end_frame=src["end_frame"])]
    target = window_signals(pq.read_table(library_upstream["frames"], schema=FRAMES_SCHEMA, filters=[
        ("clip_id", "=", src["clip_id"]), ("frame", ">=", src["start_frame"]), ("frame", "<", src["end_frame"])]), False, "similarity")
    conditioning = np.asarray(src["keypoints"]).reshape(-1, 62, 2)
    still = [real[src["reference_frame"] - src["start_frame"]]] * len(real)
    verdicts = {}
    for name, frames in (("real", real), ("still", still)):
        with VideoWriter(tmp_path / f"{name}.mp4", 25, 128) as writer:
            for frame in frames:
                writer.write(frame)
        generated = window_signals(extract_clip(tmp_path / f"{name}.mp4", name, False, backend, extract_cfg), False, invert_cfg.pose_refine)
        scores = score_candidate(generated, conditioning, target, src["category"], KTO_CFG, invert_cfg.events)
        verdicts[name] = (decide(scores, CFG), scores)
    verdict, scores = verdicts["real"]
    assert verdict == WELL_CONTROLLED, scores
    assert scores.face_ratio == 1.0 and scores.eye_lmd < CFG.max_eye_lmd / 2
    assert scores.criterion_value >= CFG.min_criterion_ratio * scores.criterion_target
    verdict, scores = verdicts["still"]  # the face never moves: the eyes miss their keypoints, the behaviour is gone
    assert verdict in ("eye_lmd", "criterion") and scores.criterion_value < scores.criterion_target


# ------------------------------------------------------------------------------------------------
# the rules on hand-made numbers
# ------------------------------------------------------------------------------------------------
def scores(face_ratio=1.0, eye=0.005, value=4.0, target=5.0) -> CandidateScores:
    return CandidateScores(face_ratio=face_ratio, eye_lmd=eye, criterion="gaze_shifts", criterion_value=value, criterion_target=target)


@pytest.mark.parametrize("made, expected", [
    (scores(), WELL_CONTROLLED),
    (scores(face_ratio=0.0, eye=None, value=None), "no_face"),
    (scores(face_ratio=0.79), "no_face"),  # below min_face_ratio 0.8, even with good keypoints
    (scores(face_ratio=0.8), WELL_CONTROLLED),  # the threshold itself passes
    (scores(eye=0.021), "eye_lmd"),
    (scores(eye=0.02), WELL_CONTROLLED),
    (scores(eye=0.05, value=0.0), "eye_lmd"),  # reasons are checked in KTO_NEGATIVE_REASONS order
    (scores(value=2.4), "criterion"),  # below half of the real window's 5
    (scores(value=2.5), WELL_CONTROLLED),
    (scores(value=0.0, target=0.0), WELL_CONTROLLED),  # the real window shows nothing to reproduce
    (scores(value=0.0, target=None), WELL_CONTROLLED),  # the real window could not be measured
])
def test_keep_or_reject_on_hand_made_scores(made, expected):
    assert decide(made, CFG) == expected
    assert expected == WELL_CONTROLLED or expected in KTO_NEGATIVE_REASONS


def test_stricter_thresholds_change_the_decision():
    assert decide(scores(eye=0.015), replace(CFG, max_eye_lmd=0.01)) == "eye_lmd"
    assert decide(scores(value=4.0), replace(CFG, min_criterion_ratio=0.9)) == "criterion"


def synthetic(controls: np.ndarray, aperture: np.ndarray | None = None) -> WindowSignals:
    t = len(controls)
    return WindowSignals(np.ones(t, bool), np.zeros((t, 62, 2)), controls, np.full((t, 2), 0.3) if aperture is None else aperture)


def test_criteria_measure_the_planted_behaviour():
    rest = np.zeros((100, N_CHANNELS))
    assert criterion_value("large_head_motion", synthetic(rest), KTO_CFG, EVENTS_CFG) == 0.0
    turned = rest.copy()
    turned[40:60, C["yaw"]] = 60.0
    assert criterion_value("large_head_motion", synthetic(turned), KTO_CFG, EVENTS_CFG) == pytest.approx(60.0 / 40.0)
    brow = rest.copy()
    brow[30:50, C["AU2L"]] = 0.7
    assert criterion_value("asymmetric_brow", synthetic(brow), KTO_CFG, EVENTS_CFG) == pytest.approx(0.7)
    gaze = rest.copy()
    for i in range(6):
        gaze[20 + 10 * i : 30 + 10 * i, C["gaze_left" if i % 2 == 0 else "gaze_right"]] = 0.45
    assert criterion_value("erratic_gaze", synthetic(gaze), KTO_CFG, EVENTS_CFG) >= KTO_CFG.gaze_min_shifts
    aperture = np.full((100, 2), 0.3)
    for start in (10, 30, 50, 70):  # four 3-frame closures: blinks (< blink_max_s)
        aperture[start : start + 3] = 0.02
    assert criterion_value("rapid_blink", synthetic(rest, aperture), KTO_CFG, EVENTS_CFG) == 4.0
    gone = replace(synthetic(turned), present=np.zeros(100, bool))
    assert criterion_value("large_head_motion", gone, KTO_CFG, EVENTS_CFG) is None


def test_scores_skip_the_reference_slot():
    """Frame 0 of a generated video is the reference: a wrong frame 0 changes no score."""
    t = 20
    kp = np.random.default_rng(0).uniform(0.3, 0.7, size=(t, 62, 2))
    controls = np.zeros((t, N_CHANNELS))
    generated = WindowSignals(np.ones(t, bool), kp.copy(), controls, np.full((t, 2), 0.3))
    generated.keypoints[0] += 0.2
    generated.present[0] = False
    s = score_candidate(generated, kp, None, "erratic_gaze", KTO_CFG, EVENTS_CFG)
    assert s.face_ratio == 1.0 and s.eye_lmd == pytest.approx(0.0) and s.criterion_target is None
    with pytest.raises(ValueError, match="conditioning frames"):
        score_candidate(generated, kp[:-1], None, "erratic_gaze", KTO_CFG, EVENTS_CFG)


def test_seeds_and_ids_are_stable_hashes():
    assert sample_seed(0, "a") == sample_seed(0, "a") != sample_seed(0, "b") != sample_seed(1, "b")
    assert 0 <= sample_seed(0, "a") < 2**32
    assert negative_id("a", "sha", 1, 8) != negative_id("a", "sha", 1, 2) != negative_id("a", "other", 1, 2)


def test_cli_has_the_verb():
    from pipelines.cli import build_parser

    args = build_parser().parse_args(["kto", "negatives", "--checkpoint", "", "--split", "all", "--sample-steps", "2"])
    assert args.verb == "kto negatives"
