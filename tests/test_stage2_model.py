"""Stage 2 units on tiny random models: flow convention, PortraitDiT's hook, guidance maths, sampler,
checkpoints, configs. CPU, one thread, seconds."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

from cogportrait.config import ConfigError
from cogportrait.schema import keypoint_slice
from training.checkpoint import (TrainerState, backbone_state, latest_checkpoint, load_checkpoint, save_checkpoint,
                                 weights_hash)
from training.conditioning import Stage2Batch
from training.config import GuidanceConfig, SampleConfig, Stage2Config, load_stage2_config
from training.errors import ModelLoadError
from training.flow import add_noise, flow_loss, shift_sigmas, token_timesteps, velocity_target
from training.guidance import combine, eye_gaussian_map, guidance_weight, latent_frame_groups, trapezoid_weight
from training.model import build_stage2_model
from training.objective import draw_noise, flow_matching_errors, step_generator
from training.sampler import sample_latents

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "training" / "configs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_cfg() -> Stage2Config:
    return load_stage2_config(REPO / "training/configs/tiny.yaml", {"model": {"text_max_tokens": 8}})


@pytest.fixture(scope="module")
def tiny(tiny_cfg):
    return build_stage2_model(tiny_cfg.model)


def random_batch(model, frames: int = 9, size: int = 8, b: int = 1, seed: int = 0) -> Stage2Batch:
    """Latent-space inputs of the right shapes without running the VAE (fast)."""
    g = torch.Generator().manual_seed(seed)
    c = model.dit.transformer.config.in_channels
    f_lat = 1 + (frames - 1) // 4
    return Stage2Batch(
        latents=torch.randn(b, c, f_lat, size, size, generator=g),
        pose_latents=torch.randn(b, c, f_lat, size, size, generator=g),
        text_states=torch.randn(b, 8, model.text.dim, generator=g),
        audio_states=torch.randn(b, 6, model.audio.dim, generator=g),
    )


# -- configs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads_and_names_its_launch_command(path):
    cfg = load_stage2_config(path)
    header = path.read_text().split("\nmodel:")[0].split("\nbase:")[0]  # the comment block before the first key
    verb = "train-kto" if path.stem.endswith("-kto") else "train"
    assert f"cogportrait {verb} --config training/configs/{path.name}" in header
    assert (cfg.data.n_frames - 1) % 4 == 0


def test_incompatible_options_fail_fast_with_the_key():
    tiny = REPO / "training/configs/tiny.yaml"
    with pytest.raises(ConfigError, match="bf16 needs train.use_gpu"):
        load_stage2_config(tiny, {"train": {"mixed_precision": "bf16"}})
    with pytest.raises(ConfigError, match="4k\\+1"):
        load_stage2_config(tiny, {"data": {"n_frames": 8}})
    with pytest.raises(ConfigError, match="multiple of 16"):
        load_stage2_config(tiny, {"data": {"resolution": 120}})
    with pytest.raises(ConfigError, match="z_dim"):
        load_stage2_config(tiny, {"model": {"vae_arch": {"z_dim": 48}}})
    with pytest.raises(ConfigError, match="source=local needs a folder for"):
        load_stage2_config(tiny, {"model": {"source": "local"}})
    with pytest.raises(ConfigError, match="unknown key"):
        load_stage2_config(tiny, {"train": {"stepz": 3}})
    with pytest.raises(ConfigError, match="alpha"):
        GuidanceConfig(alpha=0.6, gamma=0.5)


def test_a_missing_model_folder_is_named(tmp_path):
    cfg = load_stage2_config(REPO / "training/configs/wan2.2-ti2v-5b.yaml",
                             {"model": {k: str(tmp_path / k) for k in ("transformer", "vae", "text_encoder", "tokenizer", "audio_encoder")}})
    with pytest.raises(ModelLoadError, match=f"model.transformer: folder {tmp_path / 'transformer'} does not exist"):
        build_stage2_model(cfg.model)


def test_local_folders_load_what_save_pretrained_wrote(tmp_path, tiny_cfg, tiny):
    """source=local: every component from its own folder, nothing from a hub, identical outputs."""
    tiny.dit.transformer.save_pretrained(tmp_path / "transformer")
    tiny.codec.vae.save_pretrained(tmp_path / "vae")
    tiny.text.encoder.save_pretrained(tmp_path / "text_encoder")
    tiny.text.tokenizer.save_pretrained(tmp_path / "tokenizer")
    tiny.audio.encoder.save_pretrained(tmp_path / "audio_encoder")
    local = dataclasses.replace(tiny_cfg.model, source="local", **{k: str(tmp_path / k) for k in
                                ("transformer", "vae", "text_encoder", "tokenizer", "audio_encoder")})
    loaded = build_stage2_model(local)
    batch = random_batch(tiny)
    t = token_timesteps(torch.tensor([0.5]), tuple(batch.latents.shape), tiny.dit.patch_size)
    with torch.no_grad():
        a = tiny.dit.transformer(batch.latents, t, batch.text_states[..., :32], return_dict=False)[0]
        b = loaded.dit.transformer(batch.latents, t, batch.text_states[..., :32], return_dict=False)[0]
    assert torch.equal(a, b)
    assert torch.equal(tiny.text(["a prompt"]), loaded.text(["a prompt"]))


# -- flow matching convention ------------------------------------------------------------------------
def test_flow_convention_is_wans_and_integrates_back_to_the_data():
    """x_σ = σ·ε + (1−σ)·x, v = ε − x: diffusers' shifted Euler scheduler walks the exact velocity back to x."""
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(1, 4, 2, 3, 3, generator=g), torch.randn(1, 4, 2, 3, 3, generator=g)
    assert torch.allclose(add_noise(x, noise, torch.tensor([1.0])), noise)
    assert torch.allclose(add_noise(x, noise, torch.tensor([0.0])), x)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
    scheduler.set_timesteps(6)
    assert torch.allclose(scheduler.timesteps, 1000 * scheduler.sigmas[:-1])
    sample = add_noise(x, noise, scheduler.sigmas[:1])
    for t in scheduler.timesteps:
        sample = scheduler.step(velocity_target(x, noise), t, sample, return_dict=False)[0]
    assert torch.allclose(sample, x, atol=1e-5)
    # the paper's Eq. 1 (t = 1 − σ, x₀ noise, x₁ data): x_t = t·x₁ + (1−t)·x₀ and v_paper = −v_wan
    s = torch.tensor([0.3])
    assert torch.allclose(add_noise(x, noise, s), 0.7 * x + 0.3 * noise)
    assert shift_sigmas(torch.tensor(0.5), 3.0) == pytest.approx(0.75)


def test_token_timesteps_are_zero_on_the_reference_frame_only():
    t = token_timesteps(torch.tensor([0.25, 1.0]), (2, 16, 3, 4, 6), (1, 2, 2))
    assert t.shape == (2, 3 * 2 * 3)
    assert torch.all(t[:, :6] == 0)
    assert torch.all(t[0, 6:] == 250) and torch.all(t[1, 6:] == 1000)


def test_reference_slot_carries_no_loss():
    p, q = torch.zeros(1, 2, 3, 2, 2), torch.zeros(1, 2, 3, 2, 2)
    q[:, :, 0] = 5.0
    assert flow_loss(p, q) == 0
    q[:, :, 2] = 1.0
    assert flow_loss(p, q) == pytest.approx(0.5)


# -- PortraitDiT --------------------------------------------------------------------------------------
def test_zero_initialised_adapter_leaves_the_backbone_bit_identical(tiny):
    batch = random_batch(tiny)
    t = token_timesteps(torch.tensor([0.7]), tuple(batch.latents.shape), tiny.dit.patch_size)
    with torch.no_grad():
        with_pose = tiny.dit(batch.latents, t, batch.text_states, batch.audio_states, batch.pose_latents)
        bare = tiny.dit.transformer(batch.latents, t, tiny.dit.context(batch.text_states, batch.audio_states), return_dict=False)[0]
    assert torch.equal(with_pose, bare)


def test_checkpoint_keeps_the_backbone_layout(tiny, tmp_path):
    keys = set(WanTransformer3DModel(**Stage2Config().model.transformer_arch.kwargs()).state_dict())
    save_checkpoint(tmp_path, tiny.dit, None, TrainerState(step=1))
    assert set(backbone_state(latest_checkpoint(tmp_path))) == keys
    assert {k.split(".")[0] for k in tiny.dit.state_dict()} == {"transformer", "pose_adapter", "text_projection", "audio_projection"}


def test_one_step_reaches_the_pose_adapter_and_both_projections(tiny_cfg):
    model = build_stage2_model(tiny_cfg.model)
    dit = model.dit
    opt = torch.optim.AdamW(dit.parameters(), lr=1e-3)
    batch = random_batch(model)
    train = dataclasses.replace(tiny_cfg.train, drop_pose=0.0, drop_audio=0.0, drop_text=0.0)
    draw = draw_noise(tuple(batch.latents.shape), tiny_cfg.flow, train, step_generator(0, 0))
    flow_matching_errors(dit, batch, draw, torch.zeros(1, 8, model.text.dim)).mean().backward()
    for name in ("pose_adapter", "text_projection", "audio_projection"):
        grads = [p.grad for p in getattr(dit, name).parameters() if p.grad is not None]
        assert grads and max(float(g.abs().max()) for g in grads) > 0, name
    opt.step()
    opt.zero_grad()
    flow_matching_errors(dit, batch, draw, torch.zeros(1, 8, model.text.dim)).mean().backward()
    assert float(dit.pose_adapter.mix.weight.grad.abs().max()) > 0  # past the zero layer after one update


def test_dropped_pose_and_audio_are_the_same_as_absent_ones(tiny_cfg):
    model = build_stage2_model(tiny_cfg.model)
    torch.nn.init.normal_(model.dit.pose_adapter.embed.weight)
    torch.nn.init.normal_(model.dit.audio_projection.net[2].weight)
    batch = random_batch(model)
    t = token_timesteps(torch.tensor([0.5]), tuple(batch.latents.shape), model.dit.patch_size)
    with torch.no_grad():
        dropped = model.dit(batch.latents, t, batch.text_states, batch.audio_states, batch.pose_latents,
                            pose_keep=torch.zeros(1), audio_keep=torch.zeros(1))
        absent = model.dit(batch.latents, t, batch.text_states, batch.audio_states, None, audio_keep=torch.zeros(1))
        kept = model.dit(batch.latents, t, batch.text_states, batch.audio_states, batch.pose_latents)
    assert torch.equal(dropped, absent)
    assert not torch.allclose(dropped, kept)


# -- guidance ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("rho, expected", [(0.0, 8.0), (0.2499, 8.0), (0.25, 8.0), (0.4, 6.0), (0.55, 4.0), (0.9, 4.0), (1.0, 4.0)])
def test_trapezoid_schedule(rho, expected):
    assert trapezoid_weight(rho, 8.0, 4.0, 0.25, 0.55) == pytest.approx(expected)


def _keypoints_with_irises(left, right, frames: int = 5) -> np.ndarray:
    kp = np.full((frames, 62, 3), 0.5, np.float32)
    kp[:, keypoint_slice("left_iris").start, :2] = left
    kp[:, keypoint_slice("right_iris").start, :2] = right
    return kp


def test_eye_map_centre_and_width():
    """Centre = iris midpoint, σ = κ·d_eye, both in latent cells (a cell's centre at (j + 0.5)/W')."""
    kp = _keypoints_with_irises((0.625, 0.375), (0.375, 0.375))  # midpoint (0.5, 0.375), d = 0.25 of the width
    g = eye_gaussian_map(kp, (16, 16), kappa=1.0)
    assert g.shape == (2, 16, 16)
    cx, cy, d = 0.5 * 16 - 0.5, 0.375 * 16 - 0.5, 0.25 * 16
    ys, xs = np.mgrid[0:16, 0:16]
    expected = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * d**2))
    np.testing.assert_allclose(g[1], expected, atol=1e-6)
    assert np.unravel_index(g[1].argmax(), g[1].shape) in {(5, 7), (5, 8), (6, 7), (6, 8)}
    wide = eye_gaussian_map(kp, (16, 16), kappa=2.0)
    assert wide[1, 0, 0] > g[1, 0, 0]
    missing = kp.copy()
    missing[1:] = np.nan
    assert np.all(eye_gaussian_map(missing, (16, 16), 1.0)[1] == 0)


def test_eye_map_follows_each_latent_frames_own_frames():
    kp = _keypoints_with_irises((0.3, 0.5), (0.1, 0.5), frames=9)
    kp[5:, keypoint_slice("left_iris").start, :2] = (0.9, 0.5)
    kp[5:, keypoint_slice("right_iris").start, :2] = (0.7, 0.5)
    assert [list(g) for g in latent_frame_groups(9)] == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]
    g = eye_gaussian_map(kp, (8, 8), 0.5)
    assert g[1].argmax() % 8 < 4 and g[2].argmax() % 8 >= 4


def test_guidance_weight_modes():
    eye = torch.from_numpy(eye_gaussian_map(_keypoints_with_irises((0.6, 0.4), (0.4, 0.4)), (8, 8), 1.0))
    dyn = GuidanceConfig()
    w = guidance_weight(dyn, 0.0, eye)
    assert w.shape == (1, 1, 2, 8, 8)
    peak = float(eye.max())
    assert float(w.max()) == pytest.approx(8.0 * peak + 1.0 * (1 - peak))
    assert float(w.min()) >= 1.0
    assert guidance_weight(dataclasses.replace(dyn, mode="temporal"), 0.4, eye) == pytest.approx(6.0)
    assert guidance_weight(dataclasses.replace(dyn, mode="plain", scale=3.0), 0.1, eye) == 3.0
    spatial = guidance_weight(dataclasses.replace(dyn, mode="spatial", scale=3.0), 0.9, eye)
    assert float(spatial.max()) == pytest.approx(3.0 * peak + (1 - peak))
    cond, uncond = torch.ones(1), torch.zeros(1)
    assert combine(cond, uncond, 4.0) == 4.0


# -- sampler -----------------------------------------------------------------------------------------
def _sample(tiny, cfg: SampleConfig, seed: int = 0) -> tuple[torch.Tensor, Stage2Batch]:
    batch = random_batch(tiny, seed=3)
    eye = torch.from_numpy(eye_gaussian_map(_keypoints_with_irises((0.6, 0.4), (0.4, 0.4), 9), (8, 8), 1.0))
    return sample_latents(tiny.dit, batch, torch.zeros(1, 8, tiny.text.dim), eye, cfg, 3.0, torch.Generator().manual_seed(seed)), batch


@pytest.fixture(scope="module")
def guided_tiny(tiny_cfg):
    """A tiny model whose pose and audio paths are not zero, so guidance has something to weigh."""
    model = build_stage2_model(tiny_cfg.model)
    torch.manual_seed(5)
    torch.nn.init.normal_(model.dit.pose_adapter.embed.weight, std=0.05)
    torch.nn.init.normal_(model.dit.audio_projection.net[2].weight, std=0.05)
    return model


def test_dynamic_cfg_with_equal_weights_is_plain_cfg(guided_tiny):
    flat = SampleConfig(steps=4, guidance=GuidanceConfig(mode="dynamic", omega_hi=3.0, omega_lo=3.0, omega_bg=3.0))
    plain = SampleConfig(steps=4, guidance=GuidanceConfig(mode="plain", scale=3.0))
    a, _ = _sample(guided_tiny, flat)
    b, _ = _sample(guided_tiny, plain)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    c, _ = _sample(guided_tiny, SampleConfig(steps=4))  # the paper's dynamic weights differ
    assert not torch.allclose(a, c, atol=1e-4)


def test_reference_slot_is_bit_identical_and_seeds_matter(guided_tiny):
    cfg = SampleConfig(steps=3)
    a, batch = _sample(guided_tiny, cfg, seed=1)
    assert torch.equal(a[:, :, :1], batch.latents[:, :, :1])
    b, _ = _sample(guided_tiny, cfg, seed=1)
    c, _ = _sample(guided_tiny, cfg, seed=2)
    assert torch.equal(a, b)
    assert not torch.allclose(a[:, :, 1:], c[:, :, 1:])
    none, _ = _sample(guided_tiny, SampleConfig(steps=3, guidance=GuidanceConfig(mode="none")), seed=1)
    assert torch.equal(none[:, :, :1], batch.latents[:, :, :1]) and not torch.allclose(none, a)


# -- checkpoints -------------------------------------------------------------------------------------
def test_checkpoint_round_trip_restores_model_optimizer_and_position(tiny_cfg, tmp_path):
    model = build_stage2_model(tiny_cfg.model)
    opt = torch.optim.AdamW(model.dit.parameters(), lr=1e-3)
    batch = random_batch(model)
    draw = draw_noise(tuple(batch.latents.shape), tiny_cfg.flow, tiny_cfg.train, step_generator(0, 0))
    flow_matching_errors(model.dit, batch, draw, torch.zeros(1, 8, model.text.dim)).mean().backward()
    opt.step()
    for step in (1, 2, 3):
        path = save_checkpoint(tmp_path, model.dit, opt, TrainerState(step=step, position=4 * step, losses=[0.5] * step), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003"]
    assert latest_checkpoint(tmp_path) == path
    other = build_stage2_model(dataclasses.replace(tiny_cfg.model, seed=7))
    other_opt = torch.optim.AdamW(other.dit.parameters(), lr=1e-3)
    state = load_checkpoint(path, other.dit, other_opt)
    assert (state.step, state.position, state.losses) == (3, 12, [0.5] * 3)
    for (k, v), (_, w) in zip(model.dit.state_dict().items(), other.dit.state_dict().items()):
        assert torch.equal(v, w), k
    s1, s2 = opt.state_dict()["state"], other_opt.state_dict()["state"]
    assert s1.keys() == s2.keys() and all(torch.equal(s1[i]["exp_avg_sq"], s2[i]["exp_avg_sq"]) for i in s1)
    assert len(weights_hash(path)) == 64
    assert json.loads((path / "state.json").read_text())["position"] == 12
