"""`cogportrait train` end to end: Ray Data -> Ray Train (one CPU worker) on real sample windows,
safetensors checkpoints, and a resume that continues the very same loss curve."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from pipelines.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "training/configs/tiny.yaml")


def _train(extracted_sample: Path, out: Path, steps: int, capsys) -> dict:
    rc = main(["train", "--config", TINY, "--set", f"train.out={out}", "--set", f"train.steps={steps}",
               "--set", "train.checkpoint_every=2", "--set", f"data.clips={extracted_sample / 'clips.parquet'}",
               "--set", f"data.frames={extracted_sample / 'frames.parquet'}", "--set", "data.stride=24"])
    assert rc == 0
    return json.loads(capsys.readouterr().out)


def _losses(out: Path) -> list[float]:
    with open(out / "loss.csv") as fh:
        return [float(r["loss"]) for r in csv.DictReader(fh)]


@pytest.mark.slow
def test_train_checkpoints_and_resumes_on_the_same_loss_curve(extracted_sample, ray_session, tmp_path, capsys):
    straight = tmp_path / "straight"
    summary = _train(extracted_sample, straight, 4, capsys)
    assert summary["steps"] == 4 and summary["trained_steps"] == 4 and summary["windows"] > 10
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    assert {"model.safetensors", "optimizer.safetensors", "state.json"} <= {p.name for p in (straight / "checkpoints/step_00000004").iterdir()}
    metrics = json.loads((straight / "metrics.json").read_text())
    assert metrics["step"] == 4 and metrics["tokens_per_s"] > 0

    # a run killed between its step-2 and step-4 checkpoints leaves the step-2 one: this copy of it
    # (what a third Ray Train run, stopped there, would leave, ~30 s sooner); the curve resumes from it
    interrupted = tmp_path / "interrupted"
    shutil.copytree(straight / "checkpoints/step_00000002", interrupted / "checkpoints/step_00000002")
    resumed = _train(extracted_sample, interrupted, 4, capsys)
    assert resumed["resumed_from"] == 2 and resumed["trained_steps"] == 2
    assert _losses(interrupted) == _losses(straight)  # same data order, noise and dropout after the resume
    assert len(set(_losses(straight))) == 4  # and the loss really moves from step to step

    again = _train(extracted_sample, interrupted, 4, capsys)  # nothing left to do
    assert again["trained_steps"] == 0


def test_train_user_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "training config" in capsys.readouterr().err
    assert main(["train", "--config", TINY, "--set", "train.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown key train.stepz" in err
    assert main(["train", "--config", TINY, "--set", f"data.frames={tmp_path / 'frames.parquet'}"]) == 2
    assert "are missing" in capsys.readouterr().err
