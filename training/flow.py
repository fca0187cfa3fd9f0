"""Flow matching in Wan's convention, and how it maps onto the paper's Eq. 1.

Wan (and diffusers' ``FlowMatchEulerDiscreteScheduler``) parameterise the path by a noise level σ:

    x_σ = σ·ε + (1 − σ)·x,     target v = ε − x,     timestep = 1000·σ,

with σ = 1 pure noise and σ = 0 the data ``x``. The paper's Eq. 1 runs the other way: t = 0 is the
noise x₀ ~ N(0, I), t = 1 the data x₁, x_t = t·x₁ + (1 − t)·x₀ and the target x₁ − x₀. The two are
the same objective under

    t = 1 − σ,   x₀ (paper) = ε,   x₁ (paper) = x,   v_paper = x₁ − x₀ = −v_wan,

so ‖v_θ − (x₁ − x₀)‖² = ‖v_wan,θ − (ε − x)‖². We keep Wan's side so a pretrained Wan2.2 checkpoint
sees the inputs, timesteps and targets it was trained on; a model trained here drops into
diffusers' Wan schedulers and pipelines unchanged.

Timestep sampling (``FlowConfig.timestep_sampling``): ``shifted_uniform`` (default) draws u ~ U(0, 1)
and applies Wan's shift σ = s·u / (1 + (s − 1)·u), which is the density of noise levels the shifted
Euler sampler visits, so training spends its steps where sampling does (high noise for s > 1, where
the layout and the eye configuration are decided). ``logit_normal`` draws u = sigmoid(N(m, s²))
(SD3's choice) and applies the same shift.
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000  # Wan: timestep = 1000·σ


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan's timestep shift σ' = s·σ / (1 + (s − 1)·σ): s > 1 moves probability towards noise."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def sample_sigmas(n: int, shift: float, method: str, generator: torch.Generator,
                  logit_mean: float = 0.0, logit_std: float = 1.0) -> torch.Tensor:
    """``n`` training noise levels in (0, 1] (see the module docstring for the choices)."""
    if method == "shifted_uniform":
        u = torch.rand(n, generator=generator)
    elif method == "logit_normal":
        u = torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator))
    else:
        raise ValueError(f"unknown timestep sampling {method!r}")
    return shift_sigmas(u.clamp(1e-4, 1.0), shift)


def add_noise(x: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_σ = σ·ε + (1 − σ)·x, σ per sample (B,) broadcast over C, F, H, W."""
    s = sigma.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return s * noise + (1.0 - s) * x


def velocity_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Wan's regression target v = ε − x (the negative of the paper's x₁ − x₀)."""
    return noise - x


def token_timesteps(sigma: torch.Tensor, latent_shape: tuple[int, ...], patch_size: tuple[int, ...]) -> torch.Tensor:
    """Per-token timesteps (B, seq) in frame-major order: 1000·σ on every video token and 0 on the
    reference's tokens (latent frame 0), as Wan2.2 TI2V's image-to-video path gives its fixed first frame."""
    _, _, f, h, w = latent_shape
    per_frame = (h // patch_size[1]) * (w // patch_size[2])
    t = (NUM_TRAIN_TIMESTEPS * sigma).reshape(-1, 1, 1).expand(-1, f, per_frame).clone()
    t[:, 0] = 0.0
    return t.reshape(t.shape[0], -1)


def per_sample_flow_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample (B,) over the video slots (latent frames 1:); the reference
    slot is given, not predicted, so it carries no loss."""
    return (prediction[:, :, 1:].float() - target[:, :, 1:].float()).pow(2).mean(dim=(1, 2, 3, 4))


def flow_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The flow-matching loss of a batch: the mean of ``per_sample_flow_error``."""
    return per_sample_flow_error(prediction, target).mean()
