"""Benchmark the Stage 2 sampler: steps/s, dynamic-CFG overhead over plain CFG, seconds per 5 s video (JSON).

Runs ``training.sampler.sample_latents`` (the code ``cogportrait sample`` runs) on latent-space
inputs of a ``--seconds`` long video at the config's resolution, in the modes ``dynamic`` (Eq. 4-5),
``plain`` (a constant scale: the same two forwards per step) and ``none`` (no CFG: one forward),
alternating the modes over ``--repeats`` rounds so load drifts hit them equally. The overhead of
dynamic over plain CFG at equal steps is the goal (< 3 %). ``--decode`` adds the VAE decode of the
video (the VAE of the config: random weights of its shape, built on the device).

    nice -n 10 .venv/bin/python bench/sample.py --config training/configs/tiny.yaml > bench/out/sample_tiny.json
    python bench/sample.py --config training/configs/wan2.2-ti2v-5b.yaml --set model.source=random --device cuda --decode
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import PeakRss, machine_info  # noqa: E402
from bench.train import add_common_args, build_dit, latent_shape, open_config, synthetic_batch  # noqa: E402
from training.conditioning import padded_frame_count  # noqa: E402
from training.config import GuidanceConfig, SampleConfig  # noqa: E402
from training.guidance import eye_gaussian_map  # noqa: E402
from training.sampler import sample_latents  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(ap)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--steps", type=int, default=None, help="default: sample.steps")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode", action="store_true")
    args = ap.parse_args()
    cfg, device = open_config(args)
    steps = args.steps or cfg.sample.steps
    frames = padded_frame_count(int(round(args.seconds * 25)))
    shape = latent_shape(cfg, 1, frames, cfg.data.resolution)
    dit = build_dit(cfg, device).eval()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dit.to(dtype)
    batch = synthetic_batch(cfg, shape, device, args.seconds)
    batch = type(batch)(*(t.to(dtype) for t in (batch.latents, batch.pose_latents, batch.text_states, batch.audio_states)))
    null_text = torch.zeros_like(batch.text_states)
    kp = np.full((frames, 62, 3), 0.5, np.float32)
    kp[:, 52, :2], kp[:, 57, :2] = (0.62, 0.4), (0.38, 0.4)  # iris centres
    eye_map = torch.from_numpy(eye_gaussian_map(kp, shape[-2:], cfg.sample.guidance.kappa)).to(dtype)
    modes = {"dynamic": cfg.sample.guidance, "plain": GuidanceConfig(mode="plain", scale=cfg.sample.guidance.omega_lo),
             "none": GuidanceConfig(mode="none")}

    def run(mode: str) -> float:
        sc = SampleConfig(steps=steps, guidance=modes[mode])
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        sample_latents(dit, batch, null_text, eye_map, sc, cfg.flow.shift, torch.Generator().manual_seed(0))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    run("dynamic")  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times: dict[str, list[float]] = {m: [] for m in modes}
    with PeakRss() as rss:
        for _ in range(args.repeats):
            for mode in modes:
                times[mode].append(run(mode))
    med = {m: statistics.median(v) for m, v in times.items()}
    result = {
        "benchmark": "stage2_sampler", "config": args.config, "overrides": args.overrides, "device": str(device), "dtype": str(dtype),
        "threads": args.threads, "video_seconds": args.seconds, "frames": frames, "latent_shape": list(shape), "steps": steps,
        "repeats": args.repeats,
        "seconds_per_video": {m: round(v, 3) for m, v in med.items()},
        "steps_per_s": {m: round(steps / v, 2) for m, v in med.items()},
        "dynamic_cfg_overhead_vs_plain_pct": round(100 * (med["dynamic"] / med["plain"] - 1), 2),
        "all_runs_s": {m: [round(t, 3) for t in v] for m, v in times.items()},
    }
    if args.decode:
        from diffusers import AutoencoderKLWan

        from training.model import VideoCodec

        with torch.device(device):
            codec = VideoCodec(AutoencoderKLWan(**cfg.model.vae_arch.kwargs()).to(dtype))
        latents = torch.randn(shape, device=device, dtype=dtype)
        codec.decode(latents[:, :, :2])  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        codec.decode(latents)
        if device.type == "cuda":
            torch.cuda.synchronize()
        result["vae_decode_s"] = round(time.perf_counter() - t0, 3)
        result["seconds_per_video_with_decode"] = {m: round(v + result["vae_decode_s"], 3) for m, v in med.items()}
    if device.type == "cuda":
        result["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["gpu"] = torch.cuda.get_device_name()
    result.update(rss.as_dict())
    result["machine"] = machine_info()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
