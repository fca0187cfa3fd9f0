"""Samples -> model inputs: VAE latents with the reference in frame 0, pose latents, text and audio states.

Every frozen part runs here, under ``no_grad``; what comes out is all the DiT needs, so it is also
what a cache of frozen-encoder outputs would hold per sample.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from cogportrait.face.render import render_pose_video
from training.model import Stage2Model


def padded_frame_count(n_frames: int) -> int:
    """The smallest 4k + 1 >= n_frames: the lengths the Wan VAE encodes without dropping frames."""
    return 4 * math.ceil(max(n_frames - 1, 0) / 4) + 1


@dataclass
class Stage2Batch:
    latents: torch.Tensor  # (B, C, F', H', W'): frame 0 the reference's latent, then the video's (zeros when sampling)
    pose_latents: torch.Tensor  # (B, C, F', H', W'): the rendered keypoint video's latents
    text_states: torch.Tensor  # (B, L_text, d_text), frozen UMT5
    audio_states: torch.Tensor  # (B, L_audio, d_audio), frozen wav2vec2

    def to(self, device: torch.device | str) -> Stage2Batch:
        return Stage2Batch(*(getattr(self, f.name).to(device) for f in fields(self)))

    @classmethod
    def concat(cls, parts: list[Stage2Batch]) -> Stage2Batch:
        """One batch of several (each field concatenated along the batch)."""
        return cls(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)))


def pose_video(keypoints: np.ndarray, size: int) -> np.ndarray:
    """(B, F, 62, 2|3) keypoints in [0, 1] of the frame -> (B, F, size, size, 3) uint8 pose videos."""
    return np.stack([render_pose_video(kp, size) for kp in np.asarray(keypoints)])


@torch.no_grad()
def encode_batch(model: Stage2Model, reference: np.ndarray, keypoints: np.ndarray, audio: np.ndarray, prompts: list[str],
                 video: np.ndarray | None = None) -> Stage2Batch:
    """One batch of samples (numpy, as the data layer yields them) -> ``Stage2Batch``.

    reference (B, H, W, 3) uint8; keypoints (B, F, 62, 3); audio (B, N) 16 kHz; video (B, F, H, W, 3)
    uint8 for training, None for sampling (the video latents are then zeros of the right shape).
    """
    size = int(reference.shape[1])
    ref = model.codec.encode(np.asarray(reference)[:, None])  # causal VAE: frame 0 alone = the video's frame 0
    pose = model.codec.encode(pose_video(keypoints, size))
    latents = model.codec.encode(video) if video is not None else torch.zeros_like(pose)
    latents[:, :, :1] = ref
    return Stage2Batch(latents, pose, model.text(list(prompts)), model.audio(audio))
