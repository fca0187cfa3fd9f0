"""``cogportrait evaluate videos``: generated videos scored against reference videos (Table 2).

Linear, one pair after another (each pair is two landmarker passes, about a second per 100
frames per core):

    pair files by name: <generated>/<case_id>.mp4 with <reference>/<case_id>.mp4
                                                         (1:1; an unpaired file -> rejects)
    case -> its EMH annotation (category, prompt, events); none -> category "unlabelled", S_y = the AUs
    extract both with the extract stage's landmarker and AU backend              (2 passes per pair)
    ID-Sim: identity embeddings of the reference portrait and id_frames generated frames
    score: AU-F1, AU-Temp, Eye-LMD, ID-Sim (metrics/videos.py)

and write ``report.json`` (per case), ``metrics.json`` (per category and overall, the skipped
metrics with their reasons), ``table.md`` (Table 2's shape), ``chart.png`` (per category) and
``rejects.parquet``. Every video file found ends in exactly one place: a scored pair or a reject.

``cogportrait evaluate cases`` (``prepare_cases``) makes the annotated cases runnable on a curated
dataset: reference clips, portraits, audio and the requests table ``cogportrait generate`` takes,
so the DAG goes cases -> generate -> evaluate videos.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from cogportrait.agents.categories import load_categories
from cogportrait.behavior.kto_negatives import WindowSignals, window_signals
from cogportrait.config import CompileConfig, ExtractConfig, InvertConfig, VideoEvalConfig
from cogportrait.face.au_backends import make_backend
from cogportrait.face.extract import extract_clip, iter_clip_frames, list_column
from cogportrait.io.atomic import atomic_dir, atomic_path, write_json, write_table
from cogportrait.io.video import VideoError
from cogportrait.metrics.emh import EmhCase, load_annotations
from cogportrait.metrics.identity import cosine, make_identity_backend
from cogportrait.metrics.videos import SKIPPED, markdown_table, score_pair, summarise
from cogportrait.schema import (
    AU_CHANNELS, CLIP_FPS, GENERATE_REQUESTS_SCHEMA, N_LANDMARKS, REJECTS_SCHEMA, TableError, check_reason,
)

log = logging.getLogger("cogportrait")

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm")
UNLABELLED = "unlabelled"


def video_files(folder: str | Path) -> dict[str, Path]:
    """case_id -> video of a folder: ``<case_id>.mp4`` (any of VIDEO_SUFFIXES), or
    ``<case_id>/video.mp4`` (``cogportrait generate``'s ``requests/`` folder). A missing folder is
    the user's error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"video folder {folder} not found")
    found = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES:
            found[p.stem] = p
        elif p.is_dir() and (p / "video.mp4").is_file():
            found[p.name] = p / "video.mp4"
    return found


def _reject(case_id: str, reason: str, detail: str, path: Path | str) -> dict[str, Any]:
    check_reason("evaluate", reason)
    return {"video_id": case_id, "stage": "evaluate", "reason": reason, "detail": detail, "path": str(path)}


class PairScorer:
    """Holds the landmarker's AU backend and the identity backend; scores one pair per call."""

    def __init__(self, cfg: VideoEvalConfig, extract_cfg: ExtractConfig, invert_cfg: InvertConfig) -> None:
        self.cfg, self.extract_cfg, self.refine = cfg, extract_cfg, invert_cfg.pose_refine
        self.backend = make_backend(extract_cfg.au_backend, extract_cfg.au_model_dir or None, extract_cfg.gaze_down_blink_coupling)
        self.identity, self.identity_skip = make_identity_backend(cfg.identity_backend, cfg.arcface_dir)

    def extract(self, path: Path) -> tuple[pa.Table, WindowSignals]:
        frames = extract_clip(path, path.stem, False, self.backend, self.extract_cfg)
        return frames, window_signals(frames, False, self.refine)

    def id_sim(self, generated: Path, gen_frames: pa.Table, reference: Path, ref_frames: pa.Table) -> float | None:
        """Mean cosine similarity of ``id_frames`` generated frames to the reference portrait (the
        reference's first face frame); None without an identity backend."""
        if self.identity is None:
            return None
        [portrait] = self._embed(reference, ref_frames, 1)
        return float(np.mean([cosine(e, portrait) for e in self._embed(generated, gen_frames, self.cfg.id_frames)]))

    def _embed(self, path: Path, frames: pa.Table, count: int) -> list[np.ndarray]:
        table = frames.filter(pa.compute.field("face_present")).sort_by("frame")
        picks = np.unique(np.linspace(0, table.num_rows - 1, count).round().astype(int)) if count > 1 else np.array([0])
        rows = table.take(pa.array(picks))
        wanted = dict(zip(rows.column("frame").to_pylist(), range(rows.num_rows)))
        landmarks = list_column(rows, "landmarks", N_LANDMARKS * 3).reshape(-1, N_LANDMARKS, 3)
        width, height = rows.column("width").to_pylist(), rows.column("height").to_pylist()
        out = []
        for idx, rgb in iter_clip_frames(path):
            k = wanted.get(idx)
            if k is not None:
                px = landmarks[k][:, :2] * np.array([width[k], height[k]], dtype=np.float64)
                out.append(self.identity.embed(rgb, px))
                if len(out) == len(wanted):
                    break
        return out


def pair_cases(cfg: VideoEvalConfig, cases: dict[str, EmhCase]) -> tuple[list[tuple[str, Path, Path]], list[dict[str, Any]]]:
    """(case_id, generated, reference) pairs, and the rejects of every unpaired file or case."""
    generated, reference = video_files(cfg.generated), video_files(cfg.reference)
    pairs = [(c, generated[c], reference[c]) for c in sorted(generated) if c in reference]
    rejects = [_reject(c, "no_reference", f"no {c}.* in {cfg.reference}", p) for c, p in sorted(generated.items()) if c not in reference]
    rejects += [_reject(c, "not_generated", f"no {c}.* in {cfg.generated}", p) for c, p in sorted(reference.items()) if c not in generated]
    rejects += [_reject(c, "not_generated", f"annotated case without videos in {cfg.generated} or {cfg.reference}", "")
                for c in sorted(cases) if c not in generated and c not in reference]
    return pairs, rejects


def prepare_cases(cfg: VideoEvalConfig, compile_cfg: CompileConfig) -> dict[str, Any]:
    """``cogportrait evaluate cases``: the EMH cases of the annotation file made runnable on a
    curated dataset (the case_id is a video_id; its first clip is the reference video).

    Writes under ``cases_out``: ``reference/<case_id>.mp4`` (the clip), ``portraits/<case_id>.png``
    (its first frame: the reference portrait), ``audio/<case_id>.wav`` (its audio, when it has one)
    and ``requests.parquet`` for ``cogportrait generate`` (request_id = case_id, label = the
    category, the case's prompt, the clip's length). A case whose video has no curated clip, or
    whose clip's length differs from the annotation's, is an error: the annotations describe
    frames of that clip.
    """
    import cv2

    cases = load_annotations(cfg.annotations, load_categories(compile_cfg.categories))
    clips_path = Path(cfg.clips)
    if not clips_path.is_file():
        raise FileNotFoundError(f"curated clips table {clips_path} not found (run curate first)")
    clips = pq.read_table(clips_path, columns=["video_id", "start_frame", "clip_path", "audio_path", "has_audio", "n_frames"])
    first: dict[str, dict[str, Any]] = {}
    for row in sorted(clips.to_pylist(), key=lambda r: (r["video_id"], r["start_frame"])):
        first.setdefault(row["video_id"], row)
    root, out = clips_path.parent, Path(cfg.cases_out)
    requests = []
    with atomic_dir(out) as tmp:
        for sub in ("reference", "portraits", "audio"):
            (tmp / sub).mkdir()
        for case in cases:
            clip = first.get(case.case_id)
            if clip is None:
                raise TableError(f"EMH case {case.case_id}: no curated clip of video {case.case_id} in {clips_path}")
            if clip["n_frames"] != case.frames:
                raise TableError(f"EMH case {case.case_id}: annotated for {case.frames} frames, its clip has {clip['n_frames']}")
            shutil.copyfile(root / clip["clip_path"], tmp / "reference" / f"{case.case_id}.mp4")
            _, rgb = next(iter_clip_frames(root / clip["clip_path"]))
            if not cv2.imwrite(str(tmp / "portraits" / f"{case.case_id}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
                raise OSError(f"cannot write the portrait of {case.case_id}")
            audio = None
            if clip["has_audio"]:
                shutil.copyfile(root / clip["audio_path"], tmp / "audio" / f"{case.case_id}.wav")
                audio = f"audio/{case.case_id}.wav"
            requests.append({"request_id": case.case_id, "label": case.category, "instruction": None,
                             "reference": f"portraits/{case.case_id}.png", "audio": audio, "prompt": case.prompt, "seed": 0,
                             "duration_s": None if audio else case.frames / CLIP_FPS})
        write_table(tmp / "requests.parquet", requests, GENERATE_REQUESTS_SCHEMA)
    log.info("evaluate cases: %d EMH cases -> %s", len(cases), out)
    return {"cases": len(cases), "with_audio": sum(r["audio"] is not None for r in requests), "out": str(out)}


def run(cfg: VideoEvalConfig, compile_cfg: CompileConfig, extract_cfg: ExtractConfig, invert_cfg: InvertConfig) -> dict[str, Any]:
    t0 = time.perf_counter()
    categories = load_categories(compile_cfg.categories)
    cases = {c.case_id: c for c in load_annotations(cfg.annotations, categories)} if cfg.annotations else {}
    pairs, rejects = pair_cases(cfg, cases)
    scorer = PairScorer(cfg, extract_cfg, invert_cfg)
    id_name = scorer.identity.name if scorer.identity is not None else None
    skipped = dict(SKIPPED)
    if id_name is None:
        skipped["ID-Sim"] = scorer.identity_skip
    thresholds = categories.au_thresholds
    scored, warnings = [], []
    for case_id, gen_path, ref_path in tqdm(pairs, desc="evaluate", unit="pair", disable=None):
        case = cases.get(case_id)
        category = case.category if case else UNLABELLED
        target = categories.get(category).target_aus if case else list(AU_CHANNELS)
        try:
            ref_frames, ref = scorer.extract(ref_path)
        except VideoError as err:
            rejects.append(_reject(case_id, err.reason, f"reference: {err.detail}", ref_path))
            continue
        try:
            gen_frames, gen = scorer.extract(gen_path)
        except VideoError as err:
            rejects.append(_reject(case_id, err.reason, f"generated: {err.detail}", gen_path))
            continue
        if not ref.present.any() or not gen.present.any():
            side, path = ("reference", ref_path) if not ref.present.any() else ("generated", gen_path)
            rejects.append(_reject(case_id, "no_face", f"the {side} video shows no face", path))
            continue
        if case and len(ref) != case.frames:
            warnings.append(f"{case_id}: the annotation counts {case.frames} frames, the reference decodes to {len(ref)}")
        id_sim = scorer.id_sim(gen_path, gen_frames, ref_path, ref_frames)
        scored.append(score_pair(case_id, category, gen, ref, target, thresholds, id_sim))
    for w in warnings:
        log.warning("%s", w)

    summary = summarise(scored, id_name)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", {"cases": [p.as_dict() for p in scored], "rejects": rejects, "skipped": skipped,
                                     "warnings": warnings, "identity_backend": id_name})
    with atomic_path(out / "table.md", ".md") as tmp:
        tmp.write_text(markdown_table(summary, id_name, skipped))
    write_table(out / "rejects.parquet", rejects, REJECTS_SCHEMA)
    write_chart(summary, id_name, out / "chart.png")
    metrics = {"pairs_scored": len(scored), "rejects": len(rejects), **summary, "skipped": skipped,
               "wall_seconds": round(time.perf_counter() - t0, 3)}
    write_json(out / "metrics.json", metrics)
    log.info("evaluate videos: %d pairs scored, %d rejects -> %s", len(scored), len(rejects), out)
    return metrics


def write_chart(summary: dict, id_name: str | None, path: Path) -> None:
    """Per-category bars of the metrics in [0, 1] (AU-F1, AU-Temp, ID-Sim) and of Eye-LMD."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {**summary["per_category"], "overall": summary["overall"]}
    names = list(rows)
    if not summary["overall"]["cases"]:  # still a chart: the DAG's plot always exists, and says why it is empty
        fig = plt.figure(figsize=(6, 2))
        fig.text(0.5, 0.5, "no pair scored (see rejects.parquet)", ha="center", va="center")
        with atomic_path(path, ".png") as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
        return
    shares = ["AU-F1", "AU-Temp"] + ([id_name] if id_name else [])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 1.1 * len(names) + 2), 6.5), sharex=True,
                                      gridspec_kw={"height_ratios": [2, 1]})
    x = np.arange(len(names))
    width = 0.8 / len(shares)
    for k, metric in enumerate(shares):
        values = [rows[n].get(metric) for n in names]
        top.bar(x + (k - (len(shares) - 1) / 2) * width, [np.nan if v is None else v for v in values], width, label=f"{metric} ↑")
    top.set_ylim(0, 1.05)
    top.legend(loc="lower right", fontsize=8)
    top.set_title("Generated vs reference, per category")
    bottom.bar(x, [np.nan if rows[n].get("Eye-LMD") is None else rows[n]["Eye-LMD"] for n in names], 0.5, color="tab:gray")
    bottom.set_ylabel("Eye-LMD ↓")
    bottom.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
