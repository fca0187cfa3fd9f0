"""Fit the tiny Wan VAE that ``training/configs/tiny.yaml`` ships (``training/weights/tiny_vae``).

Why it exists: a randomly initialised ``AutoencoderKLWan`` decodes every latent to nearly the same
grey image, so with it no test could see in pixels whether the pose path moves the eyes. This
script fits the tiny architecture as an autoencoder on the shipped sample's 128² face clips
(5-frame windows: the causal first frame plus one 4-frame latent step), then records per-channel
latent mean and std in its config, as Wan's own VAEs do, so normalised latents are ~N(0, 1) like
the noise flow matching mixes them with.

    python scripts/build_tiny_vae.py --out training/weights/tiny_vae   # ~8 min on 2 cores; needs data/extract

Deterministic for a given torch build (seeded, one thread per op order); the shipped files'
sha256 are in ``training/weights/README.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from training.config import VaeArch
from training.data import SampleLoader, plan_windows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", default="data/extract/clips.parquet")
    ap.add_argument("--frames", default="data/extract/frames.parquet")
    ap.add_argument("--out", default="training/weights/tiny_vae")
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--windows", type=int, default=240, help="5-frame windows decoded into memory")
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--kl", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from diffusers import AutoencoderKLWan

    torch.manual_seed(args.seed)
    vae = AutoencoderKLWan(**VaeArch().kwargs())
    windows = plan_windows(args.clips, args.frames, 5, 3, args.seed, 0)
    loader = SampleLoader(args.frames, args.resolution)
    rng = np.random.default_rng(args.seed)
    clips = [loader(windows[i].to_row())["video"] for i in tqdm(rng.permutation(len(windows))[:args.windows], desc="decoding windows")]
    data = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0  # (N, 3, 5, R, R)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    t0 = time.perf_counter()
    bar = tqdm(range(args.steps), desc="fitting the tiny VAE")
    for step in bar:
        x = data[rng.integers(0, len(data), 2)]
        if rng.random() < 0.5:  # mirrored faces: twice the data, and the left/right balance of real footage
            x = x.flip(-1)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = (recon - x).abs().mean() + (recon - x).pow(2).mean() + args.kl * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{float(loss):.4f}")
    vae.eval()
    with torch.no_grad():
        held = data[:64]  # statistics and PSNR on a fixed subset: the whole set would take minutes on a CPU
        z = torch.cat([vae.encode(held[i:i + 8]).latent_dist.mode() for i in range(0, len(held), 8)])
        recon = torch.cat([vae.decode(z[i:i + 8]).sample for i in range(0, len(z), 8)])
    mean = z.mean(dim=(0, 2, 3, 4))
    std = z.std(dim=(0, 2, 3, 4))
    vae.register_to_config(latents_mean=[round(float(v), 6) for v in mean], latents_std=[round(float(v), 6) for v in std])
    out = Path(args.out)
    vae.save_pretrained(out)
    psnr = float(10 * torch.log10(4.0 / (recon - held).pow(2).mean()))
    report = {"steps": args.steps, "windows": len(data), "resolution": args.resolution, "psnr_db": round(psnr, 2),
              "fit_s": round(time.perf_counter() - t0, 1), "seed": args.seed}
    (out / "fit.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
