"""``cogportrait compile``: a label (+ instructions) -> 62 eye-region keypoints per frame (Stage 1).

Not a Ray job: one compile is milliseconds of work. This module wires the pieces the core
library provides to the prototype store (a layer above it) and writes the outputs:

    plan.json, composition.json, critic.json       the agents' validated answers
    controls.parquet (T x 17), keypoints.parquet (T x 62 x 3)
    neutral_keypoints.parquet (1 x 62 x 3)  the rest face at frame 0's pose: Stage 2 warps it onto the portrait
    channels.png     the 17 channels with the events shaded
    preview.mp4      the keypoints drawn on the reference portrait (audio muxed when given)
    blendshapes.csv  the controls as ARKit-52 curves in the Live Link Face CSV layout
    summary.json     what ran, how long each part took, the critic's verdict
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from cogportrait.agents.categories import load_categories
from cogportrait.agents.compiler import CompileInputError, CompileRequest, CompileResult, Stage1Compiler
from cogportrait.agents.planner import RulesPlanner
from cogportrait.config import CompileConfig, CurateConfig, EventsConfig, ExtractConfig
from cogportrait.face.mapping import average_baseline, load_face_model
from cogportrait.face.reference import Reference, neutral_reference, read_reference
from cogportrait.io.atomic import write_json, write_table
from cogportrait.schema import CLIP_FPS, COMPILED_CONTROLS_SCHEMA, COMPILED_KEYPOINTS_SCHEMA, N_KEYPOINTS

log = logging.getLogger("cogportrait")


def audio_seconds(audio: str | os.PathLike) -> float:
    """An audio file's length in seconds, read by the decoder that muxes it into preview.mp4 (any
    rate, width, channel count or container)."""
    from cogportrait.io.preview import PreviewInputError, decode_audio

    if not Path(audio).is_file():
        raise CompileInputError(f"audio file {audio} not found")
    try:
        samples, rate = decode_audio(audio)
    except PreviewInputError as err:
        raise CompileInputError(f"cannot read audio {audio}: {err}") from None
    return samples.shape[1] / rate


def n_frames_for(duration_s: float | None, audio: str | None) -> int:
    """T = round(duration x 25), or the audio file's length in frames."""
    if (duration_s is None) == (audio is None):
        raise CompileInputError("give exactly one of --duration SECONDS or --audio FILE.wav")
    if audio is not None:
        duration_s = audio_seconds(audio)
    assert duration_s is not None
    if not math.isfinite(duration_s) or duration_s <= 0:
        raise CompileInputError(f"duration must be a positive number of seconds, got {duration_s}")
    n = int(round(duration_s * CLIP_FPS))
    if n < 1:
        raise CompileInputError(f"{duration_s} s is shorter than one frame at {CLIP_FPS} fps")
    return n


def make_backend(cfg: CompileConfig, base_url: str | None = None, model: str | None = None) -> tuple[Any, str | None]:
    """The configured agent backend (``None``: the compiler's own rules backend) and, when the
    openai backend cannot even be configured, the warning that says why rules answer instead."""
    if cfg.backend == "rules":
        return None, None
    from cogportrait.agents.backends import BackendUnavailable
    from cogportrait.agents.openai_backend import OpenAIBackend

    try:
        return OpenAIBackend.from_config(cfg.openai, base_url, model), None
    except BackendUnavailable as err:
        why = f"openai backend unavailable ({err}); using the rules backend"
        log.warning(why)
        return None, why


def open_compiler(
    cfg: CompileConfig, events_cfg: EventsConfig, library: str | None = None, backend: Any = None,
    store_overrides: dict[str, Any] | None = None,
) -> Stage1Compiler:
    """Open the library, face model and tables once; compile as often as you like."""
    from prototype_store import PrototypeStore

    store = PrototypeStore.open(library or cfg.library, **(store_overrides or {}))
    folder = Path(cfg.face_model)
    if not (folder / "model.json").is_file():
        raise CompileInputError(f"no face model at {folder} (run `cogportrait invert`, or set compile.face_model)")
    model, baselines = load_face_model(folder)
    if not baselines:
        raise CompileInputError(f"the face model at {folder} holds no identity baseline")
    categories = load_categories(cfg.categories)
    planner = RulesPlanner.from_config(cfg, categories)
    return Stage1Compiler(store, model, baselines, average_baseline(baselines), categories, planner, cfg, events_cfg,
                          backend=backend)


def event_of_frames(result: CompileResult) -> np.ndarray:
    T = len(result.controls)
    idx = np.full(T, -1, dtype=np.int32)
    for ec in result.composition.events:
        idx[ec.start_frame : ec.end_frame] = ec.event_index
    return idx


def write_outputs(
    out: str | os.PathLike, result: CompileResult, reference: Reference, cfg: CompileConfig, audio: str | None = None,
) -> dict[str, str]:
    """Every artefact of one compile, each written atomically."""
    from cogportrait.behavior.plot import plot_channels
    from cogportrait.face.arkit import write_live_link_csv
    from cogportrait.io.preview import write_preview

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    T = len(result.controls)
    times = np.arange(T) / CLIP_FPS
    paths = {name: out / name for name in ("plan.json", "composition.json", "critic.json", "controls.parquet",
                                           "keypoints.parquet", "neutral_keypoints.parquet", "channels.png", "preview.mp4", "blendshapes.csv")}
    for name, model in (("plan.json", result.plan), ("composition.json", result.composition), ("critic.json", result.report)):
        if model is not None:
            write_json(paths[name], json.loads(model.model_dump_json()))
    write_table(paths["controls.parquet"], pa.table({
        "frame": pa.array(np.arange(T, dtype=np.int32)), "time_s": pa.array(times),
        "event_index": pa.array(event_of_frames(result)),
        "controls": pa.FixedSizeListArray.from_arrays(pa.array(result.controls.reshape(-1)), result.controls.shape[1]),
    }), COMPILED_CONTROLS_SCHEMA)
    write_table(paths["keypoints.parquet"], pa.table({
        "frame": pa.array(np.arange(T, dtype=np.int32)), "time_s": pa.array(times),
        "keypoints": pa.FixedSizeListArray.from_arrays(pa.array(result.keypoints.reshape(-1)), N_KEYPOINTS * 3),
    }), COMPILED_KEYPOINTS_SCHEMA)
    write_table(paths["neutral_keypoints.parquet"], pa.table({
        "frame": pa.array([0], pa.int32()), "time_s": pa.array([0.0]),
        "keypoints": pa.FixedSizeListArray.from_arrays(pa.array(result.neutral_keypoints.reshape(-1)), N_KEYPOINTS * 3),
    }), COMPILED_KEYPOINTS_SCHEMA)
    spans = [(e.start_frame, e.end_frame, e.stage) for e in result.plan.events] if result.plan else []
    title = f"{result.plan.label or 'instruction'}" if result.plan else result.variant
    plot_channels(result.controls, spans, paths["channels.png"], title=title, fps=CLIP_FPS)
    write_preview(paths["preview.mp4"], result.keypoints, reference.image, size=cfg.preview_size, fps=CLIP_FPS,
                  audio_path=audio)
    write_live_link_csv(paths["blendshapes.csv"], result.controls, result.rest, CLIP_FPS, cfg.critic.gaze_deg_per_unit)
    return {k: str(v) for k, v in paths.items()}


@dataclass(frozen=True)
class CompileArgs:
    label: str | None
    instructions: tuple[str, ...]
    duration_s: float | None
    audio: str | None
    reference: str | None
    out: str
    base_url: str | None = None
    model: str | None = None
    identity: str | None = None  # a library identity: Π uses its own baseline instead of the average face


def run(
    cfg: CompileConfig, events_cfg: EventsConfig, args: CompileArgs, extract_cfg: ExtractConfig | None = None,
    crop_scale: float = CurateConfig.crop_scale,
) -> dict[str, Any]:
    """The command: validate the inputs, compile, write, summarise."""
    t0 = time.perf_counter()
    if not args.label and not args.instructions:
        raise CompileInputError("give --label, --instruction, or both")
    n_frames = n_frames_for(args.duration_s, args.audio)
    # the portrait as curate's face crop, so keypoints are in [0, 1] of a 512² crop like the library's
    reference = read_reference(args.reference, extract_cfg, crop_scale) if args.reference else neutral_reference(cfg.preview_size)
    backend, why = make_backend(cfg, args.base_url, args.model)
    compiler = open_compiler(cfg, events_cfg, backend=backend)
    if args.identity is not None and args.identity not in compiler.baselines:
        known = sorted(compiler.baselines)
        raise CompileInputError(f"identity {args.identity!r} is not in the face model ({len(known)} known: "
                                f"{', '.join(known[:8])}{', ...' if len(known) > 8 else ''})")
    request = make_request(compiler, cfg, args.label, args.instructions, n_frames, reference, args.identity, cfg.seed)
    t_open = time.perf_counter() - t0
    return compile_to(compiler, request, reference, cfg, args.out, args.audio, [why] if why else [], t_open)


def make_request(
    compiler: Stage1Compiler, cfg: CompileConfig, label: str | None, instructions: tuple[str, ...], n_frames: int,
    reference: Reference, identity: str | None = None, seed: int = 0,
) -> CompileRequest:
    """One compile request from a portrait; an unknown label (rules backend) or an instruction the
    grammar cannot read fails here, before any work."""
    canonical = compiler.categories.canonical(label) if label else None
    if canonical is None and label and cfg.backend == "rules":
        compiler.categories.get(label)  # raises the unknown-label error that lists the known ones
    if compiler.backend is compiler.rules:
        for text in instructions:
            compiler.rules.planner.parse(text)  # an unreadable instruction fails before any work
    return CompileRequest(label=canonical or label, instructions=tuple(instructions), n_frames=n_frames,
                          start_pose=tuple(float(v) for v in reference.head_pose),
                          placement=reference.placement, identity=identity, seed=seed)


def compile_to(
    compiler: Stage1Compiler, request: CompileRequest, reference: Reference, cfg: CompileConfig, out: str | os.PathLike,
    audio: str | None = None, warnings: list[str] | None = None, t_open: float = 0.0,
) -> dict[str, Any]:
    """Compile one request and write every artefact and ``summary.json`` into ``out``."""
    result = compiler.compile(request)
    files = write_outputs(out, result, reference, cfg, audio)
    summary = {
        "label": request.label, "instructions": list(request.instructions), "frames": request.n_frames,
        "seconds": round(request.n_frames / CLIP_FPS, 3), "backend": result.backend, "seed": request.seed,
        "events": len(result.plan.events) if result.plan else 0, "approved": result.report.approved,
        "critic_rounds": result.report.rounds, "revisions": len(result.report.revisions),
        "failing_checks": [c.name for c in result.report.failing], "warnings": list(warnings or []) + result.warnings,
        "timings_s": {k: round(v, 4) for k, v in {"open": t_open, **result.timings}.items()},
        "files": files,
    }
    write_json(Path(out) / "summary.json", summary)
    return summary
