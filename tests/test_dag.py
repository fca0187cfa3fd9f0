"""The whole DAG (curate -> ... -> train -> kto -> generate -> evaluate) with `dvc repro`, as a user
runs it on a fresh clone, on a reduced sample: the four EMH-annotated videos (the two shortest as
the EMH cases generated and scored), training and KTO negatives cut to a few steps and samples. Then a second `dvc repro` does nothing, `dvc metrics show` lists every stage's metrics,
and the outputs round-trip through a local DVC remote.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CASES = ("lp_d0", "lp_d3", "lp_d10", "tpsmm_driving")  # curated (kto_mine needs them all for a boundary case)
EMH_CASES = ("lp_d0", "tpsmm_driving")  # generated and scored: the shortest two (generation is the DAG's slowest stage)
STEPS = {"tiny.yaml": (6, 3), "tiny-kto.yaml": (4, 2)}  # training config -> (steps, checkpoint_every)


def _run(args: list[str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)  # every stage starts its own local Ray, as on a user's machine
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _clone(dst: Path) -> None:
    """The files a clone of the working tree has (tracked, and new files git does not ignore)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)


def _reduce(repo: Path) -> None:
    """Point the DAG at the four EMH videos and two of their cases (a second manifest and annotation
    file, as a user's own dataset would be) and cut training, sampling and KTO negatives short."""
    with open(repo / "datasets/sample/manifest.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["video_id"] in CASES]
    with open(repo / "datasets/sample/manifest_dag.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    annotations = yaml.safe_load((repo / "datasets/emh/annotations.yaml").read_text())
    annotations["cases"] = [c for c in annotations["cases"] if c["case_id"] in EMH_CASES]
    (repo / "datasets/emh/annotations_dag.yaml").write_text(yaml.safe_dump(annotations, sort_keys=False))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["curate"]["manifest"] = "datasets/sample/manifest_dag.csv"
    params["evaluate_videos"]["annotations"] = "datasets/emh/annotations_dag.yaml"
    params["generate"]["sample_steps"] = 2
    params["kto_negatives"]["max_samples"] = 2
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for name, (steps, every) in STEPS.items():
        path = repo / "training/configs" / name
        config = yaml.safe_load(path.read_text())
        config["train"]["steps"], config["train"]["checkpoint_every"] = steps, every
        if "kto" in config:  # KTO starts from the flow-matching run's last checkpoint
            config["kto"]["reference_checkpoint"] = f"data/stage2/tiny/checkpoints/step_{STEPS['tiny.yaml'][0]:08d}"
        path.write_text(yaml.safe_dump(config, sort_keys=False))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_dvc_repro_runs_the_whole_dag_then_nothing_and_round_trips_a_remote(tmp_path):
    repo = tmp_path / "repo"
    _clone(repo)
    _reduce(repo)
    first = _run(["dvc", "repro"], repo, timeout=1500)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    for stage in stages:
        assert f"Running stage '{stage}'" in first.stdout, stage

    second = _run(["dvc", "repro"], repo)
    assert second.returncode == 0 and "Data and pipelines are up to date." in second.stdout, second.stdout[-2000:]

    shown = _run(["dvc", "metrics", "show", "--json"], repo)
    assert shown.returncode == 0
    for name in ("curate", "extract", "invert", "kto", "kto_negatives", "stage2/tiny", "stage2/tiny-kto", "eval/stage1",
                 "eval/generated", "eval/videos"):
        assert f"data/{name}/metrics.json" in shown.stdout, name
    evaluation = yaml.safe_load((repo / "data/eval/videos/metrics.json").read_text())
    assert evaluation["pairs_scored"] + evaluation["rejects"] == len(EMH_CASES)  # every case scored or rejected
    assert "BRISQUE" in evaluation["skipped"]

    outs = [repo / "data/library/prototypes.parquet", repo / "data/eval/videos/report.json", repo / "data/curate/clips.parquet"]
    before = {p: _digest(p) for p in outs}
    remote = tmp_path / "remote"
    assert _run(["dvc", "remote", "add", "-d", "store", str(remote)], repo).returncode == 0
    pushed = _run(["dvc", "push"], repo)
    assert pushed.returncode == 0, pushed.stderr[-2000:]
    for path in outs:  # the outputs and the cache are gone; the remote has them
        path.unlink()
    shutil.rmtree(repo / ".dvc" / "cache")
    pulled = _run(["dvc", "pull"], repo)
    assert pulled.returncode == 0, pulled.stderr[-2000:]
    assert {p: _digest(p) for p in outs} == before
    status = _run(["dvc", "status"], repo)
    assert "Data and pipelines are up to date." in status.stdout, status.stdout[-2000:]
