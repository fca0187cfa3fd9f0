"""DVC stage ``kto_negatives``: undesirable KTO samples -> data/kto_negatives/ (Ray Data).

    kto.parquet rows of the split ─generate─▶ ─rescore─▶ driver: split, sort, write
                                                 │
        negatives.parquet ◀── poor control ──────┴── well_controlled, unusable input ──▶ rejects.parquet

* generate (1:1, actor holding one ``Stage2Generator``): the window's reference frame (decoded from
  the real clip, resized to the model's resolution), its keypoints, audio span and prompt ->
  ``videos/<sample_id>.mp4`` (the window's T frames at 25 fps, its audio muxed). GPU actors when
  ``num_gpus`` > 0, CPU actors otherwise.
* rescore (1:1, actor holding the AU backend): the extract stage's landmarker over the video
  (``extract_clip``, as the extract stage runs it), the real window's signals from frames.parquet,
  then ``behavior.kto_negatives``'s scores and decision (the rules and why are there).

Every selected input row ends in exactly one of ``negatives.parquet`` (a ``KTO_NEGATIVES_SCHEMA`` row:
KTO_SCHEMA's columns with ``desirable`` false and ``video_path`` the generated mp4, so one loader
reads it beside kto.parquet, then the scores and the reason it was kept) or ``rejects.parquet``
(``well_controlled`` with its scores as ``detail``, or why the input could not be generated). Rows of
the other split are not inputs (``split``; counted in metrics.json). Paths in the tables are relative
to the working directory, as kto_mine writes them.

Deterministic: per-sample seeds and ids are hashes (``sample_seed``, ``negative_id``), the generator
runs single-threaded on CPU, and the driver sorts the rows, so a rerun with the same inputs and
checkpoint writes the same rows. Tables, videos and metrics.json are written atomically; videos no
negative refers to (well-controlled ones, earlier runs) are removed.

Run: ``cogportrait kto negatives`` (defaults from params.yaml; ``--checkpoint``, ``--split``, ``--sample-steps``).
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import ActorPoolStrategy

from cogportrait.behavior.kto_negatives import (
    IDENTITY_UNMEASURED,
    WELL_CONTROLLED,
    WindowSignals,
    decide,
    negative_id,
    sample_seed,
    score_candidate,
    window_signals,
)
from cogportrait.config import ExtractConfig, InvertConfig, KtoConfig, KtoNegativesConfig
from cogportrait.face.au_backends import make_backend
from cogportrait.face.extract import extract_clip
from cogportrait.face.model_files import face_landmarker_path
from cogportrait.io.atomic import write_json, write_table
from cogportrait.io.audio import read_wav
from cogportrait.io.video import VideoError, VideoWriter, probe_video, read_frames_at
from cogportrait.schema import (
    AUDIO_SAMPLE_RATE,
    CLIP_FPS,
    FRAMES_SCHEMA,
    KTO_NEGATIVE_CANDIDATES_SCHEMA as CANDIDATES,
    KTO_NEGATIVE_REASONS,
    KTO_NEGATIVES_SCHEMA,
    KTO_SCHEMA,
    N_KEYPOINTS,
    REJECTS_SCHEMA,
    TableError,
    check_reason,
)
from training.checkpoint import resolve_checkpoint
from pipelines._ray import ONE_ROW_PER_BLOCK, one_block_each, start_ray

if TYPE_CHECKING:
    from training.config import Stage2Config

log = logging.getLogger("cogportrait.kto_negatives")

STAGE = "kto_negatives"
# Logical CPUs per actor: generation (VAE decode of ~100 frames, ~15 s single-threaded at 128²) is
# the heavy step, re-extraction (~2 s a video) the light one; one of each per worker fits the
# worker's CPU, so both pools stream on a cluster of num_workers CPUs.
GENERATE_CPUS = 0.75
RESCORE_CPUS = 0.25
ROWS = {"batch_size": 1, "batch_format": "pyarrow"}  # one candidate per call, typed by CANDIDATES


def _reject(row: dict[str, Any], reason: str, detail: str) -> dict[str, Any]:
    check_reason(STAGE, reason)
    return dict(row, reject_reason=reason, reject_detail=detail)


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=CANDIDATES)


class GenerateVideos:
    """Ray actor step: one Stage 2 generator for the actor's lifetime; a candidate -> its video."""

    def __init__(self, stage2_cfg: Stage2Config, checkpoint: str | None, out_dir: str, base: str, device: str) -> None:
        import torch

        from training.generate import Stage2Generator

        if device == "cpu":
            torch.set_num_threads(1)  # one core per worker, and the same floating-point sums every run
        self.generator = Stage2Generator(stage2_cfg, checkpoint, device)
        self.sha256 = self.generator.weights["sha256"]
        self.steps = stage2_cfg.sample.steps
        self.videos = Path(out_dir) / "videos"
        self.base = Path(base)  # the driver's working directory: the tables' paths are relative to it

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _table([self.generate(row) for row in batch.to_pylist()])

    def conditions(self, row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(reference RGB at the model's resolution, keypoints (T, 62, 2), audio span or None)."""
        from training.data import audio_span, resize_square

        keypoints = np.asarray(row["keypoints"], dtype=np.float32).reshape(-1, N_KEYPOINTS, 2)
        if not row["source_video_path"]:
            raise VideoError("missing_file", f"KTO sample {row['source_sample_id']} names no clip video")
        clip = self.base / row["source_video_path"]
        got = read_frames_at(clip, probe_video(clip), [int(row["reference_frame"])])
        if int(row["reference_frame"]) not in got:
            raise VideoError("decode_error", f"{clip.name}: no frame {row['reference_frame']}")
        reference = resize_square(got[int(row["reference_frame"])], self.generator.resolution)
        audio = None
        if row["audio_path"]:
            wav = self.base / row["audio_path"]
            if not wav.is_file():
                raise VideoError("missing_file", f"no audio file at {wav}")
            samples, rate, channels = read_wav(wav)
            if rate != AUDIO_SAMPLE_RATE or channels != 1:
                raise VideoError("undecodable", f"{wav.name}: expected {AUDIO_SAMPLE_RATE} Hz mono, got {rate} Hz x {channels}")
            audio = audio_span(samples, int(round(float(row["audio_start_s"]) * CLIP_FPS)), len(keypoints))
        return reference, keypoints, audio

    def generate(self, row: dict[str, Any]) -> dict[str, Any]:
        if row["reject_reason"]:
            return row
        if not row["keypoints"]:
            return _reject(row, "no_keypoints", f"KTO sample {row['source_sample_id']} has no keypoints")
        t0 = time.perf_counter()
        try:
            reference, keypoints, audio = self.conditions(row)
        except VideoError as err:
            return _reject(row, err.reason, err.detail)
        frames = self.generator(reference, keypoints, audio, row["prompt"] or "", int(row["seed"]))
        sample_id = negative_id(row["source_sample_id"], self.sha256, int(row["seed"]), self.steps)
        path = self.videos / f"{sample_id}.mp4"
        size = self.generator.resolution
        with VideoWriter(path, CLIP_FPS, size, audio_rate=AUDIO_SAMPLE_RATE if audio is not None else None) as writer:
            for frame in frames:
                writer.write(frame)
            if audio is not None:
                writer.write_audio(audio[None])
        return dict(row, sample_id=sample_id, checkpoint_sha256=self.sha256, video_path=str(path),
                    t_generate=time.perf_counter() - t0)


class RescoreVideos:
    """Ray actor step: the extract stage's landmarker and AU backend over a generated video, then
    the scores against its conditions and the real window, and the keep/reject decision."""

    def __init__(self, cfg: KtoNegativesConfig, kto_cfg: KtoConfig, extract_cfg: ExtractConfig, invert_cfg: InvertConfig,
                 frames: str) -> None:
        face_landmarker_path(extract_cfg.landmarker_model or None)  # verified once per actor
        self.cfg, self.kto_cfg, self.extract_cfg, self.invert_cfg = cfg, kto_cfg, extract_cfg, invert_cfg
        self.backend = make_backend(extract_cfg.au_backend, extract_cfg.au_model_dir or None, extract_cfg.gaze_down_blink_coupling)
        self.frames = frames

    def __call__(self, batch: pa.Table) -> pa.Table:
        return _table([self.score(row) for row in batch.to_pylist()])

    def real_window(self, row: dict[str, Any]) -> WindowSignals | None:
        """The real window's signals from frames.parquet (None when the table has none of its frames)."""
        table = pq.read_table(self.frames, schema=FRAMES_SCHEMA, filters=[
            ("clip_id", "=", row["clip_id"]), ("frame", ">=", int(row["start_frame"])), ("frame", "<", int(row["end_frame"]))])
        return window_signals(table, bool(row["mirrored"]), self.invert_cfg.pose_refine) if table.num_rows else None

    def score(self, row: dict[str, Any]) -> dict[str, Any]:
        if row["reject_reason"]:
            return row
        t0 = time.perf_counter()
        try:
            frames = extract_clip(row["video_path"], row["sample_id"], bool(row["mirrored"]), self.backend, self.extract_cfg)
        except VideoError as err:
            return _reject(row, err.reason, err.detail)
        keypoints = np.asarray(row["keypoints"], dtype=np.float64).reshape(-1, N_KEYPOINTS, 2)
        if frames.num_rows != len(keypoints):
            return _reject(row, "decode_error", f"{Path(row['video_path']).name}: {frames.num_rows} frames decoded, {len(keypoints)} generated")
        generated = window_signals(frames, bool(row["mirrored"]), self.invert_cfg.pose_refine)
        scores = score_candidate(generated, keypoints, self.real_window(row), row["category"], self.kto_cfg, self.invert_cfg.events)
        verdict = decide(scores, self.cfg)
        out = dict(row, face_ratio=scores.face_ratio, eye_lmd=scores.eye_lmd, criterion=scores.criterion,
                   criterion_value=scores.criterion_value, criterion_target=scores.criterion_target,
                   identity_sim=scores.identity_sim, t_score=time.perf_counter() - t0)
        if verdict == WELL_CONTROLLED:
            return _reject(out, WELL_CONTROLLED, scores.detail())
        return dict(out, reason=verdict)


def _read_kto(path: Path) -> pa.Table:
    if not path.is_file():
        raise FileNotFoundError(f"no KTO table at {path} (run `cogportrait kto mine` or `dvc repro kto_mine`)")
    table = pq.read_table(path)
    missing = [n for n in KTO_SCHEMA.names if n not in table.column_names]
    if missing:
        raise TableError(f"{path} lacks column(s) {missing}; expected kto_mine's kto.parquet")
    table = table.select(KTO_SCHEMA.names).cast(KTO_SCHEMA)
    if len(set(table.column("sample_id").to_pylist())) != table.num_rows:
        raise TableError(f"{path} has duplicate sample_id values")
    return table


def _mirrored(clips: Path) -> dict[str, bool]:
    if not clips.is_file():
        raise FileNotFoundError(f"no clips table at {clips} (kto_negatives.clips: curate's clips.parquet)")
    rows = pq.read_table(clips, columns=["clip_id", "mirrored"]).to_pylist()
    return {r["clip_id"]: bool(r["mirrored"]) for r in rows}


def candidate_rows(kto: pa.Table, cfg: KtoNegativesConfig, mirrored: dict[str, bool]) -> list[dict[str, Any]]:
    """The selected desirable rows as candidates (sorted by sample_id; the first ``max_samples``):
    the same conditions, desirable false, the source's id, seed and clip path; scores still empty."""
    rows = sorted(kto.to_pylist(), key=lambda r: r["sample_id"])
    rows = [r for r in rows if cfg.split == "all" or r["split"] == cfg.split]
    if cfg.max_samples:
        rows = rows[: cfg.max_samples]
    empty = dict.fromkeys(CANDIDATES.names)
    return [
        {**empty, **r, "desirable": False, "source_sample_id": r["sample_id"], "sample_id": None,
         "seed": sample_seed(cfg.seed, r["sample_id"]), "source_video_path": r["video_path"],
         "mirrored": mirrored.get(r["clip_id"], False)}
        for r in rows
    ]


def reject_record(row: dict[str, Any]) -> dict[str, Any]:
    return {"video_id": row["source_sample_id"], "stage": STAGE, "reason": row["reject_reason"], "detail": row["reject_detail"],
            "path": row["source_video_path"], "start_s": row["audio_start_s"], "end_s": row["audio_end_s"],
            "start_frame": row["start_frame"], "end_frame": row["end_frame"]}


def run(cfg: KtoNegativesConfig, kto_cfg: KtoConfig | None = None, extract_cfg: ExtractConfig | None = None,
        invert_cfg: InvertConfig | None = None) -> dict[str, Any]:
    """Run the job; returns the counts also written to ``metrics.json``. The criteria's thresholds
    come from ``kto_cfg`` (kto_mine's), the landmarker's from ``extract_cfg``, the blink detector's and
    pose refinement from ``invert_cfg`` (their params.yaml defaults when not given)."""
    from training.config import load_stage2_config, resolve_paths

    t0 = time.perf_counter()
    kto_cfg, extract_cfg, invert_cfg = kto_cfg or KtoConfig(), extract_cfg or ExtractConfig(), invert_cfg or InvertConfig()
    out_dir = Path(cfg.out).resolve()
    (out_dir / "videos").mkdir(parents=True, exist_ok=True)
    kto = _read_kto(Path(cfg.kto))
    frames = Path(cfg.frames)
    if not frames.is_file():
        raise FileNotFoundError(f"no frames table at {frames} (kto_negatives.frames: extract's frames.parquet)")
    rows = candidate_rows(kto, cfg, _mirrored(Path(cfg.clips)))
    checkpoint = resolve_checkpoint(cfg.checkpoint)
    stage2 = resolve_paths(load_stage2_config(cfg.stage2_config, {"sample": {"steps": cfg.sample_steps}}))
    face_landmarker_path(extract_cfg.landmarker_model or None)  # fail before starting Ray if the bundle is bad

    results: list[dict[str, Any]] = []
    if rows:
        start_ray(cfg.num_workers, ONE_ROW_PER_BLOCK)
        n = min(cfg.num_workers, len(rows))
        gpu = cfg.num_gpus > 0
        ds = one_block_each([_table([r]) for r in rows])
        # 1:1 candidate -> candidate + its video; decode the reference, Stage 2 sampling, x264   (heavy actor: the model loaded once)
        ds = ds.map_batches(GenerateVideos, fn_constructor_kwargs={
            "stage2_cfg": stage2, "checkpoint": str(checkpoint) if checkpoint else None, "out_dir": str(out_dir),
            "base": str(Path.cwd()), "device": "cuda" if gpu else "cpu"}, **ROWS,
            compute=ActorPoolStrategy(size=n), num_cpus=GENERATE_CPUS, **({"num_gpus": cfg.num_gpus} if gpu else {}))
        # 1:1 candidate -> scored candidate, kept or rejected; FaceLandmarker per frame + numpy  (light actor: AU backend once)
        ds = ds.map_batches(RescoreVideos, fn_constructor_kwargs={
            "cfg": cfg, "kto_cfg": kto_cfg, "extract_cfg": extract_cfg, "invert_cfg": invert_cfg, "frames": str(frames.resolve())},
            **ROWS, compute=ActorPoolStrategy(min_size=1, max_size=n), num_cpus=RESCORE_CPUS)
        results = [r for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow") for r in batch.to_pylist()]
    results.sort(key=lambda r: r["source_sample_id"])
    if len(results) != len(rows):  # the ledger: one output row per input row
        raise RuntimeError(f"{len(rows)} candidates in, {len(results)} out")

    kept = [dict(r, video_path=os.path.relpath(r["video_path"])) for r in results if not r["reject_reason"]]
    rejected = [r for r in results if r["reject_reason"]]
    n_neg = write_table(out_dir / "negatives.parquet", kept, KTO_NEGATIVES_SCHEMA)
    n_rej = write_table(out_dir / "rejects.parquet", [reject_record(r) for r in rejected], REJECTS_SCHEMA)
    removed = _remove_orphans(out_dir / "videos", {Path(r["video_path"]).name for r in kept})

    other_split = sum(1 for split in kto.column("split").to_pylist() if cfg.split != "all" and split != cfg.split)
    shas = sorted({r["checkpoint_sha256"] for r in results if r["checkpoint_sha256"]})
    by_category = Counter((r["category"], r["reason"] or r["reject_reason"]) for r in results)
    metrics = {
        "kto_rows": kto.num_rows,
        "selected": len(rows),
        "split": cfg.split,
        "other_split": other_split,
        "beyond_max_samples": kto.num_rows - len(rows) - other_split,
        "negatives": n_neg,
        "rejects": n_rej,
        "negatives_by_reason": {k: sum(1 for r in kept if r["reason"] == k) for k in KTO_NEGATIVE_REASONS},
        "rejects_by_reason": dict(sorted(Counter(r["reject_reason"] for r in rejected).items())),
        "by_category": {f"{c}/{why}": k for (c, why), k in sorted(by_category.items())},
        "checkpoint": str(checkpoint) if checkpoint else None,
        "checkpoint_sha256": shas[0] if len(shas) == 1 else shas or None,
        "sample_steps": cfg.sample_steps,
        "identity_similarity": None,
        "identity_similarity_note": IDENTITY_UNMEASURED,
        "mean_face_ratio": _mean([r["face_ratio"] for r in results]),
        "mean_eye_lmd": _mean([r["eye_lmd"] for r in results]),
        "generate_seconds": round(sum(r["t_generate"] or 0.0 for r in results), 3),
        "score_seconds": round(sum(r["t_score"] or 0.0 for r in results), 3),
        "orphan_videos_removed": removed,
        "workers": cfg.num_workers,
        "wall_seconds": round(time.perf_counter() - t0, 3),
    }
    write_json(out_dir / "metrics.json", metrics)
    log.info("kto_negatives: %d negatives, %d rejects of %d candidates in %.1f s", n_neg, n_rej, len(rows), metrics["wall_seconds"])
    return metrics


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return round(float(np.mean(vals)), 6) if vals else None


def _remove_orphans(videos: Path, kept: set[str]) -> int:
    """Delete videos no negative refers to (well-controlled candidates, earlier runs, crashed temps)."""
    removed = 0
    for path in videos.iterdir():
        if path.name not in kept:
            path.unlink()
            removed += 1
    return removed


__all__ = ["GenerateVideos", "RescoreVideos", "candidate_rows", "run"]
