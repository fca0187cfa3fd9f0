"""KTO refinement (paper Eq. 2 with KTO's signs): the loss by hand, the preference it learns on real
windows, and `cogportrait train-kto` end to end on Ray Train."""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cogportrait.config import KtoConfig
from cogportrait.schema import KTO_SCHEMA, make_id
from pipelines.cli import main
from training.checkpoint import TrainerState, save_checkpoint
from training.conditioning import Stage2Batch, encode_batch
from training.config import GuidanceConfig, SampleConfig, load_stage2_config
from training.data import SampleLoader, plan_windows
from training.kto import kto_loss
from training.model import build_stage2_model
from training.objective import draw_noise, flow_matching_errors, step_generator
from training.sampler import sample_latents

REPO = Path(__file__).resolve().parents[1]
TINY_KTO = str(REPO / "training/configs/tiny-kto.yaml")


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("shift", [0.0, 0.5])
def test_kto_loss_matches_a_hand_computation(shift):
    policy = torch.tensor([0.5, 0.7, 0.4, 0.9], requires_grad=True)
    reference = torch.tensor([0.6, 0.6, 0.6, 0.6]) + shift
    desirable = torch.tensor([True, True, False, False])
    beta, ld, lu, w = 2.0, 1.5, 0.5, 0.25
    terms = kto_loss(policy, reference, desirable, beta, ld, lu, w)
    r = [0.1 + shift, -0.1 + shift, 0.2 + shift, -0.3 + shift]  # e_ref − e_θ
    z = max(0.0, sum(r) / 4)
    kto = (ld * (1 - _sigmoid(beta * (r[0] - z))) + ld * (1 - _sigmoid(beta * (r[1] - z)))
           + lu * (1 - _sigmoid(beta * (z - r[2]))) + lu * (1 - _sigmoid(beta * (z - r[3])))) / 4
    flow = (0.5 + 0.7) / 2  # desirable samples only
    assert float(terms.z_ref) == pytest.approx(z, abs=1e-6)
    assert float(terms.kto) == pytest.approx(kto, abs=1e-6)
    assert float(terms.loss.detach()) == pytest.approx(kto + w * flow, abs=1e-6)
    np.testing.assert_allclose(terms.reward.numpy(), r, atol=1e-6)
    terms.loss.backward()
    # denoising a desirable sample better lowers the loss; an undesirable one, worse lowers it
    assert policy.grad[0] > 0 and policy.grad[1] > 0 and policy.grad[2] < 0 and policy.grad[3] < 0


def test_large_lr_raises_desirable_rewards_and_lowers_undesirable(extracted_sample):
    """Desirable: two real windows. Undesirable: what the model itself generates under the same
    conditions (as `kto negatives` makes them). A few steps at lr 1e-4 (2000x the paper's) move the
    implicit rewards r = e_ref − e_θ apart, measured on 8 fixed draws the training never sees."""
    torch.set_num_threads(2)
    cfg = load_stage2_config(TINY_KTO, {"model": {"text_max_tokens": 8}, "data": {"n_frames": 9}})
    clips, frames = extracted_sample / "clips.parquet", extracted_sample / "frames.parquet"
    windows = plan_windows(clips, frames, 9, 40, 0)
    loader = SampleLoader(frames, cfg.data.resolution, cfg.data.prompt_template)
    samples = [loader(windows[0].to_row()), loader(windows[len(windows) // 2].to_row())]
    model = build_stage2_model(cfg.model)
    null_text = model.text([""])
    real = [encode_batch(model, s["reference"][None], s["keypoints"][None], s["audio"][None], [s["prompt"]], s["video"][None])
            for s in samples]
    quick = SampleConfig(steps=4, guidance=GuidanceConfig(mode="none"))
    generated = [dataclasses.replace(r, latents=sample_latents(model.dit, r, null_text, torch.zeros(r.latents.shape[2:]), quick,
                                                               cfg.flow.shift, torch.Generator().manual_seed(0))) for r in real]
    batch = Stage2Batch.concat(real + generated)
    desirable = torch.tensor([True, True, False, False])
    reference = copy.deepcopy(model.dit).requires_grad_(False)
    kept = dataclasses.replace(cfg.train, drop_pose=0.0, drop_audio=0.0, drop_text=0.0)

    def rewards() -> tuple[float, float]:
        with torch.no_grad():
            r = torch.stack([flow_matching_errors(reference, batch, d, null_text) - flow_matching_errors(model.dit, batch, d, null_text)
                             for d in (draw_noise(tuple(batch.latents.shape), cfg.flow, kept, step_generator(99, k)) for k in range(8))]).mean(0)
        return float(r[desirable].mean()), float(r[~desirable].mean())

    assert rewards() == (0.0, 0.0)  # the policy starts as the reference
    opt = torch.optim.AdamW(model.dit.parameters(), lr=1e-4, weight_decay=0.0)
    history = []
    for step in range(6):
        draw = draw_noise(tuple(batch.latents.shape), cfg.flow, cfg.train, step_generator(0, step))
        with torch.no_grad():
            ref_err = flow_matching_errors(reference, batch, draw, null_text)
        terms = kto_loss(flow_matching_errors(model.dit, batch, draw, null_text), ref_err, desirable, cfg.kto.beta)
        opt.zero_grad()
        terms.loss.backward()
        opt.step()
        history.append(rewards())
    good, bad = zip(*history)
    assert good[-1] > good[0] > 0, history  # desirable rewards rise
    assert bad[-1] < bad[0] < 0, history  # undesirable rewards fall


@pytest.fixture(scope="module")
def preference_tables(ray_session, library_upstream, tmp_path_factory) -> dict[str, Path]:
    """kto_mine's desirable windows, and 'undesirable' rows with the same conditions and another clip's video."""
    from pipelines.kto import run

    out = tmp_path_factory.mktemp("kto")
    run(KtoConfig(controls=str(library_upstream["controls"]), frames=str(library_upstream["frames"]),
                  clips=str(library_upstream["clips"]), out=str(out), test_fraction=0.0))
    rows = pq.read_table(out / "kto.parquet").to_pylist()
    videos = sorted({r["video_path"] for r in rows})
    assert len(videos) > 1
    bad = [{**r, "sample_id": make_id("test-negative", r["sample_id"]), "desirable": False,
            "video_path": next(v for v in videos if v != r["video_path"])} for r in rows]
    pq.write_table(pa.Table.from_pylist(bad, schema=KTO_SCHEMA), out / "negatives.parquet")
    return {"desirable": out / "kto.parquet", "undesirable": out / "negatives.parquet", "clips": library_upstream["clips"]}


@pytest.mark.slow
def test_train_kto_end_to_end(preference_tables, tmp_path, capsys):
    cfg = load_stage2_config(TINY_KTO)
    model = build_stage2_model(cfg.model)
    start = save_checkpoint(tmp_path / "start", model.dit, None, TrainerState(step=60))
    out = tmp_path / "kto_run"
    argv = ["train-kto", "--config", TINY_KTO, "--set", f"train.out={out}", "--set", "train.steps=2", "--set", "train.lr=1e-3",
            "--set", "data.n_frames=9", "--set", f"data.clips={preference_tables['clips']}",
            "--set", f"kto.desirable={preference_tables['desirable']}", "--set", f"kto.undesirable={preference_tables['undesirable']}",
            "--set", f"kto.reference_checkpoint={start}"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["trained_steps"] == 2 and summary["desirable"] > 0 and summary["undesirable"] == summary["desirable"]
    with open(out / "loss.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 and {"reward_desirable", "reward_undesirable", "z_ref", "kto", "flow"} <= set(rows[0])
    # step 1 starts at the reference: its rewards are exactly zero (nan: no sample of that kind in the batch)
    first = [float(rows[0][k]) for k in ("reward_desirable", "reward_undesirable")]
    assert any(not math.isnan(v) for v in first) and all(math.isnan(v) or v == 0 for v in first)
    assert (out / "checkpoints" / "step_00000002" / "model.safetensors").is_file()

    assert main([*argv[:-2], "--set", f"kto.reference_checkpoint={tmp_path / 'none'}"]) == 2
    assert "reference_checkpoint" in capsys.readouterr().err
