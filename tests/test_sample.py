"""`cogportrait sample` end to end: Stage 1's keypoints on a real portrait -> mp4 (25 fps, audio muxed),
deterministic per seed, the weights' hash in the metadata, user errors in one line."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from pipelines.cli import main
from training.checkpoint import TrainerState, save_checkpoint, weights_hash
from training.config import load_stage2_config
from training.model import build_stage2_model

from media import cut_wav
from conftest import REPO, SAMPLE

PORTRAIT = SAMPLE / "images" / "pyfeat_single_face.jpg"
AUDIO = SAMPLE / "audio" / "nemo_audio_5s_16k_mono.wav"
TINY = str(REPO / "training/configs/tiny.yaml")


@pytest.fixture(scope="module")
def compiled(params_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compiled")
    assert main(["--params", str(params_file), "compile", "--label", "drowsiness", "--duration", "1", "--reference",
                 str(PORTRAIT), "--out", str(out)]) == 0
    return out


def _sample(compiled: Path, out: Path, *extra: str) -> dict:
    assert main(["sample", "--config", TINY, "--reference", str(PORTRAIT), "--keypoints", str(compiled / "keypoints.parquet"),
                 "--out", str(out), "--set", "sample.steps=3", *extra]) == 0
    return json.loads((out / "sample.json").read_text())


def _frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


def test_same_seed_same_video_other_seed_another(compiled, tmp_path, capsys):
    a = _sample(compiled, tmp_path / "a")
    b = _sample(compiled, tmp_path / "b")
    c = _sample(compiled, tmp_path / "c", "--seed", "1")
    capsys.readouterr()
    fa, fb, fc = (_frames(tmp_path / x / "video.mp4") for x in "abc")
    assert fa.shape == (25, 128, 128, 3)  # the keypoints' length, the config's resolution
    assert np.array_equal(fa, fb) and a["weights"] == b["weights"]
    assert not np.array_equal(fa[1:], fc[1:])
    assert a["weights"]["checkpoint"] is None and len(a["weights"]["sha256"]) == 64
    assert a["alignment"] == "tps from neutral_keypoints.parquet"
    assert a["guidance"]["mode"] == "dynamic" and a["steps"] == 3 and c["seed"] == 1


def test_checkpoint_and_audio(compiled, tmp_path, capsys):
    cfg = load_stage2_config(TINY)
    model = build_stage2_model(cfg.model)
    torch.nn.init.normal_(model.dit.pose_adapter.embed.weight, std=0.02)  # weights unlike the random default
    checkpoint = save_checkpoint(tmp_path / "ckpt", model.dit, None, TrainerState(step=1))
    audio = tmp_path / "speech.wav"
    cut_wav(AUDIO, audio, 1.2)
    meta = _sample(compiled, tmp_path / "out", "--checkpoint", str(checkpoint), "--audio", str(audio), "--prompt", "a tired person")
    capsys.readouterr()
    assert meta["weights"] == {"checkpoint": str(checkpoint), "sha256": weights_hash(checkpoint)}
    assert meta["frames"] == 30 and meta["prompt"] == "a tired person"  # 1.2 s of audio x 25 fps (keypoints held past their end)
    with av.open(str(tmp_path / "out" / "video.mp4")) as c:
        v, a = c.streams.video[0], c.streams.audio[0]
        assert float(v.average_rate) == 25 and a.codec_context.sample_rate == 16000
        assert float(a.duration * a.time_base) == pytest.approx(1.2, abs=0.05)
    assert len(_frames(tmp_path / "out" / "video.mp4")) == 30


def test_sample_user_errors_are_one_line(compiled, tmp_path, capsys):
    argv = ["sample", "--config", TINY, "--reference", str(PORTRAIT), "--out", str(tmp_path / "o")]
    assert main([*argv, "--keypoints", str(tmp_path / "missing.parquet")]) == 2
    assert "keypoints table" in capsys.readouterr().err
    assert main([*argv, "--keypoints", str(compiled / "controls.parquet")]) == 2
    assert "expected columns frame, keypoints" in capsys.readouterr().err
    assert main([*argv, "--keypoints", str(compiled / "keypoints.parquet"), "--checkpoint", str(tmp_path)]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
