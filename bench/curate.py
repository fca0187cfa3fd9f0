"""Benchmark the curate job; prints one JSON document.

Measures video-seconds per wall-second (total and per core), source frames/s, peak RSS (driver
and Ray workers) and CPU seconds per step, on the sample set and on an N-times replicated copy,
with 1 and 2 Ray workers. Each configuration runs in a fresh Ray instance.

    python bench/curate.py                      # sample set and 10x copy, 1 and 2 workers
    python bench/curate.py --replicas 3 --workers 2
    python bench/curate.py --long-seconds 300   # also one long video: memory flat in length?

Per run it also reports the CPU seconds of every Ray process role (workers, driver, raylet, ...),
which says how much of a core the job's own steps get.

    python bench/curate.py --skip-sample --workers 1 --ray-cost   # also what Ray itself costs

``--ray-cost`` also runs each set through the same job with the scan, text, filter and crop steps
handing back the rows they made in a recording pass over the sample (same rows, blocks, operator
and Ray processes; no scan decode, no model): the job's wall time without its library work.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from common import PeakRss, machine_info  # noqa: E402


def replicate_manifest(src_manifest: Path, dst_root: Path, replicas: int) -> Path:
    """A manifest listing every sample video ``replicas`` times (hard links, distinct ids)."""
    dst_root.mkdir(parents=True, exist_ok=True)
    with open(src_manifest, newline="") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        rows = list(reader)
    out_rows = []
    for r in range(replicas):
        for row in rows:
            src = (src_manifest.parent / row["path"]).resolve()
            dst = dst_root / "videos" / f"r{r}_{src.name}"
            dst.parent.mkdir(exist_ok=True)
            if not dst.exists():
                os.link(src, dst) if src.stat().st_dev == dst_root.stat().st_dev else shutil.copy(src, dst)
            out_rows.append({**row, "video_id": f"r{r}_{row['video_id']}", "path": f"videos/{dst.name}"})
    manifest = dst_root / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(out_rows)
    return manifest


def long_video_manifest(src_manifest: Path, dst_root: Path, seconds: float) -> Path:
    """A manifest of one video: a sample clip played back to back until ``seconds`` long
    (re-encoded, so the file is one stream; each loop seam is a cut, so it has many shots)."""
    import av

    src = src_manifest.parent / "videos" / "lp_d10_woman_browraise_wink_audio.mp4"
    dst = dst_root / "videos" / "long.mp4"
    dst.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(dst), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width = stream.height = 512
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "20"}
        n = 0
        while n < seconds * 30:
            with av.open(str(src)) as inp:
                for frame in inp.decode(video=0):
                    frame = frame.reformat(format="yuv420p")
                    frame.pts, frame.time_base = n, Fraction(1, 30)
                    for packet in stream.encode(frame):
                        out.mux(packet)
                    n += 1
        for packet in stream.encode():
            out.mux(packet)
    manifest = dst_root / "manifest.csv"
    manifest.write_text("video_id,path,source,license,label,identity,mirrored\n"
                        "long,videos/long.mp4,looped sample clip,MIT,talking,lp_woman_d10,false\n")
    return manifest


# --ray-cost: sample file name -> (the scan's rows, shot by shot; each span's text verdict and crop
# outputs, by (start_frame, end_frame)). Filled before the replay runs; this script runs as __main__,
# so Ray ships these functions and classes by value, this table with them.
RECORDED: dict[str, tuple[list[list[dict]], dict[tuple[int, int], dict]]] = {}
MANIFEST_KEYS = ("video_id", "path", "source", "license", "label", "identity", "mirrored", "manifest_row")
TEXT_KEYS = ("text_score", "text_kind")
CLIP_KEYS = ("clip_id", "clip_path", "audio_path", "has_audio", "n_frames", "crop_box", "crop_track")


def record_steps(manifest: Path) -> None:
    """Run the Ray-free steps once over the sample's videos and keep what each hands on."""
    from cogportrait.config import CurateConfig
    from cogportrait.curate import steps
    from cogportrait.curate.manifest import read_manifest
    from cogportrait.curate.text import TextDetector
    from cogportrait.curate.tracking import FaceTracker

    cfg = CurateConfig(manifest=str(manifest))
    tracker = FaceTracker(cfg.face_min_confidence, cfg.min_face_px, cfg.multi_face_area_ratio)
    detector = TextDetector(cfg.text_det_side_px, threads=1)
    valid, _, _ = read_manifest(cfg.manifest)
    with tempfile.TemporaryDirectory() as out:
        for video in valid:
            shots = list(steps.scan_step(steps.probe_step(steps.new_row(video), cfg), cfg, tracker))
            spans = {}
            for span in (dict(r) for shot in shots for r in shot):
                done = steps.crop_step(steps.filter_step(steps.text_step(span, cfg, detector), cfg), cfg, out)
                spans[done["start_frame"], done["end_frame"]] = {k: done[k] for k in (*TEXT_KEYS, *CLIP_KEYS, "reject_stage",
                                                                                    "reject_reason", "reject_detail")}
            RECORDED[Path(video["path"]).name] = (shots, spans)
    tracker.close()


def _recorded(row: dict) -> tuple[list[list[dict]], dict]:
    return RECORDED[re.sub(r"^r\d+_", "", Path(row["path"]).name)]  # replicas are r<k>_<name>


class ReplayVideos:
    """The job's actor with the scan, text, filter and crop handing back what they recorded (the probe is real)."""

    def __init__(self, cfg, out_dir: str) -> None:
        self.cfg = cfg

    def __call__(self, batch):
        from cogportrait.curate.steps import probe_step, rejected, rows_table

        for row in batch.to_pylist():
            row = probe_step(row, self.cfg)
            if rejected(row):
                yield rows_table([{**row, "video_rows": 1}])
                continue
            for shot in _recorded(row)[0]:
                # the recording's step seconds are not this run's
                yield rows_table([replay_span({**r, **{k: row[k] for k in MANIFEST_KEYS}, "t_scenes": 0.0, "t_track": 0.0})
                                  for r in shot])


def replay_span(row: dict) -> dict:
    """A span as the text, filter and crop steps left it in the recording."""
    from cogportrait.curate.steps import reject, rejected

    if rejected(row):
        return row
    done = _recorded(row)[1][row["start_frame"], row["end_frame"]]
    row.update({k: done[k] for k in TEXT_KEYS}, text_frames=[], text_jpegs=[])
    if done["reject_stage"]:
        return reject(row, done["reject_stage"], done["reject_reason"], done["reject_detail"])
    row.update({k: done[k] for k in CLIP_KEYS})
    return row


def run_one(manifest: Path, workers: int, out: Path, replay: bool = False) -> dict:
    import ray

    import pipelines.curate as job
    from cogportrait.config import CurateConfig

    real_actor = job.CurateVideos
    if replay:
        job.CurateVideos = ReplayVideos

    os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] = "1"
    # pin this process (and so every Ray process it starts) to `workers` cores: "per core" must
    # mean one physical core, not a logical Ray CPU the OS may spread over all of them
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) >= workers:
        os.sched_setaffinity(0, cores[:workers])
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        with PeakRss(spare_cores=set(cores[workers:])) as rss:
            metrics = job.run(CurateConfig(manifest=str(manifest), out=str(out), num_workers=workers))
    finally:
        ray.shutdown()
        os.sched_setaffinity(0, cores)
        job.CurateVideos = real_actor
    return {
        "workers": workers,
        "videos": metrics["manifest_rows"],
        "input_video_seconds": metrics["input_video_seconds"],
        "input_frames": metrics["input_frames"],
        "clips": metrics["clips"],
        "rejects": metrics["rejects"],
        "wall_seconds": metrics["wall_seconds"],
        "video_seconds_per_wall_second": metrics["video_seconds_per_wall_second"],
        "video_seconds_per_wall_second_per_core": metrics["video_seconds_per_wall_second_per_core"],
        "frames_per_second": metrics["frames_per_second"],
        "frames_per_second_per_core": round(metrics["frames_per_second"] / workers, 1),
        "step_cpu_seconds": metrics["step_cpu_seconds"],
        **rss.as_dict(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", default=str(REPO / "datasets" / "sample" / "manifest.csv"))
    parser.add_argument("--replicas", type=int, default=10, help="size of the replicated set")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--skip-sample", action="store_true", help="only the replicated set")
    parser.add_argument("--long-seconds", type=float, default=0, help="also one looped video this long (memory vs length)")
    parser.add_argument("--ray-cost", action="store_true", help="also the sample sets with the steps replaying recorded rows")
    args = parser.parse_args()
    if args.ray_cost:
        record_steps(Path(args.manifest))
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_curate_") as tmp:
        tmp_path = Path(tmp)
        sets = [] if args.skip_sample else [("sample", Path(args.manifest))]
        if args.replicas > 1:
            sets.append((f"sample_x{args.replicas}", replicate_manifest(Path(args.manifest), tmp_path / "replicated", args.replicas)))
        if args.long_seconds > 0:
            sets.append((f"long_{args.long_seconds:g}s", long_video_manifest(Path(args.manifest), tmp_path / "long", args.long_seconds)))
        for name, manifest in sets:
            for workers in args.workers:
                for replay in (False, True) if args.ray_cost and not name.startswith("long") else (False,):  # sample videos only
                    out = tmp_path / f"out_{name}_{workers}_{replay}"
                    result = run_one(manifest, workers, out, replay)
                    result["set"] = f"{name}_replay" if replay else name
                    results.append(result)
                    print(json.dumps(result), file=sys.stderr)
    report = {
        "benchmark": "curate",
        "machine": machine_info(),
        "results": results,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
