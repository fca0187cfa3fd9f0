"""The flow-matching training loss of PortraitDiT, with condition dropout (Wan convention, see flow.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from training.conditioning import Stage2Batch
from training.config import FlowConfig, TrainConfig
from training.flow import add_noise, per_sample_flow_error, sample_sigmas, token_timesteps, velocity_target
from training.model import PortraitDiT


@dataclass
class NoiseDraw:
    """Everything random about one training step, drawn on the CPU from one generator, so a step is
    reproduced exactly from (seed, data position) on any device and after a resume."""

    sigma: torch.Tensor  # (B,)
    noise: torch.Tensor  # like the latents
    keep_pose: torch.Tensor  # (B,) 1 = keep the condition, 0 = dropped
    keep_audio: torch.Tensor
    keep_text: torch.Tensor


def draw_noise(shape: tuple[int, ...], flow: FlowConfig, train: TrainConfig, generator: torch.Generator) -> NoiseDraw:
    b = shape[0]
    sigma = sample_sigmas(b, flow.shift, flow.timestep_sampling, generator, flow.logit_mean, flow.logit_std)
    noise = torch.randn(shape, generator=generator)
    keep = [(torch.rand(b, generator=generator) >= p).float() for p in (train.drop_pose, train.drop_audio, train.drop_text)]
    return NoiseDraw(sigma, noise, *keep)


def step_generator(seed: int, position: int) -> torch.Generator:
    """The generator of the step that consumes data position ``position``."""
    return torch.Generator().manual_seed(seed * 1_000_003 + position)


def flow_matching_errors(dit: PortraitDiT, batch: Stage2Batch, draw: NoiseDraw, null_text: torch.Tensor) -> torch.Tensor:
    """Per-sample flow-matching errors (B,) for one draw: the reference slot stays clean (t = 0 on its
    tokens, no loss there); a dropped text is replaced by the negative prompt's states ``null_text``
    (1, L, d), the unconditional branch the sampler uses."""
    device = batch.latents.device
    sigma, noise = draw.sigma.to(device), draw.noise.to(device)
    x_t = add_noise(batch.latents, noise, sigma)
    x_t[:, :, :1] = batch.latents[:, :, :1]
    keep_text = draw.keep_text.to(device).reshape(-1, 1, 1)
    text = keep_text * batch.text_states + (1 - keep_text) * null_text.to(device)
    timestep = token_timesteps(sigma, tuple(x_t.shape), getattr(dit, "module", dit).patch_size)  # DDP wraps the model
    prediction = dit(x_t, timestep, text, batch.audio_states, batch.pose_latents,
                     pose_keep=draw.keep_pose.to(device), audio_keep=draw.keep_audio.to(device))
    return per_sample_flow_error(prediction, velocity_target(batch.latents, noise))
