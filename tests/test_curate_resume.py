"""An interrupted curate resumes: Ctrl-C part-way, rerun, and only the unfinished videos run.

The job runs as a user runs it (the CLI in its own process, its own local Ray); it is stopped
with SIGINT as soon as the journal holds a finished video. The rerun must skip exactly the
journalled videos and write the same tables, byte for byte, as a run from scratch.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from cogportrait.config import CurateConfig
from cogportrait.curate.journal import Journal, settings_key
from pipelines.curate import run

SAMPLE = Path(__file__).resolve().parents[1] / "datasets" / "sample"
# short real clips (one clip each), one of them under several ids: the one worker finishes the first
# videos while the others wait
VIDEOS = [
    *((f"d0_{k}", "lp_d0_man_greenscreen_gaze_blink.mp4") for k in range(6)),
    ("d20", "lp_d20_man_talking_outdoor_audio.mp4"),
    ("tpsmm", "tpsmm_driving_man_talking.mp4"),
]


def _manifest(folder: Path) -> Path:
    (folder / "videos").mkdir(parents=True)
    for _, name in VIDEOS:
        if not (folder / "videos" / name).exists():
            shutil.copy(SAMPLE / "videos" / name, folder / "videos" / name)  # a copy: the test touches its mtime
    path = folder / "manifest.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["video_id", "path", "source", "license", "label", "identity", "mirrored"])
        for vid, name in VIDEOS:
            w.writerow([vid, f"videos/{name}", "fixture", "MIT (test)", "talking", vid, "false"])
    return path


def _cli(*args: str) -> list[str]:
    return [str(Path(sys.executable).parent / "cogportrait"), "curate", *args, "--workers", "1"]


def _stop_tree(proc: subprocess.Popen) -> None:
    """Ctrl-C the job's process group, then make sure nothing of it (its Ray included) is left."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=60)
    finally:
        leftovers = [p for p in psutil.process_iter() if _pgid(p) == proc.pid]
        for p in leftovers:
            p.kill()
        psutil.wait_procs(leftovers, timeout=10)


def _pgid(p: psutil.Process) -> int:
    try:
        return os.getpgid(p.pid)
    except (ProcessLookupError, psutil.NoSuchProcess):
        return -1


def test_interrupted_curate_resumes_where_it_stopped(tmp_path):
    manifest = _manifest(tmp_path / "dataset")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    log = tmp_path / "interrupted.log"
    with open(log, "w") as log_fh:
        proc = subprocess.Popen(_cli("--manifest", str(manifest), "--out", str(out)), env=env, start_new_session=True,
                                stdout=log_fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not list((out / "journal").glob("*.json")):
            assert proc.poll() is None, f"the job ended before any video was journalled: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no video finished in 300 s"
            time.sleep(0.05)
    finally:
        _stop_tree(proc)
    assert proc.returncode != 0, "the job was not interrupted"
    assert not (out / "clips.parquet").exists(), "the tables are written only by a finished job"
    finished = len(list((out / "journal").glob("*.json")))
    assert 1 <= finished < len(VIDEOS)

    resumed = subprocess.run(_cli("--manifest", str(manifest), "--out", str(out)), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["videos_resumed"] == finished
    assert metrics["clips"] == len(VIDEOS)  # each of these clips is one clean span

    fresh = subprocess.run(_cli("--manifest", str(manifest), "--out", str(tmp_path / "fresh")), env=env, capture_output=True,
                           text=True, timeout=600)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    for table in ("clips.parquet", "rejects.parquet"):
        assert (out / table).read_bytes() == (tmp_path / "fresh" / table).read_bytes(), table
    assert sorted(p.name for p in (out / "clips").iterdir()) == sorted(p.name for p in (tmp_path / "fresh" / "clips").iterdir())


def test_journal_entries_follow_the_file_and_the_settings(tmp_path, ray_session):
    """A rerun resumes a video only while its file and the output-changing settings are the same;
    run-only settings (workers, paths) do not matter."""
    manifest = _manifest(tmp_path / "dataset")
    with open(manifest) as fh:
        rows = fh.read().splitlines()
    manifest.write_text("\n".join(rows[:2]) + "\n")  # d0 only
    cfg = CurateConfig(manifest=str(manifest), out=str(tmp_path / "out"), num_workers=1)
    assert run(cfg)["videos_resumed"] == 0
    assert run(CurateConfig(manifest=str(manifest), out=str(tmp_path / "out"), num_workers=2))["videos_resumed"] == 1
    assert settings_key(cfg) != settings_key(CurateConfig(min_sharpness=cfg.min_sharpness + 1))
    assert run(cfg, fresh=True)["videos_resumed"] == 0
    video = tmp_path / "dataset" / "videos" / VIDEOS[0][1]
    os.utime(video, ns=(video.stat().st_atime_ns, video.stat().st_mtime_ns + 10**9))  # the file changed
    assert run(cfg)["videos_resumed"] == 0
    # an entry whose clip file is gone is not trusted
    next((tmp_path / "out" / "clips").glob("*.mp4")).unlink()
    assert Journal(tmp_path / "out" / "journal", cfg).load(VIDEOS[0][0], str(video), tmp_path / "out") is None
    assert run(cfg)["videos_resumed"] == 0
    assert len(list((tmp_path / "out" / "clips").glob("*.mp4"))) == 1


@pytest.mark.parametrize("count", [1, 3])
def test_pick_spread_takes_frames_inside_the_span(count):
    from cogportrait.curate.steps import pick_spread

    available = list(range(0, 200, 10))
    got = pick_spread(available, 35, 125, count)
    assert len(got) == count and all(35 <= i < 125 for i in got) and got == sorted(got)
    assert pick_spread(available, 201, 260, 3) == []
