"""Benchmark ``cogportrait generate``: requests per minute and seconds per request, Stage 1 vs Stage 2 (JSON).

Runs the job (``pipelines.generate.run``, the code the command runs) on ``--requests`` synthetic
requests over the sample portrait (labels and instructions alternating, ``--seconds`` long, every
third with the sample's speech cut to that length) with the params' settings (the tiny training
config, ``generate.sample_steps``), once per ``--workers`` value, each in a fresh local Ray instance
of that many CPUs and a fresh output folder (nothing skipped). Reported per run: wall time with Ray's
and the actors' start-up, requests per minute, and the per-request seconds of Stage 1 (portrait,
compile, its files) and Stage 2 (sampling, VAE decode, mp4) measured inside the actors, with Stage
1's share; the difference between wall time and the actors' busy time per worker is the start-up
and scheduling overhead.

    nice -n 10 .venv/bin/python bench/generate.py --workers 1 2 > bench/out/generate.json

Needs ``dvc repro`` outputs (data/library, data/invert/face_model), or one ``cogportrait generate`` run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import wave
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import REPO, PeakRss, machine_info  # noqa: E402
from cogportrait.config import CompileConfig, CurateConfig, ExtractConfig, GenerateConfig, InvertConfig, load_section  # noqa: E402
from cogportrait.schema import GENERATE_REQUESTS_SCHEMA  # noqa: E402
from pipelines.generate import run  # noqa: E402

SAMPLE = REPO / "datasets" / "sample"
LABELS = ("drowsiness", "cognitive effort", "surprise", "sadness", "social engagement", "anger")
INSTRUCTIONS = ("blink twice", "look slightly to the left, then lower the head smoothly", "raise your left eyebrow")


def write_requests(folder: Path, n: int, seconds: float) -> Path:
    """n requests over the sample portrait; every third one with speech of the same length instead of a duration."""
    speech = folder / "speech.wav"
    with wave.open(str(SAMPLE / "audio" / "nemo_audio_5s_16k_mono.wav")) as r:
        params, data = r.getparams(), r.readframes(int(seconds * r.getframerate()))
    with wave.open(str(speech), "wb") as w:
        w.setparams(params)
        w.writeframes(data)
    rows = []
    for i in range(n):
        audio = i % 3 == 2
        rows.append({"request_id": f"bench-{i:03d}", "label": LABELS[i % len(LABELS)] if i % 2 == 0 else None,
                     "instruction": INSTRUCTIONS[i % len(INSTRUCTIONS)] if i % 2 else None,
                     "reference": str(SAMPLE / "images" / "pyfeat_single_face.jpg"), "audio": speech.name if audio else None,
                     "prompt": None, "seed": i, "duration_s": None if audio else seconds})
    path = folder / "requests.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=GENERATE_REQUESTS_SCHEMA), path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=2.0, help="length of each request")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=None, help="sampler steps (default: params generate.sample_steps)")
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    base = load_section(GenerateConfig, "generate", args.params)
    compile_cfg = load_section(CompileConfig, "compile", args.params)
    events = load_section(InvertConfig, "invert", args.params).events
    extract = load_section(ExtractConfig, "extract", args.params)
    crop_scale = load_section(CurateConfig, "curate", args.params).crop_scale
    result: dict = {"machine": machine_info(), "requests": args.requests, "seconds_per_request_video": args.seconds,
                    "stage2_config": base.stage2_config, "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        requests = write_requests(Path(tmp), args.requests, args.seconds)
        for workers in args.workers:
            cfg = replace(base, requests=str(requests), out=str(Path(tmp) / f"out_{workers}"), num_workers=workers,
                          cpus_per_worker=1, gpus_per_worker=0.0, sample_steps=args.steps or base.sample_steps)
            if ray.is_initialized():
                ray.shutdown()  # each run in its own instance of `workers` CPUs
            with PeakRss() as rss:
                metrics = run(cfg, compile_cfg, events, extract, crop_scale)
            busy = (metrics["stage1_seconds_per_request"] + metrics["stage2_seconds_per_request"]) * metrics["generated_now"]
            result["runs"].append({
                "workers": workers, "generated": metrics["generated_now"], "frames": metrics["frames_generated_now"],
                "sample_steps": metrics["sample_steps"], "wall_s": metrics["wall_seconds"],
                "requests_per_minute": metrics["requests_per_minute"],
                "wall_seconds_per_request": metrics["wall_seconds_per_request"],
                "stage1_seconds_per_request": metrics["stage1_seconds_per_request"],
                "stage2_seconds_per_request": metrics["stage2_seconds_per_request"],
                "stage1_share": metrics["stage1_share"],
                "startup_and_scheduling_s": round(metrics["wall_seconds"] - busy / workers, 2),
                **rss.as_dict(),
            })
        ray.shutdown()
    result["load_average_1m_end"] = machine_info()["load_average_1m"]
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
