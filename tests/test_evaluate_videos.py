"""``cogportrait evaluate videos`` on real clips, the EMH annotation format, and ID-Sim's loader.

A clip scored against itself is perfect; scored against another person's clip, worse. ID-Sim runs
with a tiny ArcFace-shaped ONNX model built here (random weights, insightface's input and output
shapes): what is tested is the loading, alignment and scoring path, not face recognition.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import yaml

from cogportrait.agents.categories import load_categories
from cogportrait.config import CompileConfig, ExtractConfig, InvertConfig, VideoEvalConfig
from cogportrait.metrics.emh import AnnotationError, load_annotations, parse_events
from cogportrait.metrics.identity import ArcFaceEmbedder, IdentityBackendError, five_points
from cogportrait.metrics.videos import SKIPPED
from pipelines.cli import main
from pipelines.evaluate_videos import run

from media import build_tiny_arcface

REPO = Path(__file__).resolve().parents[1]
CATEGORIES = REPO / "datasets" / "emh" / "categories.yaml"
ANNOTATIONS = REPO / "datasets" / "emh" / "annotations.yaml"


@pytest.fixture(scope="module")
def pair_folders(curated_sample, tmp_path_factory) -> tuple[Path, Path]:
    """References: the curated clips of the annotated cases. Generated: lp_d0 and lp_d3 as
    themselves, lp_d10's slot holding another person's clip (edtalk), one file with no reference."""
    root = tmp_path_factory.mktemp("evaluate_videos")
    clips = pl.read_parquet(curated_sample / "clips.parquet")
    path_of = {r["video_id"]: curated_sample / r["clip_path"] for r in clips.iter_rows(named=True)}
    ref, gen = root / "reference", root / "generated"
    ref.mkdir()
    gen.mkdir()
    for case in ("lp_d0", "lp_d3", "lp_d10", "tpsmm_driving"):
        shutil.copy(path_of[case], ref / f"{case}.mp4")
    shutil.copy(path_of["lp_d0"], gen / "lp_d0.mp4")
    shutil.copy(path_of["lp_d3"], gen / "lp_d3.mp4")
    shutil.copy(path_of["edtalk_mouth"], gen / "lp_d10.mp4")
    shutil.copy(path_of["lp_d0"], gen / "stray.mp4")
    return gen, ref


def test_self_is_perfect_and_another_person_is_worse(pair_folders, tmp_path):
    gen, ref = pair_folders
    arcface = build_tiny_arcface(tmp_path / "buffalo_tiny")
    cfg = VideoEvalConfig(generated=str(gen), reference=str(ref), out=str(tmp_path / "out"), annotations=str(ANNOTATIONS),
                          arcface_dir=str(arcface), id_frames=1)
    metrics = run(cfg, CompileConfig(categories=str(CATEGORIES)), ExtractConfig(), InvertConfig())
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    cases = {c["case_id"]: c for c in report["cases"]}
    assert set(cases) == {"lp_d0", "lp_d3", "lp_d10"}
    for same in ("lp_d0", "lp_d3"):
        c = cases[same]
        assert (c["au_f1"], c["au_temp"], c["eye_lmd"]) == (1.0, 1.0, 0.0)
        assert c["id_sim"] == pytest.approx(1.0, abs=1e-9)  # id_frames=1: the portrait frame itself
        assert c["unmeasured"] == ["AU41"]  # the extractor has no AU41 proxy
    other = cases["lp_d10"]
    assert other["category"] == "surprise"
    assert other["au_temp"] < 0.5 and other["eye_lmd"] > 0.01 and other["id_sim"] < 1.0
    # every file ends in exactly one place: a scored pair or a reject
    rejects = pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()
    assert sorted((r["video_id"], r["reason"]) for r in rejects) == [("stray", "no_reference"), ("tpsmm_driving", "not_generated")]
    assert metrics["pairs_scored"] + metrics["rejects"] == len(list(gen.iterdir())) + 1  # + the reference without a generated video
    # Table 2's shape: a row per category and overall; skipped metrics named with their reasons, never 0
    assert set(metrics["per_category"]) == {"evasive response", "drowsiness", "surprise"}
    assert metrics["overall"]["cases"] == 3 and "ID-Sim" in metrics["overall"]
    assert set(metrics["skipped"]) == set(SKIPPED) and "ID-Sim" not in metrics["skipped"]
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| **Overall** | 3 | – | – |" in table and "BRISQUE: skipped (" in table
    assert (tmp_path / "out" / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_identity_weights_id_sim_is_skipped_with_the_reason(pair_folders, tmp_path):
    gen, ref = pair_folders
    cfg = VideoEvalConfig(generated=str(gen), reference=str(ref), out=str(tmp_path / "out"), annotations="")
    metrics = run(cfg, CompileConfig(categories=str(CATEGORIES)), ExtractConfig(), InvertConfig())
    assert "arcface_dir" in metrics["skipped"]["ID-Sim"]
    assert "ID-Sim" not in metrics["overall"]
    assert set(metrics["per_category"]) == {"unlabelled"}  # no annotations: S_y = the AU channels


def test_cli_user_errors_are_one_line(tmp_path, capsys):
    code = main(["evaluate", "videos", "--generated", str(tmp_path / "absent"), "--reference", str(tmp_path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "absent" in err[0]
    (tmp_path / "gen").mkdir()
    code = main(["evaluate", "videos", "--generated", str(tmp_path / "gen"), "--reference", str(tmp_path), "--out", str(tmp_path / "o"),
                 "--arcface-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no recognition model" in err[0]


def test_arcface_loader_finds_the_recognition_model_and_aligns_from_mediapipe_points(tmp_path):
    with pytest.raises(IdentityBackendError, match="not found"):
        ArcFaceEmbedder(tmp_path / "absent")
    embedder = ArcFaceEmbedder(build_tiny_arcface(tmp_path / "pack"))
    assert embedder.model_file == "w600k_r50.onnx"
    landmarks = np.zeros((478, 2))
    landmarks[[468, 473, 1, 61, 291]] = [[300, 200], [200, 200], [250, 250], [280, 300], [220, 300]]
    pts = five_points(landmarks)
    assert pts[0, 0] < pts[1, 0] and pts[3, 0] < pts[4, 0]  # ordered left to right in the image
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)
    e = embedder.embed(image, landmarks)
    assert e.shape == (512,) and np.isfinite(e).all()
    assert np.allclose(embedder.embed(image, landmarks), e)


def test_the_shipped_annotations_load_and_the_validator_names_the_problem(tmp_path):
    categories = load_categories(CATEGORIES)
    cases = load_annotations(ANNOTATIONS, categories)
    assert {c.case_id for c in cases} == {"lp_d0", "lp_d3", "lp_d10", "tpsmm_driving"}
    for case in cases:  # the paper's sentence form reads back to the same events
        assert parse_events(case.events_text(), case.frames) == case.events
    d0 = next(c for c in cases if c.case_id == "lp_d0")
    assert [(e.start, e.end) for e in d0.events] == [(0, 64), (64, 70), (70, 78)]
    paper = parse_events("frames 0–10 droopy eyelids, 10–20 prolonged blink, 20–end head nod", 30)  # en dashes, as printed
    assert [(e.start, e.end, e.description) for e in paper] == [(0, 10, "droopy eyelids"), (10, 20, "prolonged blink"), (20, 30, "head nod")]

    def problem(case: dict) -> str:
        base = {"case_id": "c1", "category": "drowsiness", "prompt": "p", "frames": 30, "events": "frames 0-10 a, 10-end b"}
        path = tmp_path / "a.yaml"
        path.write_text(yaml.safe_dump({"version": 1, "cases": [{**base, **case}]}))
        with pytest.raises(AnnotationError) as err:
            load_annotations(path, categories)
        message = str(err.value)
        assert "\n" not in message and "case c1" in message
        return message

    assert "a gap at frame 10" in problem({"events": "frames 0-10 a, 12-end b"})
    assert "an overlap at frame 8" in problem({"events": "frames 0-10 a, 8-end b"})
    assert "end at frame 20" in problem({"events": "frames 0-10 a, 10-20 b"})
    assert "unknown category 'sleepy cat'" in problem({"category": "sleepy cat"})
    assert "cannot read" in problem({"events": "frames 0 to 10 a"})
    assert "unknown key(s) label" in problem({"label": "x"})
    assert "frames must be a positive integer" in problem({"frames": 0})
