"""Benchmark extract and invert: frames/s per core with 1 and 2 Ray workers, plus the bare per-core
rates without Ray (decode + FaceLandmarker + row building; the inversion maths), and peak RSS.

    python bench/extract.py [--clips data/curate/clips.parquet] [--workers 1 2] > bench.json

Without --clips it curates the bundled sample dataset into a temporary folder first. Prints one
JSON object on stdout (logs go to stderr). Each Ray run gets a fresh local cluster sized to its
worker count, so the numbers include Ray's own start-up of the job's actors (not of the cluster).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
from common import PeakRss, machine_info

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("cogportrait.bench")


def _ray_restart(n: int) -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(num_cpus=n, include_dashboard=False, log_to_driver=False, configure_logging=False)


def bench_jobs(clips: Path, workers: list[int], work: Path) -> dict:
    from cogportrait.config import ExtractConfig, InvertConfig
    from pipelines.extract import run as run_extract
    from pipelines.invert import run as run_invert

    out = {}
    for n in workers:
        _ray_restart(n)
        ext, inv = work / f"extract-{n}", work / f"invert-{n}"
        with PeakRss() as rss_e:
            t = time.perf_counter()
            m = run_extract(ExtractConfig(clips=str(clips), out=str(ext), num_workers=n))
            wall_e = time.perf_counter() - t
        with PeakRss() as rss_i:
            t = time.perf_counter()
            mi = run_invert(InvertConfig(frames=str(ext), out=str(inv), num_workers=n))
            wall_i = time.perf_counter() - t
        out[f"workers_{n}"] = {
            "extract": {"frames": m["frames"], "clips": m["clips"], "wall_s": round(wall_e, 2),
                        "frames_per_s": round(m["frames"] / wall_e, 1), "frames_per_s_per_core": round(m["frames"] / wall_e / n, 1),
                        **rss_e.as_dict()},
            "invert": {"frames": mi["frames"], "wall_s": round(wall_i, 2), "frames_per_s": round(mi["frames"] / wall_i, 1),
                       "frames_per_s_per_core": round(mi["frames"] / wall_i / n, 1), **rss_i.as_dict(),
                       "loco_r2_xy_overall": mi["r2_by_group"]["loco_xy"].get("overall")},
        }
    import ray

    ray.shutdown()
    return out


def bench_core(clips: Path, work: Path) -> dict:
    """Per-core rates of the library code alone (one process, no Ray)."""
    from cogportrait.face.extract import extract_clip, read_frames
    from cogportrait.config import ExtractConfig, InvertConfig
    from cogportrait.face.au_backends import make_backend
    from cogportrait.face.fitting import invert_signals
    from cogportrait.face.signals import prepare_frames
    from pipelines.invert import FRAME_COLUMNS
    from cogportrait.face.model import LinearFaceModel, load_baselines
    from cogportrait.schema import identity_key

    # the dataclass defaults are params.yaml's values (tests/test_foundation.py)
    cfg, extract_cfg = InvertConfig(), ExtractConfig()
    backend = make_backend(extract_cfg.au_backend, extract_cfg.au_model_dir or None, extract_cfg.gaze_down_blink_coupling)
    table = pq.read_table(clips)
    rows = sorted(table.select(["clip_id", "clip_path", "n_frames"]).to_pylist(), key=lambda r: -r["n_frames"])[:2]
    t = time.perf_counter()
    frames = 0
    for r in rows:
        frames += extract_clip(clips.parent / r["clip_path"], r["clip_id"], False, backend, extract_cfg).num_rows
    extract_rate = frames / (time.perf_counter() - t)

    ext, inv = work / "extract-1", work / "invert-1"
    model = LinearFaceModel.load(inv / "face_model")
    baselines = load_baselines(inv / "face_model" / "baselines.npz")
    kept = pq.read_table(ext / "clips.parquet").select(["clip_id", "identity"]).to_pylist()
    ident = {r["clip_id"]: identity_key(r["identity"], r["clip_id"]) for r in kept}
    all_frames = read_frames(ext, FRAME_COLUMNS)
    sigs = []
    t_prep = time.perf_counter()
    for cid in ident:
        part = all_frames.filter(pc.equal(all_frames.column("clip_id"), cid))
        sigs.append(prepare_frames(part, ident[cid], False, cfg.pose_refine, cfg.smooth_frames))
    prep_s = time.perf_counter() - t_prep
    n = sum(len(s.frame) for s in sigs)
    t = time.perf_counter()
    for s in sigs:
        invert_signals(s, model, baselines[s.identity], cfg.inversion)
    solve_s = time.perf_counter() - t
    return {
        "extract_decode_landmarks_rows_frames_per_s": round(extract_rate, 1),
        "invert_pose_normalisation_frames_per_s": round(n / prep_s, 1),
        "invert_solve_frames_per_s": round(n / solve_s, 1),
        "invert_normalise_plus_solve_frames_per_s": round(n / (prep_s + solve_s), 1),
        "inversion_iterations": cfg.inversion.iterations,
    }


def _repeat_clips(clips: Path, k: int, folder: Path) -> Path:
    """A clips table listing every clip k times under new ids (same files), for larger runs."""
    from cogportrait.io.atomic import write_table
    from cogportrait.schema import CLIPS_SCHEMA, make_id

    table = pq.read_table(clips, schema=CLIPS_SCHEMA)
    rows = []
    for r in table.to_pylist():
        for i in range(k):
            rows.append(dict(r, clip_id=make_id("bench-copy", r["clip_id"], i),
                             clip_path=os.path.relpath(clips.parent / r["clip_path"], folder), audio_path=None))
    write_table(folder / "clips.parquet", rows, CLIPS_SCHEMA)
    return folder / "clips.parquet"


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clips", help="clips.parquet (default: curate the sample dataset into a temp folder)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=1, help="list every clip this many times (new ids) to amortise fixed costs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cogportrait-bench-") as tmp:
        work = Path(tmp)
        if args.clips:
            clips = Path(args.clips).resolve()
        else:
            from cogportrait.config import CurateConfig
            from pipelines.curate import run as run_curate

            _ray_restart(2)
            run_curate(CurateConfig(manifest=str(REPO / "datasets/sample/manifest.csv"), out=str(work / "curate"), num_workers=2))
            clips = work / "curate" / "clips.parquet"
        if args.repeat > 1:
            clips = _repeat_clips(clips, args.repeat, work / "repeat")
        jobs = bench_jobs(clips, sorted(set(args.workers) | {1}), work)
        core = bench_core(clips, work)
    result = {
        "machine": machine_info(),
        "repeat": args.repeat,
        "ray_jobs": jobs,
        "single_core_library": core,
        "goals": {"extract_frames_per_s_per_core": 80, "invert_frames_per_s_per_core": 1000},
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
