"""Stage 2's configuration: one typed dataclass per section of a ``training/configs/*.yaml`` file.

A config file is the whole recipe of a run (model, flow matching, data, training, sampling), so a
run is reproduced from its file alone; ``cogportrait train --config FILE --set train.steps=10``
overrides keys with the same syntax as every other verb. Choices are named in the ``*_CHOICES``
tuples below, and options that cannot work together fail in ``Stage2Config.__post_init__``, before
any model is built or any Ray worker starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from cogportrait.config import KTO_SPLITS, ConfigError, _check_choice, _check_range, from_mapping

MODEL_SOURCES = ("random", "local")  # local: every component from its folder; random: components without a folder get random *_arch weights
TIMESTEP_SAMPLINGS = ("shifted_uniform", "logit_normal")  # training/flow.py: sample_sigmas
MIXED_PRECISIONS = ("no", "bf16")
GUIDANCE_MODES = ("dynamic", "temporal", "spatial", "plain", "none")  # training/guidance.py


@dataclass(frozen=True)
class TransformerArch:
    """``WanTransformer3DModel`` kwargs for ``source: random`` (a local model brings its own config.json)."""

    patch_size: tuple[int, ...] = (1, 2, 2)
    num_attention_heads: int = 2
    attention_head_dim: int = 32
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 32
    freq_dim: int = 256
    ffn_dim: int = 128
    num_layers: int = 2
    rope_max_seq_len: int = 1024

    def kwargs(self) -> dict[str, Any]:
        return {**self.__dict__, "patch_size": tuple(self.patch_size)}


@dataclass(frozen=True)
class VaeArch:
    """``AutoencoderKLWan`` kwargs for ``source: random``; latents_mean/std are 0/1 of length z_dim."""

    base_dim: int = 8
    decoder_base_dim: int = 0  # 0: same as base_dim (Wan 2.1 style)
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 1
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # diffusers' spelling
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int = 0  # 0: none (2.1 style); 2 for the 2.2 VAE
    scale_factor_spatial: int = 8

    def kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "base_dim": self.base_dim, "z_dim": self.z_dim, "dim_mult": list(self.dim_mult),
            "num_res_blocks": self.num_res_blocks, "temperal_downsample": list(self.temperal_downsample),
            "latents_mean": [0.0] * self.z_dim, "latents_std": [1.0] * self.z_dim,
        }
        if self.decoder_base_dim:
            kw["decoder_base_dim"] = self.decoder_base_dim
        if self.is_residual:
            kw.update(is_residual=True, in_channels=self.in_channels, out_channels=self.out_channels,
                      patch_size=self.patch_size or None, scale_factor_spatial=self.scale_factor_spatial)
        return kw

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1) * max(1, self.patch_size)


@dataclass(frozen=True)
class TextEncoderArch:
    """``UMT5Config`` for ``source: random``; the tokenizer is then ByT5's (bytes, needs no files)."""

    vocab_size: int = 384  # ByT5 ids are < 259
    d_model: int = 32
    d_kv: int = 8
    d_ff: int = 64
    num_layers: int = 2
    num_heads: int = 4


@dataclass(frozen=True)
class AudioEncoderArch:
    """``Wav2Vec2Config`` for ``source: random`` (16 kHz input, 320 samples per feature at the default strides)."""

    hidden_size: int = 32
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 64
    conv_dim: tuple[int, ...] = (16, 16, 16, 16, 16, 16, 16)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)


@dataclass(frozen=True)
class ModelConfig:
    """The backbone, the frozen encoders and the new modules (pose adapter, projection MLPs)."""

    source: str = "random"
    seed: int = 0  # initialisation of random weights and of the new modules
    transformer: str = ""  # local folders (source: local), each as save_pretrained writes it
    vae: str = ""
    text_encoder: str = ""
    tokenizer: str = ""
    audio_encoder: str = ""
    text_max_tokens: int = 64  # UMT5 tokens kept per prompt (Wan uses 512)
    gradient_checkpointing: bool = False
    train_backbone: bool = True  # false: only the pose adapter and the projection MLPs learn
    transformer_arch: TransformerArch = field(default_factory=TransformerArch)
    vae_arch: VaeArch = field(default_factory=VaeArch)
    text_arch: TextEncoderArch = field(default_factory=TextEncoderArch)
    audio_arch: AudioEncoderArch = field(default_factory=AudioEncoderArch)

    def __post_init__(self) -> None:
        _check_choice("source", self.source, MODEL_SOURCES)
        _check_range("text_max_tokens", self.text_max_tokens, 1, 4096)
        if self.source == "local":
            missing = [k for k in MODEL_FOLDERS if not getattr(self, k)]
            if missing:
                raise ConfigError(f"source=local needs a folder for {', '.join(missing)}")


@dataclass(frozen=True)
class FlowConfig:
    """Flow matching in Wan's convention (training/flow.py documents the mapping to the paper's Eq. 1)."""

    shift: float = 3.0  # Wan's timestep shift: 5.0 for TI2V/720p, 3.0 for 480p
    timestep_sampling: str = "shifted_uniform"
    logit_mean: float = 0.0  # logit_normal only
    logit_std: float = 1.0

    def __post_init__(self) -> None:
        _check_range("shift", self.shift, 0.1, 100.0)
        _check_choice("timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLINGS)
        _check_range("logit_std", self.logit_std, 1e-3, 10.0)


@dataclass(frozen=True)
class DataConfig:
    """Where training windows come from (the extract stage's tables) and their shape."""

    clips: str = "data/extract/clips.parquet"
    frames: str = "data/extract/frames.parquet"
    resolution: int = 128  # square, pixels
    n_frames: int = 17  # F = 4k + 1
    stride: int = 8  # frames between window starts
    min_reference_gap: int = 25  # the reference frame lies this far from the window when the clip allows
    prompt_template: str = "a person talking, {label}"
    max_windows: int = 0  # 0: every window

    def __post_init__(self) -> None:
        _check_range("resolution", self.resolution, 16, 4096)
        _check_range("n_frames", self.n_frames, 1, 1025)
        if (self.n_frames - 1) % 4:
            raise ConfigError(f"n_frames={self.n_frames} must be 4k+1 (the VAE compresses time by 4 after frame 0)")
        _check_range("stride", self.stride, 1)
        _check_range("min_reference_gap", self.min_reference_gap, 0)
        _check_range("max_windows", self.max_windows, 0)


@dataclass(frozen=True)
class TrainConfig:
    out: str = "data/stage2/tiny"  # checkpoints/, loss.csv, metrics.json
    num_workers: int = 1  # Ray Train workers (DDP ranks)
    use_gpu: bool = False
    batch_size: int = 1  # per worker
    steps: int = 100
    lr: float = 1e-4
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # 0: off
    mixed_precision: str = "no"
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    encoder_cache: int = 512  # samples whose frozen-encoder outputs a worker keeps (windows repeat every epoch)
    seed: int = 0
    drop_pose: float = 0.1  # condition dropout: the unconditional branch for CFG (the reference is always kept)
    drop_audio: float = 0.1
    drop_text: float = 0.1

    def __post_init__(self) -> None:
        _check_range("num_workers", self.num_workers, 1, 4096)
        _check_range("batch_size", self.batch_size, 1)
        _check_range("steps", self.steps, 1)
        _check_range("lr", self.lr, 0.0, 1.0)
        _check_range("weight_decay", self.weight_decay, 0.0)
        _check_range("grad_clip", self.grad_clip, 0.0)
        _check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        _check_range("checkpoint_every", self.checkpoint_every, 1)
        _check_range("keep_checkpoints", self.keep_checkpoints, 1)
        for name in ("drop_pose", "drop_audio", "drop_text"):
            _check_range(name, getattr(self, name), 0.0, 1.0)


@dataclass(frozen=True)
class GuidanceConfig:
    """Dynamic eye-region CFG (paper §3.4, Eq. 4-5) and its ablations.

    dynamic: Ω = ω_t(ρ)·G + ω_bg·(1 − G); temporal: Ω = ω_t(ρ); spatial: Ω = scale·G + ω_bg·(1 − G);
    plain: Ω = scale; none: the conditional prediction alone (one forward per step).
    """

    mode: str = "dynamic"
    omega_hi: float = 8.0
    omega_lo: float = 4.0
    alpha: float = 0.25
    gamma: float = 0.55
    kappa: float = 1.0
    omega_bg: float = 1.0
    scale: float = 5.0  # plain and spatial modes

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, GUIDANCE_MODES)
        if not 0.0 <= self.alpha < self.gamma <= 1.0:
            raise ConfigError(f"alpha={self.alpha}, gamma={self.gamma}: need 0 <= alpha < gamma <= 1")
        _check_range("kappa", self.kappa, 1e-3, 100.0)


@dataclass(frozen=True)
class SampleConfig:
    steps: int = 40
    fps: int = 25
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    negative_prompt: str = ""  # the unconditional branch's text

    def __post_init__(self) -> None:
        _check_range("steps", self.steps, 1, 1000)
        _check_range("fps", self.fps, 1, 120)


@dataclass(frozen=True)
class KtoConfig:
    """KTO refinement (paper Eq. 2, ``training/kto.py``): the preference tables and the loss weights."""

    desirable: str = "data/kto/kto.parquet"  # real boundary-case windows (kto_mine)
    undesirable: str = "data/kto_negatives/negatives.parquet"  # the generator's poorly controlled videos (kto negatives)
    reference_checkpoint: str = ""  # the checkpoint the run starts from: the policy's start and the frozen reference
    split: str = "train"
    beta: float = 625.0
    lambda_desirable: float = 1.0
    lambda_undesirable: float = 1.0
    flow_weight: float = 1.0  # the flow-matching term on desirable samples (equal weight: paper §4.1)

    def __post_init__(self) -> None:
        _check_choice("split", self.split, KTO_SPLITS)
        _check_range("beta", self.beta, 0.0)
        for name in ("lambda_desirable", "lambda_undesirable", "flow_weight"):
            _check_range(name, getattr(self, name), 0.0)


@dataclass(frozen=True)
class Stage2Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    kto: KtoConfig = field(default_factory=KtoConfig)

    def __post_init__(self) -> None:
        """Options that are each valid but cannot work together."""
        t, m, d = self.train, self.model, self.data
        if t.mixed_precision == "bf16" and not t.use_gpu:
            raise ConfigError("train.mixed_precision=bf16 needs train.use_gpu=true (bf16 autocast on CPU is slow and not what the GPU run does)")
        if m.source == "random":
            arch = m.transformer_arch
            if arch.in_channels != m.vae_arch.z_dim or arch.out_channels != m.vae_arch.z_dim:
                raise ConfigError(f"model.transformer_arch in/out_channels ({arch.in_channels}/{arch.out_channels}) must equal model.vae_arch.z_dim ({m.vae_arch.z_dim})")
            if len(arch.patch_size) != 3:
                raise ConfigError(f"model.transformer_arch.patch_size={arch.patch_size} must be (t, h, w)")
            if arch.patch_size[0] != 1:
                raise ConfigError("model.transformer_arch.patch_size[0] must be 1: the reference owns latent frame 0 alone")
            grid = m.vae_arch.spatial_factor * arch.patch_size[1]
            if d.resolution % grid:
                raise ConfigError(f"data.resolution={d.resolution} must be a multiple of {grid} (VAE factor {m.vae_arch.spatial_factor} x patch {arch.patch_size[1]})")
            if len(m.vae_arch.temperal_downsample) != len(m.vae_arch.dim_mult) - 1 or sum(m.vae_arch.temperal_downsample) != 2:
                raise ConfigError("model.vae_arch.temperal_downsample must have len(dim_mult) - 1 entries, two of them true (time / 4)")
        if d.n_frames < 5:
            raise ConfigError(f"data.n_frames={d.n_frames}: at least 5 (the reference slot and one video slot)")


MODEL_FOLDERS = ("transformer", "vae", "text_encoder", "tokenizer", "audio_encoder")


def resolve_paths(cfg: Stage2Config, base: str | Path | None = None) -> Stage2Config:
    """The config with every relative path made absolute against ``base`` (default: the working
    directory): Ray Train workers run in their own working directory, so the driver resolves them."""
    base = Path(base or Path.cwd())

    def absolute(path: str) -> str:
        return str(base / path) if path and not Path(path).is_absolute() else path

    model = replace(cfg.model, **{k: absolute(getattr(cfg.model, k)) for k in MODEL_FOLDERS})
    data = replace(cfg.data, clips=absolute(cfg.data.clips), frames=absolute(cfg.data.frames))
    kto = replace(cfg.kto, **{k: absolute(getattr(cfg.kto, k)) for k in ("desirable", "undesirable", "reference_checkpoint")})
    return replace(cfg, model=model, data=data, train=replace(cfg.train, out=absolute(cfg.train.out)), kto=kto)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.steps=10", ...]`` (``--set`` on the command line) -> nested overrides, each value typed
    by its field."""
    from cogportrait.config import parse_value, set_dotted

    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        set_dotted(out, key.strip(), parse_value(Stage2Config, key.strip(), text))
    return out


def load_stage2_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Stage2Config:
    """A ``training/configs/*.yaml`` file as a ``Stage2Config`` (``overrides``: nested dict of keys)."""
    values = _read_config_file(Path(path))
    for key, value in (overrides or {}).items():
        values.setdefault(key, {})
        if isinstance(value, dict) and isinstance(values[key], dict):
            _merge(values[key], value)
        else:
            values[key] = value
    return from_mapping(Stage2Config, values, "")


def _read_config_file(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file's mapping; ``base: other.yaml`` (beside it) is read first and this file's keys
    override it, so a variant (``tiny-kto.yaml``) states only what differs from its base."""
    if not path.is_file():
        raise FileNotFoundError(f"training config {path} does not exist (shipped: training/configs/*.yaml)")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: `base` files form a cycle")
    with open(path) as fh:
        values = yaml.safe_load(fh) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of sections")
    base = values.pop("base", None)
    if base is None:
        return values
    merged = _read_config_file(path.parent / str(base), (*seen, path.resolve()))
    _merge(merged, values)
    return merged


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
