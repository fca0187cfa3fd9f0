"""The tiny Stage 2 model really learns, and the pose path really conditions it (issue 9, "Real, not a toy").

Two real 9-frame windows of one person (lp_d3: eyes closed vs eyes open, picked from the extract
stage's blink blendshapes), one reference frame from elsewhere in the clip. The tiny model is fitted
on both with the real objective (flow matching, condition dropout), then sampled with each window's
keypoints under the default dynamic CFG. The pixels are compared with each window's own VAE
reconstruction, which is the closest any latent model with this VAE can come to the window.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cogportrait.schema import BLENDSHAPE_NAMES, keypoint_slice
from training.conditioning import Stage2Batch, encode_batch
from training.config import load_stage2_config
from training.data import SampleLoader, plan_windows
from training.guidance import eye_gaussian_map
from training.model import build_stage2_model
from training.objective import draw_noise, flow_matching_errors, step_generator
from training.sampler import sample_latents

REPO = Path(__file__).resolve().parents[1]
STEPS, LR = 1000, 3e-3


def _blink(frames_parquet: Path, clip_id: str) -> np.ndarray:
    t = pq.read_table(frames_parquet, filters=[("clip_id", "=", clip_id)], columns=["frame", "blendshapes"]).sort_by("frame")
    b = np.stack(t.column("blendshapes").to_numpy(zero_copy_only=False))
    return (b[:, BLENDSHAPE_NAMES.index("eyeBlinkLeft")] + b[:, BLENDSHAPE_NAMES.index("eyeBlinkRight")]) / 2


def _eye_box(keypoints: list[np.ndarray], size: int, pad: int = 3) -> np.ndarray:
    """Pixels around both eyes and brows of both windows (one box, so both samples are compared on the same pixels)."""
    groups = [keypoint_slice(g) for g in ("left_eye", "right_eye", "left_brow", "right_brow")]
    pts = np.concatenate([kp[:, g, :2].reshape(-1, 2) for kp in keypoints for g in groups])
    x0, y0 = np.floor(pts.min(0) * size).astype(int) - pad
    x1, y1 = np.ceil(pts.max(0) * size).astype(int) + pad
    mask = np.zeros((size, size), bool)
    mask[max(y0, 0):y1, max(x0, 0):x1] = True
    return mask


def _diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute difference (grey levels) over the generated frames (1:, frame 0 is the reference) inside ``mask``."""
    return float(np.abs(a[1:].astype(np.float64) - b[1:].astype(np.float64))[:, mask].mean())


@pytest.mark.slow
def test_tiny_model_overfits_two_windows_and_the_pose_path_conditions_the_eyes(extracted_sample):
    torch.set_num_threads(2)
    cfg = load_stage2_config(REPO / "training/configs/tiny.yaml", {"model": {"text_max_tokens": 8}})
    clips, frames = extracted_sample / "clips.parquet", extracted_sample / "frames.parquet"
    clip_id = next(r["clip_id"] for r in pq.read_table(clips, columns=["clip_id", "identity"]).to_pylist() if r["identity"] == "lp_woman_d3")
    windows = [w for w in plan_windows(clips, frames, 9, 1, 0) if w.clip_id == clip_id]
    blink = _blink(frames, clip_id)
    closure = np.array([blink[w.start_frame:w.end_frame].mean() for w in windows])
    closed, open_ = windows[int(closure.argmax())], windows[int(closure.argmin())]
    assert blink[closed.start_frame:closed.end_frame].min() > 0.5 > 0.1 > blink[open_.start_frame:open_.end_frame].max()
    far = [f for f in np.flatnonzero(blink < 0.1) if min(abs(f - closed.start_frame), abs(f - open_.start_frame)) > 50]
    reference = int(far[len(far) // 2])  # an open-eyed frame of the same clip, away from both windows
    loader = SampleLoader(frames, cfg.data.resolution, cfg.data.prompt_template)
    samples = [loader(dataclasses.replace(w, reference_frame=reference).to_row()) for w in (closed, open_)]

    model = build_stage2_model(cfg.model)
    encoded = [encode_batch(model, s["reference"][None], s["keypoints"][None], s["audio"][None], [s["prompt"]], s["video"][None])
               for s in samples]
    batch = Stage2Batch.concat(encoded)
    null_text = model.text([cfg.sample.negative_prompt])
    all_kept = dataclasses.replace(cfg.train, drop_pose=0.0, drop_audio=0.0, drop_text=0.0)

    def held_out_loss() -> float:  # the same 16 (σ, noise) draws before and after
        with torch.no_grad():
            return float(np.mean([flow_matching_errors(model.dit, batch, draw_noise(tuple(batch.latents.shape), cfg.flow, all_kept,
                                                                                     step_generator(99, k)), null_text).mean()
                                  for k in range(16)]))

    before = held_out_loss()
    opt = torch.optim.AdamW(model.dit.parameters(), lr=LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS)
    for step in range(STEPS):
        draw = draw_noise(tuple(batch.latents.shape), cfg.flow, cfg.train, step_generator(0, step))  # with condition dropout
        loss = flow_matching_errors(model.dit, batch, draw, null_text).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.dit.parameters(), 1.0)
        opt.step()
        schedule.step()
    after = held_out_loss()
    assert before / after >= 10, (before, after)

    model.dit.eval()
    generated = []
    for s, e in zip(samples, encoded):
        cond = Stage2Batch(torch.zeros_like(e.latents), e.pose_latents, e.text_states, e.audio_states)
        cond.latents[:, :, :1] = e.latents[:, :, :1]  # the reference only: the window's own latents are not given
        eye_map = torch.from_numpy(eye_gaussian_map(s["keypoints"], tuple(e.latents.shape[-2:]), cfg.sample.guidance.kappa))
        latents = sample_latents(model.dit, cond, null_text, eye_map, cfg.sample, cfg.flow.shift, torch.Generator().manual_seed(0))
        assert torch.equal(latents[:, :, :1], e.latents[:, :, :1])
        generated.append(model.codec.decode(latents)[0])
    recon = [model.codec.decode(e.latents)[0] for e in encoded]
    eyes = _eye_box([s["keypoints"] for s in samples], cfg.data.resolution)
    print(f"loss {before:.3f} -> {after:.3f} ({before / after:.1f}x); eyes of sample closed/open vs recon closed/open: "
          f"{_diff(generated[0], recon[0], eyes):.1f}/{_diff(generated[0], recon[1], eyes):.1f}, "
          f"{_diff(generated[1], recon[0], eyes):.1f}/{_diff(generated[1], recon[1], eyes):.1f}; samples apart: eyes "
          f"{_diff(generated[0], generated[1], eyes):.1f}, background {_diff(generated[0], generated[1], ~eyes):.1f}")
    for own, other in ((0, 1), (1, 0)):
        # each sample's eyes are closer to its own window than to the other one
        assert _diff(generated[own], recon[own], eyes) < 0.75 * _diff(generated[own], recon[other], eyes)
    # the two samples differ in the eyes, far less in the background
    assert _diff(generated[0], generated[1], ~eyes) < 0.5 * _diff(generated[0], generated[1], eyes)
