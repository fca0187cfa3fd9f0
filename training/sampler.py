"""Euler sampling of PortraitDiT with dynamic eye-region CFG and a fixed reference frame.

The noise levels and the Euler update are diffusers' ``FlowMatchEulerDiscreteScheduler`` with Wan's
shift (the same σ grid a Wan pipeline would use); the guidance combine is ours because the weight
varies per latent position (``guidance.py``). After every step latent frame 0 is set back to the
reference's latent, so it leaves the sampler bit-identical, as Wan2.2 TI2V's pipeline does.
"""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tqdm import tqdm

from training.conditioning import Stage2Batch
from training.config import SampleConfig
from training.flow import NUM_TRAIN_TIMESTEPS, token_timesteps
from training.guidance import combine, guidance_weight
from training.model import PortraitDiT


@torch.no_grad()
def sample_latents(dit: PortraitDiT, cond: Stage2Batch, null_text: torch.Tensor, eye_map: torch.Tensor, cfg: SampleConfig,
                   shift: float, generator: torch.Generator, progress: bool = False) -> torch.Tensor:
    """Latents (1, C, F', H', W') for one sample: ``cond.latents[:, :, :1]`` is the reference latent,
    ``eye_map`` (F', H', W') Eq. 4's map, ``null_text`` the negative prompt's states."""
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=shift)
    scheduler.set_timesteps(cfg.steps)
    reference = cond.latents[:, :, :1]
    device = reference.device
    x = torch.randn(cond.latents.shape, generator=generator).to(device=device, dtype=reference.dtype)
    x[:, :, :1] = reference
    guided = cfg.guidance.mode != "none"
    if guided:  # one forward for both branches: [conditional, unconditional]
        text = torch.cat([cond.text_states, null_text.to(device)])
        audio = cond.audio_states.expand(2, -1, -1)
        pose = cond.pose_latents.expand(2, -1, -1, -1, -1)
        keep = torch.tensor([1.0, 0.0], device=device)
    eye_map = eye_map.to(device)
    for i in tqdm(range(cfg.steps), desc="sampling", disable=not progress, leave=False):
        sigma = scheduler.sigmas[i].reshape(1)
        if guided:
            timestep = token_timesteps(sigma, (2, *x.shape[1:]), dit.patch_size).to(device)
            v_cond, v_uncond = dit(x.expand(2, -1, -1, -1, -1), timestep, text, audio, pose, pose_keep=keep, audio_keep=keep).chunk(2)
            velocity = combine(v_cond, v_uncond, guidance_weight(cfg.guidance, i / cfg.steps, eye_map))
        else:
            timestep = token_timesteps(sigma, tuple(x.shape), dit.patch_size).to(device)
            velocity = dit(x, timestep, cond.text_states, cond.audio_states, cond.pose_latents)
        x = scheduler.step(velocity, scheduler.timesteps[i], x, return_dict=False)[0]
        x[:, :, :1] = reference
    return x
