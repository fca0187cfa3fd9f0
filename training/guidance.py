"""Dynamic eye-region classifier-free guidance (paper §3.4, Eq. 4-5), as plain tensor maths.

The guidance weight varies in time (a trapezoid over the denoising progress ρ = i/N: strong early,
when global colour and layout form, weaker later, to avoid the colour shift of a uniformly large
scale) and in space (a Gaussian around the eyes, so gaze, blink and brow motion are guided hard and
the background keeps the base weight). The weight is applied per latent position, which is why
diffusers' scalar ``guidance_scale`` cannot be used and the sampler combines the two predictions
itself.
"""

from __future__ import annotations

import numpy as np
import torch

from cogportrait.schema import keypoint_slice
from training.config import GuidanceConfig

LEFT_IRIS_CENTRE = keypoint_slice("left_iris").start  # iris groups list their centre first
RIGHT_IRIS_CENTRE = keypoint_slice("right_iris").start


def trapezoid_weight(rho: float, omega_hi: float, omega_lo: float, alpha: float, gamma: float) -> float:
    """ω_t(ρ): ω_hi for ρ < α, linear from ω_hi to ω_lo on [α, γ), ω_lo from γ on."""
    if rho < alpha:
        return float(omega_hi)
    if rho < gamma:
        return float(omega_hi + (omega_lo - omega_hi) * (rho - alpha) / (gamma - alpha))
    return float(omega_lo)


def latent_frame_groups(n_frames: int, temporal_factor: int = 4) -> list[np.ndarray]:
    """The video frames each latent frame stands for: frame 0 alone, then ``temporal_factor`` at a time
    (the Wan VAE's causal compression, F' = 1 + (F − 1)/4)."""
    groups = [np.array([0])]
    for start in range(1, n_frames, temporal_factor):
        groups.append(np.arange(start, min(start + temporal_factor, n_frames)))
    return groups


def eye_gaussian_map(keypoints: np.ndarray, latent_hw: tuple[int, int], kappa: float, temporal_factor: int = 4) -> np.ndarray:
    """G_f of Eq. 4 per latent frame: (F', H', W') float32 in [0, 1].

    ``keypoints`` (F, 62, 2|3) are in [0, 1] of the output frame (after the TPS alignment). The
    centre c_eye is the midpoint of the two iris centres and d_eye their distance, both in latent
    cells (a cell's centre at (j + 0.5) / W'), averaged over the frames the latent frame covers.
    A latent frame whose frames have no finite iris gets G = 0: the background weight there.
    """
    kp = np.asarray(keypoints, dtype=np.float64)[..., :2]
    h, w = latent_hw
    scale = np.array([w, h], dtype=np.float64)
    left = kp[:, LEFT_IRIS_CENTRE] * scale - 0.5
    right = kp[:, RIGHT_IRIS_CENTRE] * scale - 0.5
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    out = []
    for frames in latent_frame_groups(len(kp), temporal_factor):
        ok = np.isfinite(left[frames]).all(axis=1) & np.isfinite(right[frames]).all(axis=1)
        if not ok.any():
            out.append(np.zeros((h, w)))
            continue
        l, r = left[frames][ok], right[frames][ok]
        centre = ((l + r) / 2).mean(axis=0)
        d_eye = float(np.linalg.norm(l - r, axis=1).mean())
        width = max(kappa * d_eye, 1e-6)
        out.append(np.exp(-((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2) / (2 * width**2)))
    return np.stack(out).astype(np.float32)


def guidance_weight(cfg: GuidanceConfig, rho: float, eye_map: torch.Tensor) -> torch.Tensor | float:
    """Ω at progress ρ: a scalar (plain, temporal) or a map broadcastable to (B, C, F', H', W')."""
    omega_t = trapezoid_weight(rho, cfg.omega_hi, cfg.omega_lo, cfg.alpha, cfg.gamma)
    if cfg.mode == "plain":
        return cfg.scale
    if cfg.mode == "temporal":
        return omega_t
    peak = omega_t if cfg.mode == "dynamic" else cfg.scale
    return (peak * eye_map + cfg.omega_bg * (1.0 - eye_map))[None, None]  # Eq. 5


def combine(cond: torch.Tensor, uncond: torch.Tensor, weight: torch.Tensor | float) -> torch.Tensor:
    """Classifier-free guidance with a scalar or per-position weight: v_u + Ω·(v_c − v_u)."""
    return uncond + weight * (cond - uncond)
