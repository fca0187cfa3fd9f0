"""`cogportrait generate`: a requests table through Stage 1 and Stage 2 on Ray Data; every request in
exactly one table, bad requests rejected with their reason, reruns idempotent, fresh-clone inputs made,
and the job submitted to a real local Ray cluster (`ray start`, `ray job submit/status/logs`)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from cogportrait.config import CurateConfig, ExtractConfig, load_section
from cogportrait.face.reference import load_rgb, read_reference
from cogportrait.schema import GENERATE_REQUESTS_SCHEMA, GENERATED_SCHEMA, REJECT_REASONS, REJECTS_SCHEMA
from pipelines.cli import main
from training.checkpoint import TrainerState, save_checkpoint, weights_hash
from training.config import load_stage2_config
from training.data import resize_square
from training.model import build_stage2_model

from media import cut_wav
from conftest import REPO, SAMPLE

PORTRAIT = SAMPLE / "images" / "pyfeat_single_face.jpg"
GROUP = SAMPLE / "images" / "insightface_t1_group.jpg"
AUDIO = SAMPLE / "audio" / "nemo_audio_5s_16k_mono.wav"
TINY = REPO / "training/configs/tiny.yaml"
GOOD = ("kp-label", "audio-instr", "group")
# request_id -> the reason it is rejected with (driver checks, then actor checks)
BAD = {
    "../escape": "invalid_request", "no-length": "no_length", "both-lengths": "invalid_request",
    "asks-nothing": "invalid_request", "missing-image": "missing_file", "missing-audio": "missing_file",
    "no-face": "no_face", "not-an-image": "unreadable_image", "broken-audio": "unreadable_audio",
    "unknown-label": "unknown_label", "bad-instruction": "unreadable_instruction",
}


def _request(rid: str, reference: str = "portrait.jpg", **kw) -> dict:
    return {"request_id": rid, "reference": reference, "label": None, "instruction": None, "audio": None, "prompt": None,
            "seed": None, "duration_s": None, **kw}


def _write_requests(folder: Path, rows: list[dict], name: str = "requests.parquet") -> Path:
    path = folder / name
    pq.write_table(pa.Table.from_pylist(rows, schema=GENERATE_REQUESTS_SCHEMA), path)
    return path


def _rows() -> list[dict]:
    """The good requests, each bad kind once, and a repeated id (paths relative to the table)."""
    return [
        _request("kp-label", label="drowsiness", duration_s=1.0, seed=3),
        _request("audio-instr", instruction="blink twice", audio="speech.wav", prompt="a tired person"),
        _request("group", reference=str(GROUP), label="surprise", duration_s=0.6, seed=1),  # an absolute path
        _request("../escape", label="drowsiness", duration_s=1.0),
        _request("no-length", label="drowsiness"),
        _request("both-lengths", label="drowsiness", duration_s=1.0, audio="speech.wav"),
        _request("asks-nothing", duration_s=1.0),
        _request("missing-image", reference="nobody.jpg", label="drowsiness", duration_s=1.0),
        _request("missing-audio", label="drowsiness", audio="nothing.wav"),
        _request("no-face", reference="blank.png", label="drowsiness", duration_s=1.0),
        _request("not-an-image", reference="notes.jpg", label="drowsiness", duration_s=1.0),
        _request("broken-audio", label="drowsiness", audio="broken.wav"),
        _request("unknown-label", label="not a category", duration_s=1.0),
        _request("bad-instruction", instruction="juggle three oranges", duration_s=1.0),
        _request("kp-label", label="anger", duration_s=2.0),  # repeated id
    ]


@pytest.fixture(scope="module")
def requests_table(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("requests")
    shutil.copy(PORTRAIT, folder / "portrait.jpg")
    cut_wav(AUDIO, folder / "speech.wav", 1.2)
    from PIL import Image

    Image.fromarray(np.full((256, 256, 3), 128, np.uint8)).save(folder / "blank.png")
    (folder / "notes.jpg").write_text("not an image")
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk" + bytes(range(256)))
    return _write_requests(folder, _rows())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny checkpoint whose weights differ from the config's own random ones."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_stage2_model(load_stage2_config(TINY).model)
    torch.nn.init.normal_(model.dit.pose_adapter.embed.weight, std=0.02)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "step_00000001", model.dit, None, TrainerState(step=1))


def _generate(params_file: Path, requests: Path, out: Path, checkpoint: Path, capsys) -> dict:
    capsys.readouterr()
    rc = main(["--params", str(params_file), "generate", "--requests", str(requests), "--out", str(out), "--workers", "2",
               "--checkpoint", str(checkpoint), "--set", "generate.sample_steps=2"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-2000:]
    return json.loads(captured.out)


@pytest.fixture(scope="module")
def first_run(params_file, requests_table, checkpoint, tmp_path_factory) -> tuple[Path, dict]:
    """One run over every kind of request (module-scoped: capsys is function-scoped, so stdout is redirected)."""
    out = tmp_path_factory.mktemp("generated")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # train's checkpoints/ folder: the latest checkpoint in it
        rc = main(["--params", str(params_file), "generate", "--requests", str(requests_table), "--out", str(out),
                   "--workers", "2", "--checkpoint", str(checkpoint.parent), "--set", "generate.sample_steps=2"])
    assert rc == 0
    return out, json.loads(buf.getvalue())


def _frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


def test_every_request_ends_in_exactly_one_table(first_run, requests_table):
    out, metrics = first_run
    generated = pq.read_table(out / "generated.parquet")
    rejects = pq.read_table(out / "rejects.parquet")
    assert generated.schema.equals(GENERATED_SCHEMA) and rejects.schema.equals(REJECTS_SCHEMA)
    rows = pq.read_table(requests_table).to_pylist()
    first_row = {}
    for i, r in enumerate(rows):
        first_row.setdefault(r["request_id"], i)
    done = [first_row[r] for r in generated.column("request_id").to_pylist()]
    rejected = rejects.column("manifest_row").to_pylist()
    assert sorted(done + rejected) == list(range(len(rows)))  # each row once, in one table
    assert generated.column("request_id").to_pylist() == sorted(GOOD)
    reasons = {(r["video_id"], r["manifest_row"]): r["reason"] for r in rejects.to_pylist()}
    assert reasons == {**{(rid, first_row[rid]): why for rid, why in BAD.items()}, ("kp-label", len(rows) - 1): "duplicate_id"}
    assert set(rejects.column("stage").to_pylist()) == {"generate"} and set(reasons.values()) <= set(REJECT_REASONS)
    assert rejects.column("manifest_row").to_pylist() == sorted(rejected)  # sorted by row
    assert metrics["generated"] == metrics["generated_now"] == 3 and metrics["rejects"] == len(BAD) + 1
    assert metrics["requests"] == len(rows) and metrics["rejects_by_reason"]["invalid_request"] == 3
    assert sorted(p.name for p in (out / "requests").iterdir()) == sorted(
        [*GOOD, "no-face", "not-an-image", "broken-audio", "unknown-label", "bad-instruction"])  # actor rejects keep a mark


def test_videos_metadata_and_checkpoint(first_run, checkpoint):
    out, _ = first_run
    rows = {r["request_id"]: r for r in pq.read_table(out / "generated.parquet").to_pylist()}
    sha = weights_hash(checkpoint)
    for rid, row in rows.items():
        assert row["weights_sha256"] == sha and row["checkpoint"] == str(checkpoint.resolve())  # train's folder -> its latest
        assert row["sample_steps"] == 2 and row["device"] == "cpu" and row["stage1_s"] > 0 and row["stage2_s"] > 0
        meta = json.loads((out / "requests" / rid / "sample.json").read_text())
        assert meta["weights"]["sha256"] == sha and meta["seed"] == row["seed"] and meta["steps"] == 2
        assert (out / row["stage1_dir"] / "keypoints.parquet").is_file() and (out / row["stage1_dir"] / "preview.mp4").is_file()
    assert rows["kp-label"]["prompt"] == "a person talking, drowsiness" and rows["kp-label"]["seed"] == 3
    assert rows["audio-instr"]["prompt"] == "a tired person" and rows["audio-instr"]["seed"] == 0  # null seed -> 0
    assert rows["audio-instr"]["label"] is None and rows["group"]["label"] == "surprise"
    assert [rows[r]["frames"] for r in GOOD] == [25, 30, 15]  # duration x 25; the audio's 1.2 s x 25
    with av.open(str(out / rows["audio-instr"]["video_path"])) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert float(v.average_rate) == 25 and a.codec_context.sample_rate == 16000
        assert float(a.duration * a.time_base) == pytest.approx(1.2, abs=0.05)
    with av.open(str(out / rows["kp-label"]["video_path"])) as c:
        assert float(c.streams.video[0].average_rate) == 25 and not c.streams.audio
    assert _frames(out / rows["kp-label"]["video_path"]).shape == (25, 128, 128, 3)


def test_stage1_is_what_compile_writes(first_run, params_file, tmp_path, capsys):
    """The oracle: `cogportrait compile` with the request's label, length, portrait and seed."""
    out, _ = first_run
    assert main(["--params", str(params_file), "compile", "--label", "drowsiness", "--duration", "1", "--reference",
                 str(PORTRAIT), "--seed", "3", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    for name in ("keypoints.parquet", "neutral_keypoints.parquet", "controls.parquet"):
        assert pq.read_table(tmp_path / name).equals(pq.read_table(out / "requests/kp-label/stage1" / name)), name


def test_the_portrait_is_the_face_crop(first_run, params_file):
    """Frame 0 is the reference: for a group photo, the largest face's crop, not the whole picture."""
    out, _ = first_run
    crop_scale = load_section(CurateConfig, "curate", params_file).crop_scale
    crop = read_reference(GROUP, load_section(ExtractConfig, "extract", params_file), crop_scale).image
    first = _frames(out / "requests/group/video.mp4")[0].astype(np.float32)
    to_crop = np.abs(first - resize_square(crop, 128)).mean()
    to_whole = np.abs(first - resize_square(load_rgb(GROUP), 128)).mean()
    assert to_crop < 0.5 * to_whole, (to_crop, to_whole)


def test_rerun_skips_done_requests_and_redoes_changed_ones(first_run, params_file, requests_table, checkpoint, capsys):
    out, _ = first_run
    tables = {n: (out / n).read_bytes() for n in ("generated.parquet", "rejects.parquet")}
    stamps = {p: p.stat().st_mtime_ns for p in (out / "requests").rglob("*") if p.is_file()}
    again = _generate(params_file, requests_table, out, checkpoint.parent, capsys)
    assert again["generated_now"] == 0 and again["done_before"] == 3 and again["rejected_before"] == 5
    assert {n: (out / n).read_bytes() for n in tables} == tables  # the same rows, byte for byte
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # no file rewritten

    rows = [r for r in _rows() if r["request_id"] != "group"]  # one request gone, one changed
    rows[0] = dict(rows[0], seed=4)
    changed = _write_requests(requests_table.parent, rows, "changed.parquet")
    third = _generate(params_file, changed, out, checkpoint.parent, capsys)
    assert third["generated_now"] == 1 and third["done_before"] == 1 and third["orphans_removed"] == 1
    generated = {r["request_id"]: r for r in pq.read_table(out / "generated.parquet").to_pylist()}
    assert sorted(generated) == ["audio-instr", "kp-label"] and generated["kp-label"]["seed"] == 4
    assert not (out / "requests/group").exists()
    video = out / "requests/audio-instr/video.mp4"
    assert video.stat().st_mtime_ns == stamps[video]


def test_fresh_clone_makes_the_library_first(params_file, library_upstream, inverted_sample, extracted_sample,
                                              curated_sample, tmp_path, capsys):
    """No library yet (a fresh clone): generate runs the library stages on the upstream outputs, then generates.
    A missing library that is not the params' own stage output is a one-line error instead."""
    params = yaml.safe_load(params_file.read_text())
    library = tmp_path / "library"
    params["compile"].update(library=str(library), face_model=str(inverted_sample / "face_model"))
    params["curate"]["out"] = str(curated_sample)
    params["extract"].update(out=str(extracted_sample), clips=str(curated_sample / "clips.parquet"))
    params["invert"].update(out=str(inverted_sample), frames=str(extracted_sample))
    params["prototypes"].update(out=str(library), controls=str(inverted_sample), frames=str(extracted_sample / "frames.parquet"),
                                clips=str(curated_sample / "clips.parquet"))
    params["index"]["library"] = str(library)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    requests = _write_requests(tmp_path, [_request("one", reference=str(PORTRAIT), label="drowsiness", duration_s=0.4)])
    argv = ["--params", str(path), "generate", "--requests", str(requests), "--out", str(tmp_path / "out"),
            "--set", "generate.sample_steps=1", "--workers", "1"]
    capsys.readouterr()
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["prepared"]) == {"library"} and result["generated"] == 1  # upstream outputs were there
    assert (library / "prototypes.parquet").is_file() and (library / "index" / "meta.json").is_file()

    params["compile"]["library"] = str(tmp_path / "elsewhere")
    path.write_text(yaml.safe_dump(params))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not this params file's stage outputs" in err[0]


def test_user_errors_are_one_line(params_file, tmp_path, capsys):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"request_id": ["a"], "reference": ["x.jpg"], "duration": [1.0]}), bad)
    good = _write_requests(tmp_path, [_request("a", reference=str(PORTRAIT), label="drowsiness", duration_s=1.0)])
    for argv, expected in (
        (["--requests", str(tmp_path / "none.parquet")], "requests table"),
        (["--requests", str(bad)], "unknown column(s) duration"),
        (["--requests", str(good), "--checkpoint", str(tmp_path)], "no Stage 2 checkpoint"),
        (["--requests", str(good), "--config", str(tmp_path / "none.yaml")], "none.yaml"),
    ):
        assert main(["--params", str(params_file), "generate", "--out", str(tmp_path / "o"), *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------
# a real local cluster: ray start, ray job submit / status / logs, stopped by this test
# ------------------------------------------------------------------------------------------------
def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _stop_cluster(pgid: int, grace_s: float = 15.0) -> None:
    """Stop exactly the processes this test's `ray start` made: its process group (GCS, raylet,
    dashboard, monitors) and their descendants (workers and the job's driver get their own groups).
    Not `ray stop`: it stops every Ray process of the machine, the test session's own Ray included."""
    group = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid:
                group.append(proc)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    procs = {p.pid: p for p in group}
    for p in group:
        try:
            procs.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.NoSuchProcess:
            continue
    for p in procs.values():
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(list(procs.values()), timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=5)


def test_generate_as_a_job_on_a_local_ray_cluster(params_file, tmp_path):
    bin_dir = Path(sys.executable).parent
    ray_cli, cogportrait = str(bin_dir / "ray"), str(bin_dir / "cogportrait")
    temp = Path(tempfile.mkdtemp(prefix="cpr", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    token = temp / "token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_DATA_DISABLE_PROGRESS_BARS="1")
    gcs, dash, client, agent, agent_grpc, metrics, runtime_env, node_mgr, obj_mgr = _free_ports(9)
    address = f"http://127.0.0.1:{dash}"
    requests = _write_requests(tmp_path, [_request("job-one", reference=str(PORTRAIT), label="drowsiness", duration_s=0.4)])
    out = tmp_path / "out"
    start = subprocess.Popen(
        [ray_cli, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--num-cpus", "2",
         "--include-dashboard=true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
         "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
         "--dashboard-agent-grpc-port", str(agent_grpc), "--metrics-export-port", str(metrics),
         "--runtime-env-agent-port", str(runtime_env), "--node-manager-port", str(node_mgr),
         "--object-manager-port", str(obj_mgr), "--object-store-memory", str(300 * 2**20),
         "--temp-dir", str(temp / "ray"), "--disable-usage-stats"],
        cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = start.communicate(timeout=120)
        assert start.returncode == 0, log[-3000:]

        def ray(command: str, *args: str, timeout: float = 60) -> str:
            done = subprocess.run([ray_cli, "job", command, "--address", address, *args], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=timeout)
            assert done.returncode == 0, (command, args, done.stdout[-2000:], done.stderr[-2000:])
            return done.stdout + done.stderr

        job = "generate-test-" + secrets.token_hex(4)
        ray("submit", "--submission-id", job, "--no-wait", "--", cogportrait, "--params", str(params_file), "generate",
            "--requests", str(requests), "--out", str(out), "--workers", "1", "--set", "generate.sample_steps=1")
        deadline, status = time.monotonic() + 240, ""
        while time.monotonic() < deadline:
            status = ray("status", job)
            if any(f"Job '{job}' {end}" in status for end in ("succeeded", "failed", "was stopped")):
                break
            time.sleep(2)
        logs = ray("logs", job)
        assert f"Job '{job}' succeeded" in status, (status[-1000:], logs[-3000:])
        joined = [line for line in logs.splitlines() if "cogportrait.generate: Ray at " in line]
        assert len(joined) == 1 and f":{gcs}: " in joined[0], joined  # the job joined the cluster it was submitted to
        metrics, _ = json.JSONDecoder().raw_decode(logs[logs.rindex("\n{\n") + 1:])  # the command's stdout, last
        assert metrics["generated"] == 1 and metrics["rejects"] == 0
        row = pq.read_table(out / "generated.parquet").to_pylist()[0]
        assert row["request_id"] == "job-one" and row["frames"] == 10 and (out / row["video_path"]).is_file()
    finally:
        if start.poll() is None:
            start.kill()
        _stop_cluster(start.pid)
        shutil.rmtree(temp, ignore_errors=True)
