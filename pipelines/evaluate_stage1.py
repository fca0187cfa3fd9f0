"""``cogportrait evaluate stage1``: leave-one-clip-out evaluation of the Stage-1 compiler.

For each clip of the library (linear, one clip after another; a clip is milliseconds of work):

    load the clip's real controls, keypoints, events          (invert + extract outputs)
    hold out its identity: retrieval excludes every prototype of it, Π uses the other identities' average
    request = its label (when a known category) + the instruction its own events describe,
              its length, its first frame's head pose and face placement
    compile with each Table-3 variant: direct, retrieval, planner, composer, full
    score against the real clip: AU-F1 (Eq. 6), AU-Temp (Eq. 7), Eye-LMD

and write ``report.json`` (per clip and per variant) and ``table.md`` (the paper's Stage-1 rows).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq
from tqdm import tqdm

from cogportrait.agents.compiler import VARIANTS, CompileRequest, Stage1Compiler
from cogportrait.agents.describe import instruction_from_events
from cogportrait.behavior.sources import load_clip, read_clip_meta
from cogportrait.config import CompileConfig, EventsConfig, Stage1EvalConfig
from cogportrait.face.mapping import Placement, average_baseline
from cogportrait.face.reference import placement_from_landmarks
from cogportrait.io.atomic import atomic_path, write_json
from cogportrait.metrics.stage1 import rest_controls, score_stage1
from cogportrait.schema import AU_CHANNELS, CHANNEL_INDEX, HEAD_CHANNELS
from cogportrait.timeseries import fill_gaps

log = logging.getLogger("cogportrait")

VARIANT_ROWS = {  # the paper's Table 3 names
    "direct": "Direct label-to-keypoints (category trajectory, no retrieval)",
    "retrieval": "Rule-based retrieval (label only)",
    "planner": "Agent 1 only (planner)",
    "composer": "Agent 1 + Agent 2 w/o critic",
    "full": "Full (planner + composer + critic)",
}
HEAD = [CHANNEL_INDEX[c] for c in HEAD_CHANNELS]


def clip_placement(frames: str | Path, clip_id: str) -> Placement:
    """The held-out clip's face placement, measured on its first frame with a face (like a reference)."""
    table = pq.read_table(frames, filters=[("clip_id", "=", clip_id), ("face_present", "=", True)],
                          columns=["frame", "landmarks", "width", "height"])
    if table.num_rows == 0:
        return Placement()
    row = table.sort_by("frame").slice(0, 1).to_pylist()[0]
    landmarks = np.asarray(row["landmarks"], dtype=np.float64).reshape(-1, 3)
    return placement_from_landmarks(landmarks, int(row["width"]), int(row["height"]))


def evaluate_clip(
    compiler: Stage1Compiler, clip: Any, placement: Placement, seed: int, variants: tuple[str, ...] = VARIANTS,
) -> dict[str, Any]:
    """Compile one held-out clip with every variant and score each against the clip."""
    real = fill_gaps(np.asarray(clip.controls, dtype=np.float64))
    T = len(real)
    label = compiler.categories.canonical(clip.label) if clip.label else None
    instruction = instruction_from_events(clip.events, real)
    if label is None and not instruction:  # a free-text label and nothing to say: a neutral face
        label = compiler.categories.neutral.name
    others = {k: v for k, v in compiler.baselines.items() if k != clip.identity} or compiler.baselines
    baseline = average_baseline(others, name="loco-average")
    start_pose = tuple(float(v) for v in real[0, HEAD])
    real_kps = clip.keypoints
    request = CompileRequest(label=label, instructions=(instruction,) if instruction else (), n_frames=T,
                             start_pose=start_pose, placement=placement, baseline=baseline, seed=seed)
    category = compiler.categories.get(label or "neutral talking")
    channels = [CHANNEL_INDEX[c] for c in (category.target_aus if label else AU_CHANNELS)]
    tau = compiler.categories.au_thresholds
    thresholds = {c: tau[c] for c in AU_CHANNELS}  # AU-F1 counts the AUs (Eq. 6: u over the U AUs)
    rest_ref = rest_controls(compiler.baselines.get(clip.identity, baseline))
    rest_ref[HEAD] = real[0, HEAD]  # head motion is measured from where the clip starts, as compiled
    out: dict[str, Any] = {"clip_id": clip.clip_id, "label": clip.label, "category": label, "identity": clip.identity,
                           "instruction": instruction, "frames": T, "variants": {}}
    for variant in variants:
        result = compiler.compile(request, variant=variant, exclude_identities=(clip.identity,))
        scores = score_stage1(result.controls, real, result.keypoints, real_kps, channels, thresholds,
                              rest_pred=result.rest, rest_ref=rest_ref)
        out["variants"][variant] = {
            **scores.as_dict(), "critic_revisions": len(result.report.revisions),
            "critic_failing": [c.name for c in result.report.failing],
        }
    return out


def summarise(per_clip: list[dict[str, Any]]) -> dict[str, Any]:
    table = {}
    for variant in VARIANTS:
        rows = [c["variants"][variant] for c in per_clip if variant in c["variants"]]
        if not rows:
            continue
        mean = lambda key: float(np.nanmean([r[key] for r in rows])) if rows else float("nan")  # noqa: E731
        table[variant] = {"au_f1": mean("au_f1"), "au_temp": mean("au_temp"), "au_temp_unclipped": mean("au_temp_unclipped"),
                          "eye_lmd": mean("eye_lmd"), "eye_lmd_centred": mean("eye_lmd_centred"),
                          "critic_revisions": int(sum(r["critic_revisions"] for r in rows)), "clips": len(rows)}
    margin = table["full"]["au_temp"] - table["direct"]["au_temp"] if {"full", "direct"} <= set(table) else float("nan")
    return {"variants": table, "full_minus_direct_au_temp": margin}


def markdown(summary: dict[str, Any]) -> str:
    lines = ["| Stage-1 variant | AU-F1 ↑ | AU-Temp ↑ | AU-Temp unfloored ↑ | Eye-LMD ↓ | Eye-LMD centred ↓ | critic revisions | clips |",
             "|---|---|---|---|---|---|---|---|"]
    for variant, row in summary["variants"].items():
        lines.append(f"| {VARIANT_ROWS[variant]} | {row['au_f1']:.4f} | {row['au_temp']:.4f} | {row['au_temp_unclipped']:.4f} | "
                     f"{row['eye_lmd']:.4f} | {row['eye_lmd_centred']:.4f} | {row['critic_revisions']} | {row['clips']} |")
    lines.append("")
    lines.append(f"Full minus direct, AU-Temp: {summary['full_minus_direct_au_temp']:+.4f}")
    return "\n".join(lines) + "\n"


def run(cfg: Stage1EvalConfig, compile_cfg: CompileConfig, events_cfg: EventsConfig) -> dict[str, Any]:
    from pipelines.compile import open_compiler

    t0 = time.perf_counter()
    compiler = open_compiler(compile_cfg, events_cfg, library=cfg.library)
    meta = read_clip_meta(cfg.clips)
    clip_ids = pl.scan_parquet(compiler.source.parquet).select("clip_id").drop_nulls().unique().collect()["clip_id"].sort().to_list()
    if cfg.max_clips:
        clip_ids = clip_ids[: cfg.max_clips]
    per_clip = []
    for clip_id in tqdm(clip_ids, desc="stage-1 LOCO", unit="clip"):
        clip = load_clip(cfg.controls, clip_id, meta.get(clip_id), cfg.frames)
        per_clip.append(evaluate_clip(compiler, clip, clip_placement(cfg.frames, clip_id), compile_cfg.seed))
    summary = summarise(per_clip)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", {"summary": summary, "clips": per_clip, "seed": compile_cfg.seed})
    with atomic_path(out / "table.md", ".md") as tmp:
        tmp.write_text(markdown(summary))
    write_json(out / "metrics.json", {v: {k: round(x, 4) if isinstance(x, float) else x for k, x in row.items()}
                                      for v, row in summary["variants"].items()})
    with atomic_path(out / "ablation.csv", ".csv") as tmp:  # the table as `dvc plots show` draws it
        tmp.write_text("variant,au_f1,au_temp,eye_lmd\n" + "".join(
            f"{variant},{row['au_f1']:.4f},{row['au_temp']:.4f},{row['eye_lmd']:.4f}\n" for variant, row in summary["variants"].items()))
    return {"clips": len(per_clip), "seconds": round(time.perf_counter() - t0, 2), **summary}
