"""Benchmark one Stage 2 training step: samples/s, tokens/s, peak memory, FLOPs and MFU (JSON).

Times the optimizer step of PortraitDiT (flow-matching loss with condition dropout, AdamW, bf16
autocast on GPU) on latent-space inputs of the config's shapes, so the number is the model's and
not the decoder's; ``--with-encoders`` adds the frozen VAE/UMT5/wav2vec2 encoding of a real-shaped
sample per step (what an uncached step costs; the tiny config only: the 5B config's encoders are
tens of GB). FLOPs are counted by ``torch.utils.flop_counter``: model FLOPs as 3x one forward (forward +
backward), hardware FLOPs as one whole step (with gradient checkpointing the forward runs twice); MFU
and HFU divide them per second by ``--peak-tflops`` (H200 bf16 dense: 989).

    nice -n 10 .venv/bin/python bench/train.py --config training/configs/tiny.yaml > bench/out/train_tiny.json
    python bench/train.py --config training/configs/wan2.2-ti2v-5b.yaml --set model.source=random --device cuda  # GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
from functools import partial
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import PeakRss, machine_info  # noqa: E402
from training.conditioning import Stage2Batch  # noqa: E402
from training.config import Stage2Config, load_stage2_config, parse_overrides  # noqa: E402
from training.objective import draw_noise, flow_matching_errors, step_generator  # noqa: E402


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """The options bench/train.py and bench/sample.py share."""
    ap.add_argument("--config", default="training/configs/tiny.yaml")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)


def open_config(args: argparse.Namespace) -> tuple[Stage2Config, torch.device]:
    torch.set_num_threads(args.threads)
    return load_stage2_config(args.config, parse_overrides(args.overrides)), torch.device(args.device)


def build_dit(cfg: Stage2Config, device: torch.device):
    """PortraitDiT alone (random backbone of the config's shape), built directly on the device."""
    from diffusers import WanTransformer3DModel

    from training.model import PortraitDiT

    torch.manual_seed(cfg.model.seed)
    with torch.device(device):
        transformer = WanTransformer3DModel(**cfg.model.transformer_arch.kwargs())
        dit = PortraitDiT(transformer, cfg.model.text_arch.d_model, cfg.model.audio_arch.hidden_size)
    if cfg.model.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return dit


def latent_shape(cfg: Stage2Config, batch: int, frames: int, resolution: int) -> tuple[int, ...]:
    s = cfg.model.vae_arch.spatial_factor
    return (batch, cfg.model.vae_arch.z_dim, 1 + (frames - 1) // 4, resolution // s, resolution // s)


def synthetic_batch(cfg: Stage2Config, shape: tuple[int, ...], device: torch.device, audio_seconds: float) -> Stage2Batch:
    g = torch.Generator().manual_seed(0)
    b = shape[0]
    return Stage2Batch(torch.randn(shape, generator=g), torch.randn(shape, generator=g),
                       torch.randn(b, cfg.model.text_max_tokens, cfg.model.text_arch.d_model, generator=g),
                       torch.randn(b, max(1, int(audio_seconds * 50)), cfg.model.audio_arch.hidden_size, generator=g)).to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap)
    ap.add_argument("--batch", type=int, default=None, help="default: train.batch_size")
    ap.add_argument("--frames", type=int, default=None, help="default: data.n_frames")
    ap.add_argument("--resolution", type=int, default=None, help="default: data.resolution")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--with-encoders", action="store_true")
    args = ap.parse_args()
    cfg, device = open_config(args)
    b = args.batch or cfg.train.batch_size
    frames, res = args.frames or cfg.data.n_frames, args.resolution or cfg.data.resolution
    shape = latent_shape(cfg, b, frames, res)
    seq = shape[2] * (shape[3] // cfg.model.transformer_arch.patch_size[1]) * (shape[4] // cfg.model.transformer_arch.patch_size[2])
    bf16 = device.type == "cuda"
    dit = build_dit(cfg, device)
    params = sum(p.numel() for p in dit.parameters())
    opt = torch.optim.AdamW(dit.parameters(), lr=1e-5, fused=device.type == "cuda")
    batch = synthetic_batch(cfg, shape, device, frames / 25)
    null_text = torch.zeros_like(batch.text_states[:1])
    encode_fn = None
    if args.with_encoders:
        import numpy as np

        from training.conditioning import encode_batch
        from training.model import build_stage2_model

        full = build_stage2_model(cfg.model).to(device)
        rng = np.random.default_rng(0)
        sample = dict(video=rng.integers(0, 255, (b, frames, res, res, 3), dtype=np.uint8),
                      reference=rng.integers(0, 255, (b, res, res, 3), dtype=np.uint8),
                      keypoints=np.tile(np.linspace(0.3, 0.7, 62 * 3, dtype=np.float32).reshape(1, 1, 62, 3), (b, frames, 1, 1)),
                      audio=rng.standard_normal((b, frames * 640)).astype(np.float32) * 0.1, prompts=["a person talking"] * b)

        encode_fn = partial(encode_batch, full, sample["reference"], sample["keypoints"], sample["audio"], sample["prompts"], sample["video"])

    def step(i: int) -> float:
        nonlocal batch
        if encode_fn is not None:
            batch = encode_fn().to(device)
        draw = draw_noise(shape, cfg.flow, cfg.train, step_generator(0, i))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = flow_matching_errors(dit, batch, draw, null_text).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:  # what the hardware runs: checkpointed forwards run twice
        step(0)
    hardware_flops = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter, torch.no_grad():  # the model's own: forward + backward = 3 forwards
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            flow_matching_errors(dit, batch, draw_noise(shape, cfg.flow, cfg.train, step_generator(0, 0)), null_text)
    flops = 3 * counter.get_total_flops()
    for i in range(args.warmup):
        step(i + 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    with PeakRss() as rss:
        for i in range(args.steps):
            t0 = time.perf_counter()
            step(100 + i)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    result = {
        "benchmark": "stage2_train_step", "config": args.config, "overrides": args.overrides, "device": str(device),
        "dtype": "bf16 autocast" if bf16 else "float32", "threads": args.threads, "with_encoders": args.with_encoders,
        "gradient_checkpointing": cfg.model.gradient_checkpointing, "params": params, "batch": b, "frames": frames,
        "resolution": res, "latent_shape": list(shape), "tokens_per_sample": seq, "steps_timed": args.steps,
        "step_s_median": round(med, 4), "step_s_min": round(min(times), 4),
        "samples_per_s": round(b / med, 3), "tokens_per_s": round(b * seq / med, 1),
        "model_flops_per_step": flops, "hardware_flops_per_step": hardware_flops,
        "model_tflops_per_s": round(flops / med / 1e12, 2), "hardware_tflops_per_s": round(hardware_flops / med / 1e12, 2),
        **({"mfu": round(flops / med / (args.peak_tflops * 1e12), 4),
            "hfu": round(hardware_flops / med / (args.peak_tflops * 1e12), 4), "peak_tflops_assumed": args.peak_tflops,
            "peak_gpu_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            "gpu": torch.cuda.get_device_name()} if device.type == "cuda" else {}),
        **rss.as_dict(), "machine": machine_info(),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
