"""Stage 2 generation: reference portrait + Stage 1 keypoints (+ audio, prompt) -> mp4 (``cogportrait sample``).

``Stage2Generator`` holds the models (loaded once) and turns one request into frames; ``sample``
does the file work around it: read the portrait as curate's face crop, warp the keypoints onto it
(TPS from the compiled neutral face to the portrait's detected points), generate, and write
``video.mp4`` (25 fps, audio muxed) and ``sample.json`` (seed, guidance, weights hash) atomically.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq
import torch

from cogportrait.face.tps import align_to_reference
from cogportrait.io.atomic import write_json
from cogportrait.io.preview import PreviewInputError, decode_audio, write_video
from cogportrait.schema import AUDIO_SAMPLE_RATE, CLIP_FPS, N_KEYPOINTS
from training.checkpoint import load_model_weights, weights_hash
from training.conditioning import encode_batch, padded_frame_count
from training.data import resize_square
from training.errors import SampleInputError
from training.config import Stage2Config
from training.guidance import eye_gaussian_map
from training.model import build_stage2_model
from training.sampler import sample_latents

if TYPE_CHECKING:
    from cogportrait.face.reference import Reference

log = logging.getLogger("cogportrait")
NEUTRAL_KEYPOINTS_FILE = "neutral_keypoints.parquet"  # written by ``cogportrait compile`` beside keypoints.parquet


def state_hash(module: torch.nn.Module) -> str:
    """sha256 over a module's weights (names and bytes): the identity of weights that have no file."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class Stage2Generator:
    """PortraitDiT + VAE + encoders, loaded once; ``__call__`` generates one video."""

    def __init__(self, cfg: Stage2Config, checkpoint: str | Path | None = None, device: str | None = None):
        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = build_stage2_model(cfg.model)
        if checkpoint is not None:
            load_model_weights(checkpoint, self.model.dit)
            self.weights = {"checkpoint": str(checkpoint), "sha256": weights_hash(checkpoint)}
        else:
            self.weights = {"checkpoint": None, "source": cfg.model.source, "sha256": state_hash(self.model.dit)}
        self.model.to(self.device, torch.bfloat16 if self.device.type == "cuda" else None)
        self.model.dit.eval()
        self.null_text = self.model.text([cfg.sample.negative_prompt])

    @property
    def resolution(self) -> int:
        return self.cfg.data.resolution

    def __call__(self, reference: np.ndarray, keypoints: np.ndarray, audio: np.ndarray | None, prompt: str, seed: int,
                 progress: bool = False) -> np.ndarray:
        """reference (R, R, 3) uint8 at the config's resolution; keypoints (T, 62, 3) in [0, 1] of that
        frame (already aligned); audio (N,) 16 kHz or None -> frames (T, R, R, 3) uint8, frame 0 the reference."""
        n = len(keypoints)
        if n < 1:
            raise SampleInputError("no keypoint frames to generate")
        f = padded_frame_count(n)
        kp = np.pad(np.asarray(keypoints, np.float32), ((0, f - n), (0, 0), (0, 0)), mode="edge")  # the VAE's 4k + 1 frames
        samples = int(round(f / CLIP_FPS * AUDIO_SAMPLE_RATE))
        wave = np.zeros(samples, np.float32) if audio is None else np.asarray(audio, np.float32)[:samples]
        wave = np.pad(wave, (0, samples - len(wave)))
        cond = encode_batch(self.model, reference[None], kp[None], wave[None], [prompt]).to(self.device)
        h, w = cond.latents.shape[-2:]
        eye_map = torch.from_numpy(eye_gaussian_map(kp, (h, w), self.cfg.sample.guidance.kappa))
        generator = torch.Generator().manual_seed(int(seed))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            latents = sample_latents(self.model.dit, cond, self.null_text, eye_map, self.cfg.sample, self.cfg.flow.shift,
                                     generator, progress=progress)
        return self.model.codec.decode(latents)[0][:n]


# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SampleArgs:
    reference: str
    keypoints: str
    out: str
    checkpoint: str | None = None
    audio: str | None = None
    prompt: str | None = None
    seed: int = 0


def read_keypoints_table(path: str | Path) -> np.ndarray:
    """A compiled keypoints table (``COMPILED_KEYPOINTS_SCHEMA``) -> (T, 62, 3) float32, in frame order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"keypoints table {path} does not exist")
    table = pq.read_table(path)
    if "keypoints" not in table.column_names or "frame" not in table.column_names:
        raise SampleInputError(f"{path}: expected columns frame, keypoints (cogportrait compile's keypoints.parquet)")
    order = np.argsort(table.column("frame").to_numpy())
    flat = table.column("keypoints").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    if flat.size != len(table) * N_KEYPOINTS * 3:
        raise SampleInputError(f"{path}: keypoints must be {N_KEYPOINTS} x 3 per row")
    return flat.reshape(-1, N_KEYPOINTS, 3)[order].astype(np.float32)


def aligned_keypoints(keypoints: np.ndarray, keypoints_path: Path, reference_keypoints: np.ndarray | None) -> tuple[np.ndarray, str]:
    """The compiled keypoints warped onto the portrait (TPS: neutral face -> detected points)."""
    if reference_keypoints is None:
        return keypoints, "none (no face found on the reference: keypoints used as compiled)"
    neutral_path = keypoints_path.parent / NEUTRAL_KEYPOINTS_FILE
    if neutral_path.is_file():
        neutral, how = read_keypoints_table(neutral_path)[0], f"tps from {NEUTRAL_KEYPOINTS_FILE}"
    else:
        neutral, how = keypoints[0], "tps from the first frame (no neutral_keypoints.parquet beside the keypoints)"
    return align_to_reference(keypoints, neutral, reference_keypoints).astype(np.float32), how


def default_prompt(cfg: Stage2Config, label: str | None = None) -> str:
    """The prompt when none is given: the training template with the label (if any), as in training."""
    return cfg.data.prompt_template.format(label=label or "", identity="").strip(" ,")


def sample(cfg: Stage2Config, args: SampleArgs, generator: Stage2Generator | None = None,
           reference: Reference | None = None) -> dict[str, Any]:
    """The ``cogportrait sample`` command: inputs -> ``<out>/video.mp4`` + ``<out>/sample.json``.

    ``reference``: ``args.reference`` already read and measured (a batch job that read it for Stage 1
    passes it, e.g. as the face crop), instead of reading the whole image here."""
    from cogportrait.config import CurateConfig
    from cogportrait.face.reference import read_reference

    t0 = time.perf_counter()
    keypoints_path = Path(args.keypoints)
    keypoints = read_keypoints_table(keypoints_path)
    audio = None
    if args.audio:
        try:  # any file with sound: resampled to the audio encoder's 16 kHz mono
            audio = decode_audio(args.audio, rate=AUDIO_SAMPLE_RATE, mono=True)[0][0]
        except PreviewInputError as err:
            raise SampleInputError(f"cannot read audio {args.audio}: {err}") from None
        n = int(round(len(audio) / AUDIO_SAMPLE_RATE * CLIP_FPS))  # frames = audio length x 25
        keypoints = np.pad(keypoints[:n], ((0, max(n - len(keypoints), 0)), (0, 0), (0, 0)), mode="edge")  # the last pose held
    reference = reference or read_reference(args.reference, crop_scale=CurateConfig.crop_scale)  # curate's face crop, as in training
    keypoints, alignment = aligned_keypoints(keypoints, keypoints_path, reference.keypoints)
    generator = generator or Stage2Generator(cfg, args.checkpoint)
    size = generator.resolution
    portrait = resize_square(reference.image, size)
    prompt = args.prompt if args.prompt is not None else default_prompt(cfg)
    t1 = time.perf_counter()
    frames = generator(portrait, keypoints, audio, prompt, args.seed, progress=True)
    t_gen = time.perf_counter() - t1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_video(out / "video.mp4", iter(frames), size=size, fps=cfg.sample.fps, audio_path=args.audio)
    meta = {"frames": int(len(frames)), "fps": cfg.sample.fps, "resolution": size, "seed": args.seed, "prompt": prompt,
            "steps": cfg.sample.steps, "guidance": asdict(cfg.sample.guidance), "weights": generator.weights,
            "alignment": alignment, "reference": args.reference, "keypoints": str(keypoints_path), "audio": args.audio,
            "generate_s": round(t_gen, 3), "total_s": round(time.perf_counter() - t0, 3)}
    write_json(out / "sample.json", meta)
    return {**meta, "out": str(out)}
