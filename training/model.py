"""PortraitDiT: diffusers' ``WanTransformer3DModel`` with a pose adapter and projected text/audio context.

Nothing of the backbone's forward is copied (``../shared/WAN_FACTS.md`` §2-3 measured why none is
needed):

- **Reference**: its VAE latent is latent frame 0 of the sequence and its tokens get timestep 0
  (``training/flow.py: token_timesteps``), Wan2.2 TI2V's image-to-video convention.
- **Pose**: the rendered pose video's VAE latents go through a small 3D-conv adapter whose last
  layer starts at zero and are added to the patch embeddings of the video frames (1:) by a forward
  hook on ``transformer.patch_embedding`` (WanAnimate's additive pose pattern). With the adapter at
  zero the model is bit-identical to the backbone, so fine-tuning starts from the pretrained
  function; the backbone's state-dict keys are unchanged, so its checkpoints load as they are.
- **Text and audio**: frozen UMT5 and wav2vec2 features, each through a projection MLP, are
  concatenated into the cross-attention context (text tokens first). The projections' last
  layer also starts at zero (text: a residual on top of the UMT5 features the backbone was trained
  on; audio: silent until it learns), so a pretrained backbone's text conditioning is untouched at
  step 0.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.errors import ModelLoadError
from training.config import MODEL_FOLDERS, ModelConfig

log = logging.getLogger("cogportrait")


# ------------------------------------------------------------------------------------------------
# new modules
# ------------------------------------------------------------------------------------------------
class PoseAdapter(nn.Module):
    """Pose-video latents (B, C, F', H', W') -> patch-embedding-shaped features (B, D, F', H'/p, W'/p).

    A 3x3x3 conv mixes neighbouring latent positions and frames, then a patch-strided conv (the
    shape of the backbone's own ``patch_embedding``) lifts to the model width; that last conv is
    zero-initialised so the adapter adds nothing until it has learned something.
    """

    def __init__(self, latent_channels: int, inner_dim: int, patch_size: tuple[int, int, int], hidden: int | None = None):
        super().__init__()
        hidden = hidden or max(4 * latent_channels, 32)
        self.mix = nn.Conv3d(latent_channels, hidden, kernel_size=3, padding=1)
        self.act = nn.SiLU()
        self.embed = nn.Conv3d(hidden, inner_dim, kernel_size=patch_size, stride=patch_size)
        nn.init.zeros_(self.embed.weight)
        nn.init.zeros_(self.embed.bias)

    def forward(self, pose_latents: torch.Tensor) -> torch.Tensor:
        return self.embed(self.act(self.mix(pose_latents)))


class ProjectionMLP(nn.Module):
    """Frozen-encoder features -> the backbone's context width; zero at the start (see module doc).

    With equal widths it is a residual (x + MLP(x)), so UMT5 features reach a pretrained Wan exactly
    as it was trained on them; otherwise MLP(x) from zero.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or out_dim
        self.residual = in_dim == out_dim
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, out_dim))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return x + y if self.residual else y


class PortraitDiT(nn.Module):
    """The trainable Stage 2 model: backbone + pose adapter + text and audio projections."""

    def __init__(self, transformer: nn.Module, text_dim: int, audio_dim: int):
        super().__init__()
        cfg = transformer.config
        self.transformer = transformer
        self.patch_size = tuple(cfg.patch_size)
        inner = cfg.num_attention_heads * cfg.attention_head_dim
        self.pose_adapter = PoseAdapter(cfg.in_channels, inner, self.patch_size)
        self.text_projection = ProjectionMLP(text_dim, cfg.text_dim)
        self.audio_projection = ProjectionMLP(audio_dim, cfg.text_dim)
        self._pose_features: torch.Tensor | None = None
        transformer.patch_embedding.register_forward_hook(self._add_pose_features)

    def _add_pose_features(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        """Forward hook on ``patch_embedding``: add the pose features to the video frames (1:) only."""
        pose = self._pose_features
        if pose is None:
            return None
        if pose.shape != output.shape:
            raise ValueError(f"pose features {tuple(pose.shape)} do not match the patch embeddings {tuple(output.shape)}")
        return torch.cat([output[:, :, :1], output[:, :, 1:] + pose[:, :, 1:].to(output.dtype)], dim=2)

    def context(self, text_states: torch.Tensor, audio_states: torch.Tensor, audio_keep: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-attention context (B, L_text + L_audio, text_dim); ``audio_keep`` (B,) zeroes dropped audio."""
        audio = self.audio_projection(audio_states)
        if audio_keep is not None:
            audio = audio * audio_keep.reshape(-1, 1, 1).to(audio.dtype)
        return torch.cat([self.text_projection(text_states), audio], dim=1)

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        text_states: torch.Tensor,
        audio_states: torch.Tensor,
        pose_latents: torch.Tensor | None = None,
        pose_keep: torch.Tensor | None = None,
        audio_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity (Wan convention, B x C x F' x H' x W') for noisy latents whose frame 0 is the reference.

        ``timestep`` is (B,) or per token (B, seq); ``pose_keep``/``audio_keep`` (B,) in {0, 1} drop a
        sample's pose or audio (condition dropout in training, the unconditional branch of CFG).
        """
        pose = None
        if pose_latents is not None:
            pose = self.pose_adapter(pose_latents.to(latents.dtype))
            if pose_keep is not None:
                pose = pose * pose_keep.reshape(-1, 1, 1, 1, 1).to(pose.dtype)
        self._pose_features = pose
        try:
            return self.transformer(latents, timestep, self.context(text_states, audio_states, audio_keep), return_dict=False)[0]
        finally:
            self._pose_features = None


# ------------------------------------------------------------------------------------------------
# frozen parts
# ------------------------------------------------------------------------------------------------
class VideoCodec:
    """The Wan VAE with its latent normalisation (outside the VAE in diffusers, WAN_FACTS §4)."""

    def __init__(self, vae: nn.Module):
        self.vae = vae.eval().requires_grad_(False)
        z = vae.config.z_dim
        self.mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).reshape(1, z, 1, 1, 1)
        self.std = torch.tensor(vae.config.latents_std, dtype=torch.float32).reshape(1, z, 1, 1, 1)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def encode(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 frames (B, F, H, W, 3) -> normalised latents (B, z, 1 + (F-1)/4, H/s, W/s), float32."""
        if isinstance(frames, np.ndarray) and not frames.flags.writeable:  # Ray's zero-copy batches are read-only
            frames = frames.copy()
        x = torch.as_tensor(frames, device=self.device).permute(0, 4, 1, 2, 3).to(self.dtype) / 127.5 - 1.0
        z = self.vae.encode(x).latent_dist.mode().float()
        return (z - self.mean.to(z.device)) / self.std.to(z.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Normalised latents -> uint8 frames (B, F, H, W, 3)."""
        z = latents.float() * self.std.to(latents.device) + self.mean.to(latents.device)
        x = self.vae.decode(z.to(self.dtype), return_dict=False)[0].float()
        x = ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
        return x.permute(0, 2, 3, 4, 1).cpu().numpy()


class TextEncoder:
    """Frozen UMT5: prompts -> (B, L, d_model), padding positions zeroed as Wan's pipelines do."""

    def __init__(self, encoder: nn.Module, tokenizer: Any, max_tokens: int):
        self.encoder = encoder.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens

    @property
    def dim(self) -> int:
        return int(self.encoder.config.d_model)

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        device = next(self.encoder.parameters()).device
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_tokens, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
        states = self.encoder(ids, attention_mask=mask).last_hidden_state.float()
        return states * mask.unsqueeze(-1).to(states.dtype)


class AudioEncoder:
    """Frozen wav2vec2 on 16 kHz audio: (B, N) samples -> (B, L_audio, hidden), 50 features per second."""

    SAMPLE_RATE = 16_000

    def __init__(self, encoder: nn.Module, feature_extractor: Any):
        self.encoder = encoder.eval().requires_grad_(False)
        self.features = feature_extractor

    @property
    def dim(self) -> int:
        return int(self.encoder.config.hidden_size)

    @torch.no_grad()
    def __call__(self, audio: np.ndarray) -> torch.Tensor:
        device = next(self.encoder.parameters()).device
        wave = self.features(list(np.asarray(audio, dtype=np.float32)), sampling_rate=self.SAMPLE_RATE,
                             return_tensors="pt").input_values.to(device)
        return self.encoder(wave.to(next(self.encoder.parameters()).dtype)).last_hidden_state.float()


@dataclass
class Stage2Model:
    """Everything Stage 2 runs: the trainable DiT and the frozen codec and encoders."""

    dit: PortraitDiT
    codec: VideoCodec
    text: TextEncoder
    audio: AudioEncoder

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Stage2Model:
        """Move everything to ``device``; ``dtype`` casts the frozen parts only (the DiT keeps float32
        master weights and runs under autocast)."""
        self.dit.to(device)
        for frozen in (self.codec.vae, self.text.encoder, self.audio.encoder):
            frozen.to(device=device, dtype=dtype or next(frozen.parameters()).dtype)
        return self


# ------------------------------------------------------------------------------------------------
# building / loading
# ------------------------------------------------------------------------------------------------
def _folder(cfg: ModelConfig, key: str) -> str:
    path = Path(getattr(cfg, key)).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"model.{key}: folder {path} does not exist (weights load from local folders only, never a hub)")
    if not any(path.glob("*.json")):
        raise ModelLoadError(f"model.{key}: {path} holds no config (expected the files save_pretrained writes)")
    return str(path)


def check_model_folders(cfg: ModelConfig) -> None:
    """Every model folder the config names exists and holds a saved model (before any worker starts)."""
    for key in MODEL_FOLDERS:
        if getattr(cfg, key):
            _folder(cfg, key)


def build_stage2_model(cfg: ModelConfig) -> Stage2Model:
    """The config's model. Every component whose folder the config names is loaded from it
    (``from_pretrained(..., local_files_only=True)``); with ``source: random`` the others get random
    weights of the ``*_arch`` shapes, reproducible from ``cfg.seed`` (``source: local`` names them all)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    random = _random_components(cfg)
    load = {"transformer": WanTransformer3DModel, "vae": AutoencoderKLWan, "text_encoder": UMT5EncoderModel,
            "tokenizer": AutoTokenizer, "audio_encoder": Wav2Vec2Model}
    parts = {key: cls.from_pretrained(_folder(cfg, key), local_files_only=True) if getattr(cfg, key) else random[key]()
             for key, cls in load.items()}
    audio_dir = Path(cfg.audio_encoder)
    extractor = (Wav2Vec2FeatureExtractor.from_pretrained(str(audio_dir), local_files_only=True)
                 if cfg.audio_encoder and (audio_dir / "preprocessor_config.json").is_file()
                 else Wav2Vec2FeatureExtractor(sampling_rate=AudioEncoder.SAMPLE_RATE, do_normalize=True))
    text = TextEncoder(parts["text_encoder"], parts["tokenizer"], cfg.text_max_tokens)
    audio = AudioEncoder(parts["audio_encoder"], extractor)
    torch.manual_seed(cfg.seed)  # the new modules start the same for a given seed
    dit = PortraitDiT(parts["transformer"], text.dim, audio.dim)
    if cfg.gradient_checkpointing:
        parts["transformer"].enable_gradient_checkpointing()
    if not cfg.train_backbone:
        parts["transformer"].requires_grad_(False)
    return Stage2Model(dit, VideoCodec(parts["vae"]), text, audio)


def _random_components(cfg: ModelConfig) -> dict[str, Any]:
    """Builders of random weights of the configured shapes, each seeded from ``cfg.seed`` and its
    name, so a component is the same whether or not the others are loaded from folders."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import ByT5Tokenizer, UMT5Config, UMT5EncoderModel, Wav2Vec2Config, Wav2Vec2Model

    def seeded(offset: int, build):
        def make():
            torch.manual_seed(cfg.seed * 101 + offset)
            return build()
        return make

    t, a = cfg.text_arch, cfg.audio_arch
    return {
        "transformer": seeded(1, lambda: WanTransformer3DModel(**cfg.transformer_arch.kwargs())),
        "vae": seeded(2, lambda: AutoencoderKLWan(**cfg.vae_arch.kwargs())),
        "text_encoder": seeded(3, lambda: UMT5EncoderModel(UMT5Config(
            vocab_size=t.vocab_size, d_model=t.d_model, d_kv=t.d_kv, d_ff=t.d_ff, num_layers=t.num_layers, num_heads=t.num_heads,
            relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
            dropout_rate=0.0, is_encoder_decoder=False, use_cache=False))),
        "tokenizer": ByT5Tokenizer,  # bytes as ids: needs no vocabulary file
        "audio_encoder": seeded(4, lambda: Wav2Vec2Model(Wav2Vec2Config(
            vocab_size=32, hidden_size=a.hidden_size, num_hidden_layers=a.num_hidden_layers, num_attention_heads=a.num_attention_heads,
            intermediate_size=a.intermediate_size, conv_dim=a.conv_dim, conv_stride=a.conv_stride, conv_kernel=a.conv_kernel,
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, do_stable_layer_norm=True, feat_extract_norm="layer",
            mask_time_prob=0.0, hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0,
            final_dropout=0.0, layerdrop=0.0))),
    }
