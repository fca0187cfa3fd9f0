"""Benchmark ``cogportrait compile`` (rules backend): latency, peak memory, where the time goes.

Prints one JSON document. For each library (the sample library from ``dvc repro``, and libraries
of 1e5 and 1e6 prototypes synthesised from it by ``bench/synthetic.perturb_prototypes``) and each
duration (2 s, 10 s, 60 s) it compiles ``--runs`` times with different seeds and labels (the 12
EMH categories and neutral talking, half of them with an instruction), after one warm-up, and
reports p50/p99 wall time of ``Stage1Compiler.compile`` (process start-up and library open
excluded, as the issue's goal states), the share of planning, retrieval, critic and Π, and the
peak Python heap of one compile (tracemalloc: numpy buffers included). Opening the library is
reported separately.

    nice -n 10 .venv/bin/python bench/compile.py --sizes 100000 1000000 > bench/out/compile.json

Needs ``dvc repro`` outputs (data/library, data/invert/face_model).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import REPO, machine_info  # noqa: E402
from synthetic import perturb_prototypes  # noqa: E402

from cogportrait.agents.compiler import CompileRequest  # noqa: E402
from cogportrait.config import CompileConfig, IndexConfig, InvertConfig, load_section  # noqa: E402
from prototype_store import build_index, write_prototypes  # noqa: E402
from pipelines.compile import open_compiler  # noqa: E402

log = logging.getLogger("cogportrait.bench")
INSTRUCTIONS = ("look slightly to the left, then lower the head smoothly", "raise your left eyebrow, then blink twice",
                "close your eyes for 1 second", "frown and squint, then look back at the camera")


def synth_library(sample: Path, n: int, work: Path, frames: int) -> Path:
    out = work / f"lib_{n}"
    if (out / "index" / "meta.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    table = perturb_prototypes(pq.read_table(sample / "prototypes.parquet"), n, seed=0, frames=frames)
    write_prototypes(out / "prototypes.parquet", table, row_group_size=256)
    build_index(out, IndexConfig())
    return out


def pct(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs) * 1000
    return {"p50_ms": round(float(np.percentile(a, 50)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2),
            "mean_ms": round(float(a.mean()), 2)}


def bench_library(library: Path, cfg: CompileConfig, events_cfg, durations: list[float], runs: int) -> dict:
    t0 = time.perf_counter()
    compiler = open_compiler(cfg, events_cfg, library=str(library))
    open_s = time.perf_counter() - t0
    labels = list(compiler.categories.known)
    out: dict = {"library": str(library), "prototypes": compiler.source.n, "open_s": round(open_s, 3), "durations": {}}
    for seconds in durations:
        n_frames = int(round(seconds * 25))
        walls, shares, peaks, rounds = [], {"planning": [], "retrieval": [], "critic": [], "mapping": []}, [], []
        for i in range(runs + 1):
            label = labels[i % len(labels)]
            instr = (INSTRUCTIONS[i % len(INSTRUCTIONS)],) if i % 2 else ()
            request = CompileRequest(label=label, instructions=instr, n_frames=n_frames, seed=i)
            trace = i == 1  # one traced run for the heap peak (tracing slows it: not timed)
            if trace:
                tracemalloc.start()
            t = time.perf_counter()
            result = compiler.compile(request)
            wall = time.perf_counter() - t
            if trace:
                peaks.append(tracemalloc.get_traced_memory()[1])
                tracemalloc.stop()
                continue
            if i == 0:
                continue  # warm-up
            walls.append(wall)
            rounds.append(result.report.rounds)
            for k in shares:
                shares[k].append(result.timings[k] / max(result.timings["total"], 1e-9))
        out["durations"][f"{seconds:g}s"] = {
            "frames": n_frames, "runs": len(walls), **pct(walls),
            "share": {k: round(float(np.mean(v)), 3) for k, v in shares.items()},
            "peak_heap_mb": round(max(peaks) / 2**20, 2) if peaks else None,
            "critic_rounds_mean": round(float(np.mean(rounds)), 2),
        }
    compiler.source.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", default=str(REPO / "data" / "library"), help="the sample library (dvc repro)")
    ap.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000], help="synthesised library sizes")
    ap.add_argument("--durations", type=float, nargs="*", default=[2.0, 10.0, 60.0])
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--frames", type=int, default=16, help="frames per synthesised prototype")
    ap.add_argument("--work", default=None, help="folder for synthesised libraries (kept between runs); default: a temp dir")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    params = REPO / "params.yaml"
    cfg = load_section(CompileConfig, "compile", params)
    cfg = CompileConfig(**{**cfg.__dict__, "face_model": str(REPO / cfg.face_model),
                           "categories": str(REPO / cfg.categories), "instructions": str(REPO / cfg.instructions)})
    events_cfg = load_section(InvertConfig, "invert", params).events
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_compile_"))
    report = {"machine": machine_info(), "runs": args.runs, "libraries": []}
    try:
        report["libraries"].append(bench_library(Path(args.library), cfg, events_cfg, args.durations, args.runs))
        for n in args.sizes:
            t = time.perf_counter()
            lib = synth_library(Path(args.library), n, work, args.frames)
            entry = bench_library(lib, cfg, events_cfg, args.durations, args.runs)
            entry["synthesise_s"] = round(time.perf_counter() - t, 1)
            report["libraries"].append(entry)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
