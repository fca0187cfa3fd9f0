"""Stage 1 end to end on the real sample library: `cogportrait compile`, the openai backend on
loopback, instruction following, retrieval, determinism, errors, and the LOCO evaluation."""

from __future__ import annotations

import hashlib
import json
import shutil
import wave
from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest

from cogportrait.agents.compiler import CompileRequest
from cogportrait.config import EventsConfig, IndexConfig
from cogportrait.face.model import MODEL_VERSION
from cogportrait.schema import CHANNEL_INDEX, CLIP_FPS
from pipelines.cli import main

from conftest import SAMPLE

PORTRAIT = SAMPLE / "images" / "pyfeat_single_face.jpg"
AUDIO = SAMPLE / "audio" / "nemo_audio_5s_16k_mono.wav"
OUTPUT_FILES = ("plan.json", "composition.json", "critic.json", "controls.parquet", "keypoints.parquet",
                "neutral_keypoints.parquet", "channels.png", "preview.mp4", "blendshapes.csv", "summary.json")


@pytest.fixture(scope="session")
def compiler(compile_cfg):
    from pipelines.compile import open_compiler

    return open_compiler(compile_cfg, EventsConfig())


def _compile(compiler, label=None, instructions=(), seconds=4.0, seed=0, **kw):
    return compiler.compile(CompileRequest(label=label, instructions=tuple(instructions),
                                           n_frames=int(round(seconds * CLIP_FPS)), seed=seed, **kw))


def _event(result, words: str):
    return next(e for e in result.plan.events if e.instruction and words in e.instruction)


def _span(result, event, channel: str) -> np.ndarray:
    return result.controls[event.start_frame : event.end_frame, CHANNEL_INDEX[channel]]


# ------------------------------------------------------------------------------------------------
# instruction following, retrieval, determinism
# ------------------------------------------------------------------------------------------------
def test_raise_left_eyebrow_raises_the_left_one(compiler):
    result = _compile(compiler, instructions=["raise your left eyebrow"], seconds=3)
    ev = _event(result, "left eyebrow")
    assert _span(result, ev, "AU2L").mean() > _span(result, ev, "AU2R").mean() + 0.2
    assert result.report.approved, [c.message for c in result.report.failing]


def test_look_right_moves_gaze_right(compiler):
    result = _compile(compiler, label="social engagement", instructions=["look to the right"], seconds=3)
    ev = _event(result, "right")
    assert _span(result, ev, "gaze_right").mean() > _span(result, ev, "gaze_left").mean() + 0.1


def test_lower_the_head_makes_pitch_fall(compiler):
    result = _compile(compiler, instructions=["lower the head smoothly"], seconds=3,
                      start_pose=(5.0, 3.0, -2.0))
    pitch = result.controls[:, CHANNEL_INDEX["pitch"]]
    assert pitch[0] == pytest.approx(3.0, abs=1e-4)  # frame 0 is the reference's own pose
    assert pitch[-10:].mean() < pitch[0] - 4.0


def test_blink_twice_gives_two_closures(compiler):
    result = _compile(compiler, instructions=["raise your eyebrows, then blink twice"], seconds=4)
    ev = _event(result, "blink")
    au45 = result.controls[ev.start_frame : ev.end_frame, CHANNEL_INDEX["AU45L"]].astype(float)
    closed = au45 > au45.min() + 0.5 * (au45.max() - au45.min())
    assert int(np.sum(np.diff(closed.astype(int)) == 1) + closed[0]) == 2
    counts = [c for c in result.report.checks if c.name == "instruction" and c.event_index is not None]
    assert counts and all(c.verdict == "pass" for c in counts)


def test_unknown_category_label_still_compiles_from_label_free_retrieval(compiler):
    """The sample library has no EMH label: the label re-ranks nothing but never filters to nothing."""
    assert "drowsiness" not in compiler.source.labels
    result = _compile(compiler, label="drowsiness", seconds=6)
    assert not result.composition.label_rerank
    assert all(ec.prototypes for ec in result.composition.events)
    assert np.isfinite(result.controls).all() and np.isfinite(result.keypoints).all()


def test_two_libraries_give_different_controls(compiler, compile_cfg, sample_library, tmp_path):
    """It really retrieves: half the library (other clips) composes other controls."""
    from pipelines.compile import open_compiler
    from prototype_store import build_index, write_prototypes

    table = pq.read_table(Path(sample_library) / "prototypes.parquet")
    clips = sorted(set(table.column("clip_id").to_pylist()))
    keep = np.isin(np.asarray(table.column("clip_id").to_pylist()), clips[::2])
    half = tmp_path / "half"
    half.mkdir()
    write_prototypes(half / "prototypes.parquet", table.filter(keep), row_group_size=64)
    build_index(half, IndexConfig())
    other = open_compiler(replace(compile_cfg, library=str(half)), EventsConfig())
    a = _compile(compiler, label="cognitive effort", seconds=4)
    b = _compile(other, label="cognitive effort", seconds=4)
    ids_a = {p.prototype_id for ec in a.composition.events for p in ec.prototypes}
    ids_b = {p.prototype_id for ec in b.composition.events for p in ec.prototypes}
    assert ids_b <= set(table.filter(keep).column("prototype_id").to_pylist())
    assert ids_a != ids_b
    assert not np.allclose(a.controls, b.controls)


def test_leave_out_identity_never_retrieves_it(compiler):
    identity = next(i for i in sorted(set(compiler.source._meta_table.column("identity").to_pylist())) if i)
    result = compiler.compile(CompileRequest(label=None, instructions=("frown, then blink",), n_frames=75, seed=1),
                              exclude_identities=(identity,))
    used = {p.prototype_id for ec in result.composition.events for p in ec.prototypes}
    rows = compiler.source._meta_table.to_pylist()
    assert used and all(r["identity"] != identity for r in rows if r["prototype_id"] in used)


def _digest(folder: Path) -> dict[str, str]:
    skip = {"summary.json", "preview.mp4"}  # timings; the encoder writes its own metadata
    return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() for n in OUTPUT_FILES if n not in skip}


def test_same_seed_same_files_other_seed_different(params_file, tmp_path):
    argv = ["--params", str(params_file), "compile", "--label", "cognitive effort", "--instruction",
            "look slightly to the left, then lower the head smoothly", "--duration", "4"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    assert main([*argv, "--seed", "7", "--out", str(tmp_path / "c")]) == 0
    a, b, c = (_digest(tmp_path / x) for x in "abc")
    assert a == b
    assert a["controls.parquet"] != c["controls.parquet"] and a["plan.json"] != c["plan.json"]


# ------------------------------------------------------------------------------------------------
# the command and its files
# ------------------------------------------------------------------------------------------------
def test_compile_writes_every_output(params_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["--params", str(params_file), "compile", "--label", "drowsy", "--instruction", "wink left",
                 "--audio", str(AUDIO), "--reference", str(PORTRAIT), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["label"] == "drowsiness"  # the alias resolved
    for name in OUTPUT_FILES:
        assert (out / name).stat().st_size > 0, name
    with wave.open(str(AUDIO)) as w:
        T = int(round(w.getnframes() / w.getframerate() * CLIP_FPS))
    controls = pq.read_table(out / "controls.parquet")
    keypoints = pq.read_table(out / "keypoints.parquet")
    assert controls.num_rows == keypoints.num_rows == T == summary["frames"]
    kp = np.asarray(keypoints.column("keypoints").to_pylist(), dtype=np.float32).reshape(T, 62, 3)
    assert np.all((kp[..., :2] > 0) & (kp[..., :2] < 1))
    with av.open(str(out / "preview.mp4")) as container:
        assert container.streams.video[0].frames == T and len(container.streams.audio) == 1
    plan = json.loads((out / "plan.json").read_text())
    assert plan["events"][0]["start_frame"] == 0 and plan["events"][-1]["end_frame"] == T
    csv_rows = (out / "blendshapes.csv").read_text().splitlines()
    assert len(csv_rows) == T + 1 and csv_rows[0].startswith("Timecode,")
    critic = json.loads((out / "critic.json").read_text())
    assert {c["name"] for c in critic["checks"]} >= {"blink_duration", "head_velocity", "event_targets"}


def test_a_face_model_of_another_version_is_a_one_line_user_error(params_file, compile_cfg, tmp_path, capsys):
    old = tmp_path / "face_model"
    shutil.copytree(compile_cfg.face_model, old)
    info = json.loads((old / "model.json").read_text())
    (old / "model.json").write_text(json.dumps({**info, "version": MODEL_VERSION - 1}))
    code = main(["--params", str(params_file), "compile", "--label", "drowsy", "--duration", "2", "--out", str(tmp_path / "out"),
                 "--set", f"compile.face_model={old}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "rerun invert" in err and len(err.splitlines()) == 1, err


def test_reference_head_pose_starts_the_sequence(compiler):
    from cogportrait.face.reference import read_reference

    ref = read_reference(PORTRAIT)
    result = _compile(compiler, label="surprise", seconds=2, start_pose=tuple(ref.head_pose), placement=ref.placement)
    np.testing.assert_allclose(result.controls[0, -3:], ref.head_pose, atol=1e-3)
    # the first frame's keypoints sit on the portrait's own eyes (Eye-LMD in crop units)
    assert np.mean(np.linalg.norm(result.keypoints[0, :, :2] - ref.keypoints[:, :2], axis=1)) < 0.05


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--label", "blue mood swings", "--duration", "2"], "known"),
        (["--instruction", "blink, then wiggle your ears", "--duration", "2"], '"wiggle your ears"'),
        (["--label", "fear"], "--duration"),
        (["--label", "fear", "--duration", "2", "--audio", str(AUDIO)], "exactly one"),
        (["--label", "fear", "--duration", "-1"], "positive"),
        (["--duration", "2"], "--label"),
        (["--label", "fear", "--audio", "/no/such.wav"], "not found"),
    ],
)
def test_user_errors_are_one_line_exit_2(params_file, tmp_path, capsys, argv, expected):
    assert main(["--params", str(params_file), "compile", *argv, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0] and expected in err[0], err
    assert not (tmp_path / "o" / "controls.parquet").exists()


def test_reference_without_a_face_is_a_user_error(params_file, tmp_path, capsys):
    import cv2

    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((256, 256, 3), 128, np.uint8))
    assert main(["--params", str(params_file), "compile", "--label", "fear", "--duration", "1",
                 "--reference", str(blank), "--out", str(tmp_path / "o")]) == 2
    assert "no face" in capsys.readouterr().err


def test_empty_and_stale_libraries_are_user_errors(params_file, sample_library, tmp_path, capsys):
    from prototype_store import build_index, write_prototypes

    table = pq.read_table(Path(sample_library) / "prototypes.parquet")
    empty = tmp_path / "empty"
    empty.mkdir()
    write_prototypes(empty / "prototypes.parquet", table.slice(0, 0), row_group_size=64)
    assert main(["--params", str(params_file), "compile", "--library", str(empty), "--label", "fear",
                 "--duration", "1", "--out", str(tmp_path / "o")]) == 2
    assert "0 prototypes" in capsys.readouterr().err
    stale = tmp_path / "stale"
    stale.mkdir()
    write_prototypes(stale / "prototypes.parquet", table, row_group_size=64)
    build_index(stale, IndexConfig())
    write_prototypes(stale / "prototypes.parquet", table.slice(0, 20), row_group_size=64)  # rewritten after indexing
    assert main(["--params", str(params_file), "compile", "--library", str(stale), "--label", "fear",
                 "--duration", "1", "--out", str(tmp_path / "o")]) == 2
    assert "stale index" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# the openai backend through the compiler, on a loopback server
# ------------------------------------------------------------------------------------------------
def test_openai_backend_plans_through_a_loopback_server(compiler, compile_cfg):
    from llm_server import LoopbackLLM, answer

    from cogportrait.agents.openai_backend import OpenAIBackend

    rules_plan = _compile(compiler, label="fear", seconds=2).plan
    llm_plan = rules_plan.model_copy(update={"events": [e.model_copy(update={"stage": "LLM: " + e.stage}) for e in rules_plan.events]})
    compose = {"events": [{"event_index": k, "targets": e.targets, "event_type": e.event_type}
                          for k, e in enumerate(llm_plan.events)]}
    with LoopbackLLM() as server:
        review = {"checks": [{"name": "semantic_consistency", "kind": "semantic", "verdict": "pass"}]}
        server.script(answer(llm_plan), answer(compose), *[answer(review)] * 8)
        backend = OpenAIBackend.from_config(compile_cfg.openai, server.base_url, "test-model", environ={})
        compiler.backend = backend
        try:
            result = _compile(compiler, label="fear", seconds=2)
        finally:
            compiler.backend = compiler.rules
    assert result.backend == "openai" and not result.warnings
    assert all(e.stage.startswith("LLM: ") for e in result.plan.events)
    assert any(c.name == "semantic_consistency" for c in result.report.checks)  # the LLM critic's own check


def test_openai_backend_falls_back_to_rules_with_a_warning(compiler, compile_cfg, caplog):
    from llm_server import LoopbackLLM, server_error

    from cogportrait.agents.llm import ChatClient
    from cogportrait.agents.openai_backend import OpenAIBackend

    with LoopbackLLM() as server:
        server.script(*[server_error(500)] * 3)
        client = ChatClient(server.base_url, "test-model", timeout_s=1.0, temperature=0.0, retries=2, backoff_s=0.0)
        compiler.backend = OpenAIBackend(client)
        try:
            result = _compile(compiler, label="fear", seconds=2)
        finally:
            compiler.backend = compiler.rules
    assert result.backend == "rules"
    assert result.warnings and "500" in result.warnings[0] and "rules" in result.warnings[0]
    assert result.plan is not None and result.report.checks


# ------------------------------------------------------------------------------------------------
# leave-one-clip-out evaluation
# ------------------------------------------------------------------------------------------------
def test_stage1_loco_evaluation(compile_cfg, library_upstream, sample_library, tmp_path):
    from cogportrait.config import Stage1EvalConfig
    from pipelines.evaluate_stage1 import run

    cfg = Stage1EvalConfig(library=str(sample_library), controls=str(library_upstream["controls"]),
                           frames=str(library_upstream["frames"]), clips=str(library_upstream["clips"]),
                           out=str(tmp_path / "eval"))
    summary = run(cfg, compile_cfg, EventsConfig())
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert summary["clips"] == len(report["clips"]) >= 8
    variants = summary["variants"]
    assert set(variants) == {"direct", "retrieval", "planner", "composer", "full"}
    for row in variants.values():
        assert 0.0 <= row["au_f1"] <= 1.0 and np.isfinite(row["au_temp"]) and 0 < row["eye_lmd"] < 0.2
    assert variants["full"]["au_temp"] > variants["direct"]["au_temp"]
    assert "Full minus direct" in (tmp_path / "eval" / "table.md").read_text()


def test_openai_backend_without_an_endpoint_compiles_with_rules(params_file, tmp_path, capsys, monkeypatch):
    for var in ("OPENAI_BASE_URL", "OPENAI_MODEL", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    code = main(["--params", str(params_file), "compile", "--backend", "openai", "--label", "fear", "--duration", "1",
                 "--out", str(tmp_path / "o")])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["backend"] == "rules" and "base URL" in summary["warnings"][0]


def test_known_identity_uses_its_own_baseline_and_unknown_is_an_error(params_file, compiler, tmp_path, capsys):
    identity = sorted(compiler.baselines)[0]
    out = tmp_path / "own"
    assert main(["--params", str(params_file), "compile", "--label", "fear", "--duration", "1", "--identity", identity,
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["--params", str(params_file), "compile", "--label", "fear", "--duration", "1", "--identity", "nobody",
                 "--out", str(tmp_path / "o")]) == 2
    assert "'nobody' is not in the face model" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["direct", "retrieval", "planner", "composer", "full"])
def test_one_and_two_frame_compiles(compiler, variant):
    for n_frames in (1, 2):
        for label, instructions in (("drowsiness", ()), (None, ("lower the head",)), ("surprise", ("blink",))):
            result = compiler.compile(CompileRequest(label=label, instructions=instructions, n_frames=n_frames, seed=3),
                                      variant=variant)
            assert result.controls.shape == (n_frames, 17) and np.isfinite(result.controls).all()
            assert result.keypoints.shape == (n_frames, 62, 3) and np.isfinite(result.keypoints).all()


def test_reference_is_measured_in_its_face_crop():
    """Any portrait becomes curate's square face crop: keypoints in [0, 1] of a 512² crop."""
    from cogportrait.config import CurateConfig
    from cogportrait.face.reference import read_reference

    ref = read_reference(SAMPLE / "images" / "insightface_t1_group.jpg", crop_scale=CurateConfig().crop_scale)
    assert ref.image.shape == (512, 512, 3)
    assert ref.placement.width == ref.placement.height == 512
    xy = ref.keypoints[:, :2]
    assert np.all((xy > 0.1) & (xy < 0.9))  # the eyes sit well inside the crop
    assert 0.15 * 512 < ref.placement.iod_px < 0.5 * 512


def test_openai_fallback_with_a_free_text_label_compiles_the_instructions(compiler):
    from llm_server import LoopbackLLM, server_error

    from cogportrait.agents.llm import ChatClient
    from cogportrait.agents.openai_backend import OpenAIBackend

    with LoopbackLLM() as server:
        server.script(*[server_error(500)] * 3)
        compiler.backend = OpenAIBackend(ChatClient(server.base_url, "m", timeout_s=1.0, retries=2, backoff_s=0.0))
        try:
            result = _compile(compiler, label="a sleepy afternoon at the office", instructions=["blink twice"], seconds=2)
        finally:
            compiler.backend = compiler.rules
    assert result.backend == "rules" and any("no category" in w for w in result.warnings)
    assert result.plan.label is None and len(result.plan.events) >= 1


def test_a_required_blink_is_laid_as_a_blink(compiler):
    """neutral talking's S_y is the eye closures: a 1 s plan with no natural blink gets one from the
    critic (a closure, not half-closed lids), and is approved."""
    from cogportrait.agents.physiology import detect_closures
    from cogportrait.face.mapping import canonical_keypoints

    for seed in range(4):
        result = _compile(compiler, label="neutral talking", seconds=1, seed=seed)
        assert result.report.approved, [c.message for c in result.report.failing]
        canon = canonical_keypoints(result.controls, compiler.model, compiler.average)
        assert len(detect_closures(result.controls, canon, EventsConfig())) >= 1


def test_drowsy_blink_twice_is_two_blinks_and_approved(compiler):
    """Heavy lids are AU41 (tonic), closures AU45 (phasic): asked blinks survive the critic."""
    result = _compile(compiler, label="drowsiness", instructions=["blink twice"], seconds=4)
    assert result.report.approved, [c.message for c in result.report.failing]
    counts = [c for c in result.report.checks if c.name == "instruction"]
    assert counts and all(c.verdict == "pass" for c in counts)
