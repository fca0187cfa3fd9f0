"""The ``cogportrait`` command line: the one composition root.

Every verb is one entry of ``VERBS``: the ``params.yaml`` sections it runs with (each loaded into its
config class from ``STAGE_CONFIGS``), its options, and the function that runs it. One override
syntax for every verb: a verb's own flags (``--out``, ``--workers``, …) and ``--set KEY=VALUE`` both
override keys of its sections (``--set inversion.iterations=20``, ``--set index.nprobe=8``). One
error policy: a user error (a bad value, an unknown key or choice, a missing input) prints one line
and exits 2; Ctrl-C stops the job, shuts Ray down, leaves no partial table and exits 130.

Pipelines and Ray are imported only inside the verb that needs them (Ray is heavy).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

from cogportrait.agents.categories import CategoryTableError, UnknownCategoryError
from cogportrait.agents.compiler import CompileInputError
from cogportrait.agents.grammar import InstructionError, VocabularyError
from cogportrait.agents.planner import PlanningError
from cogportrait.config import STAGE_CONFIGS, ConfigError, from_mapping, load_params, parse_value, set_dotted
from cogportrait.curate.manifest import ManifestError
from cogportrait.face.au_backends import AUBackendError
from cogportrait.face.model import FaceModelError
from cogportrait.face.model_files import ModelFileError
from cogportrait.face.reference import ReferencePortraitError
from cogportrait.io.video import VideoError
from cogportrait.metrics.emh import AnnotationError
from cogportrait.metrics.identity import IdentityBackendError
from cogportrait.schema import TableError
from prototype_store.errors import LibraryError
from prototype_store.retrieval import TargetError, UnknownChannelError
from cogportrait.face.tps import AlignmentError
from training.errors import SampleInputError, TrainingDataError

log = logging.getLogger("cogportrait")

# What a user can fix: one line, exit 2. Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError, ManifestError, ModelFileError, VideoError, TableError, LibraryError, TargetError, UnknownChannelError,
    AUBackendError, FileNotFoundError, UnknownCategoryError, CategoryTableError, InstructionError, VocabularyError,
    PlanningError, ReferencePortraitError, CompileInputError, SampleInputError, AlignmentError,
    TrainingDataError, AnnotationError, IdentityBackendError, FaceModelError,
)
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C

Configs = dict[str, Any]  # params section -> its config object


@dataclass(frozen=True)
class Option:
    """A command-line option. With ``keys`` it overrides those config keys ("section.key"), typed
    by the config field; without, it is an argument of the verb itself (argparse ``kwargs``)."""

    flags: tuple[str, ...]
    help: str
    keys: tuple[str, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Verb:
    help: str
    run: Callable[[Configs, argparse.Namespace], dict | int | None]
    sections: tuple[str, ...] = ()  # params.yaml sections, loaded into STAGE_CONFIGS classes
    options: tuple[Option, ...] = ()


def _set(section: str, key: str, flag: str, help: str) -> Option:
    return Option((flag,), help, (f"{section}.{key}",))


def _workers(section: str) -> Option:
    return Option(("--workers",), "Ray workers (CPUs) to use", (f"{section}.num_workers",))


def _stage2_set() -> Option:
    return Option(("--set",), "override a key of the training config (dotted, e.g. train.steps=10); repeat",
                  kwargs={"action": "append", "default": [], "metavar": "KEY=VALUE", "dest": "stage2_set"})


def _training_options(config_help: str) -> tuple[Option, ...]:
    """The options of the training verbs (``train``, ``train-kto``)."""
    return (Option(("--config",), config_help, kwargs={"required": True}),
            _stage2_set(),
            Option(("--fresh",), "delete the output folder's checkpoints and loss log first", kwargs={"action": "store_true"}),
            Option(("--workers",), "Ray Train workers (overrides train.num_workers)", kwargs={"type": int}))


# ------------------------------------------------------------------------------------------------
# verbs
# ------------------------------------------------------------------------------------------------
def run_curate(cfg: Configs, args: argparse.Namespace) -> dict:
    from pipelines.curate import run

    return run(cfg["curate"], fresh=args.fresh)


def run_extract(cfg: Configs, args: argparse.Namespace) -> dict:
    from pipelines.extract import run

    return run(cfg["extract"])


def run_invert(cfg: Configs, args: argparse.Namespace) -> dict:
    from pipelines.invert import run

    return run(cfg["invert"])


def run_library_build(cfg: Configs, args: argparse.Namespace) -> dict:
    from prototype_store import build_index

    result: dict[str, Any] = {}
    if args.only in (None, "prototypes"):
        if args.local:
            from prototype_store.build import build_prototypes_local

            result["prototypes"] = build_prototypes_local(cfg["prototypes"])
        else:
            from pipelines.prototypes import run

            result["prototypes"] = run(cfg["prototypes"])
    if args.only in (None, "index"):
        t0 = time.perf_counter()
        meta = build_index(cfg["index"].library, cfg["index"])
        result["index"] = {k: meta[k] for k in ("kind", "n", "nlist", "nprobe", "recall_at_5", "fingerprint")}
        result["index"]["build_s"] = round(time.perf_counter() - t0, 3)
    return result


def _open_store(library: str):
    from prototype_store import PrototypeStore

    # one query per process: sorting the features for the walk (seconds at 1e6 rows) would cost
    # more than the scan it saves, so one-shot commands leave the walk out (same answers)
    return PrototypeStore.open(library, walk_min_rows=sys.maxsize)


def run_library_query(cfg: Configs, args: argparse.Namespace) -> int:
    from prototype_store.retrieval import CHANNEL_ALIASES, parse_target_arg
    from cogportrait.schema import CHANNEL_INDEX

    targets = dict(parse_target_arg(t) for t in args.target)
    matches = _open_store(cfg["index"].library).query(
        targets, label=args.label, event_type=args.event_type, k=args.k, min_frames=args.min_frames,
        identity_exclude=args.exclude_identity or None, arrays=args.arrays,
    )
    if args.json:
        json.dump([m.to_dict(arrays=args.arrays) for m in matches], sys.stdout)
        sys.stdout.write("\n")
        return 0
    if not matches:
        print("no prototype passes the filters")
        return 0
    shown = list(targets)
    print(f"{'#':>2} {'distance':>9}  {'event_type':<17} {'T':>4}  {'label':<20} {'prototype_id':<36}  " + " ".join(f"{n:>9}" for n in shown))
    for m in matches:
        vals = []
        for n in shown:
            j = CHANNEL_INDEX[CHANNEL_ALIASES[n][0]] if n in CHANNEL_ALIASES else CHANNEL_INDEX[n]
            vals.append(f"{m.channel_mean[j]:.2f}/{m.channel_max[j]:.2f}")
        print(f"{m.rank:>2} {m.distance:9.4f}  {str(m.event_type):<17} {m.T:>4}  {str(m.label)[:20]:<20} {m.prototype_id:<36}  " + " ".join(f"{v:>9}" for v in vals))
    print("(channel columns: mean/peak)")
    return 0


def run_library_stats(cfg: Configs, args: argparse.Namespace) -> int:
    stats = _open_store(args.library_pos or cfg["index"].library).stats()
    print(json.dumps(stats, indent=2, sort_keys=True, default=str))
    return 0


def run_library_show(cfg: Configs, args: argparse.Namespace) -> int:
    try:
        match = _open_store(args.library_pos).get(args.prototype_id)
    except KeyError as err:  # an id not in the library: the user's typo
        raise LibraryError(err.args[0] if err.args else str(err)) from None
    info = match.to_dict(arrays=args.arrays)
    info.pop("rank")
    info.pop("distance")
    if args.plot:
        from prototype_store.plot import plot_prototype

        info["plot"] = str(plot_prototype(match, args.plot))
        log.info("wrote %s", info["plot"])
    print(json.dumps(info, indent=2))
    return 0


def run_library_report(cfg: Configs, args: argparse.Namespace) -> dict:
    from prototype_store.report import write_library_report

    return write_library_report(args.library_pos, args.out, limit=args.limit)


def run_kto_mine(cfg: Configs, args: argparse.Namespace) -> dict:
    from pipelines.kto import run

    return run(cfg["kto_mine"])


def run_kto_negatives(cfg: Configs, args: argparse.Namespace) -> dict:
    from pipelines.kto_negatives import run

    return run(cfg["kto_negatives"], cfg["kto_mine"], cfg["extract"], cfg["invert"])


def run_face_convert_flame(cfg: Configs, args: argparse.Namespace) -> dict:
    from cogportrait.face.flame import convert_flame

    return convert_flame(args.model, args.embedding, args.out, n_shape=args.n_shape)


def run_face_fit_generic(cfg: Configs, args: argparse.Namespace) -> dict:
    from pipelines.invert import fit_generic

    return fit_generic(cfg["invert"], args.frames, args.out)


def load_training_config(args: argparse.Namespace, extra: dict[str, Any] | None = None):
    """``--config`` with every ``--set`` applied (typed by the config's fields)."""
    from training.config import load_stage2_config, parse_overrides

    overrides = parse_overrides(args.stage2_set)
    for key, value in (extra or {}).items():
        set_dotted(overrides, key, value)
    return load_stage2_config(args.config, overrides)


def ensure_training_tables(cfg, params_path: str) -> dict[str, Any]:
    """A fresh clone has no ``data/extract``: run the curate and extract stages' code on the params'
    dataset (the shipped sample by default) so ``train`` works without ``dvc repro`` first."""
    clips, frames = Path(cfg.data.clips), Path(cfg.data.frames)
    if clips.is_file() and frames.is_file():
        return {}
    from cogportrait.config import CurateConfig, ExtractConfig, load_section

    curate_cfg, extract_cfg = load_section(CurateConfig, "curate", params_path), load_section(ExtractConfig, "extract", params_path)
    if Path(extract_cfg.out).resolve() != frames.parent.resolve() or Path(extract_cfg.out).resolve() != clips.parent.resolve():
        raise FileNotFoundError(f"training tables {clips} / {frames} are missing (run `dvc repro extract`, or point data.clips/"
                                f"data.frames at the extract stage's output)")
    from pipelines.curate import run as run_curate_job
    from pipelines.extract import run as run_extract_job

    log.info("%s missing: running the curate and extract stages on %s first", frames, curate_cfg.manifest)
    done: dict[str, Any] = {}
    if not Path(extract_cfg.clips).is_file():
        done["curate"] = run_curate_job(curate_cfg)
    done["extract"] = run_extract_job(extract_cfg)
    return done


def _training_run(args: argparse.Namespace):
    """The training config of ``train``/``train-kto`` with ``--workers``; ``--fresh`` clears its output."""
    import shutil

    stage2 = load_training_config(args, {"train.num_workers": args.workers} if args.workers else None)
    if args.fresh:
        out = Path(stage2.train.out)
        for name in ("checkpoints", "loss.csv", "metrics.json", "ray"):
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    return stage2


def _start_training_ray() -> None:
    from pipelines._ray import ONE_ROW_PER_BLOCK, start_ray

    start_ray(num_cpus=None, max_block_bytes=ONE_ROW_PER_BLOCK)  # a training sample is a whole window: a block each


def run_train(cfg: Configs, args: argparse.Namespace) -> dict:
    from training.recipes.flow_matching import launch

    stage2 = _training_run(args)
    prepared = ensure_training_tables(stage2, args.params)
    _start_training_ray()
    return {**launch(stage2), **({"prepared": prepared} if prepared else {})}


def run_train_kto(cfg: Configs, args: argparse.Namespace) -> dict:
    from training.recipes.kto import launch

    stage2 = _training_run(args)
    _start_training_ray()
    return launch(stage2)


def run_sample(cfg: Configs, args: argparse.Namespace) -> dict:
    from training.generate import SampleArgs, sample

    from cogportrait.config import CurateConfig, ExtractConfig
    from cogportrait.face.reference import read_reference

    stage2 = load_training_config(args)
    params = load_params(args.params) if Path(args.params).is_file() else {}
    curate, extract = (from_mapping(cls, params.get(name), name) for cls, name in ((CurateConfig, "curate"), (ExtractConfig, "extract")))
    # the portrait as curate's face crop, measured like the extract stage: what Stage 1 and training see
    reference = read_reference(args.reference, extract, curate.crop_scale)
    return sample(stage2, SampleArgs(reference=args.reference, keypoints=args.keypoints, out=args.out, checkpoint=args.checkpoint,
                                     audio=args.audio, prompt=args.prompt, seed=args.seed), reference=reference)


def run_models_check(cfg: Configs, args: argparse.Namespace) -> dict:
    from cogportrait.face.model_files import face_detector_path, face_landmarker_path

    return {"face_detector": str(face_detector_path()), "face_landmarker": str(face_landmarker_path())}


def run_doctor(cfg: Configs, args: argparse.Namespace) -> int:
    from pipelines.doctor import exit_code, format_table, run_checks

    checks = run_checks(args.params)
    if args.json:
        json.dump([c.to_dict() for c in checks], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_table(checks))
    return exit_code(checks)


def run_compile(cfg: Configs, args: argparse.Namespace) -> dict:
    from pipelines.compile import CompileArgs, run

    return run(cfg["compile"], cfg["invert"].events, extract_cfg=cfg["extract"], crop_scale=cfg["curate"].crop_scale, args=CompileArgs(
        label=args.label, instructions=tuple(args.instruction or ()), duration_s=args.duration, audio=args.audio,
        reference=args.reference, out=args.out, base_url=args.base_url, model=args.model, identity=args.identity))


def run_evaluate_cases(cfg: Configs, args: argparse.Namespace) -> dict:
    from pipelines.evaluate_videos import prepare_cases

    return prepare_cases(cfg["evaluate_videos"], cfg["compile"])


def run_evaluate_videos(cfg: Configs, args: argparse.Namespace) -> dict:
    from pipelines.evaluate_videos import run

    return run(cfg["evaluate_videos"], cfg["compile"], cfg["extract"], cfg["invert"])


def run_evaluate_stage1(cfg: Configs, args: argparse.Namespace) -> dict:
    from pipelines.evaluate_stage1 import run

    return run(cfg["evaluate_stage1"], cfg["compile"], cfg["invert"].events)


def ensure_stage1_inputs(cfg: Configs) -> dict[str, Any]:
    """A fresh clone has no prototype library or face model (``dvc repro`` makes them): run the
    stages that make them (curate, extract, invert, library build) on the params' dataset, the
    shipped sample by default, each only where its output is missing, so ``generate`` works with no
    other step (as ``train`` does with ``ensure_training_tables``): they are the files ``dvc repro``
    makes, by the same code. Only when ``compile`` reads those stages' own outputs: a library or face
    model configured elsewhere that is missing is the user's to make (one line, exit 2)."""
    compile_cfg = cfg["compile"]
    library, face_model = Path(compile_cfg.library), Path(compile_cfg.face_model)
    library_ok = (library / "prototypes.parquet").is_file() and (library / "index" / "meta.json").is_file()
    if library_ok and (face_model / "model.json").is_file():
        return {}

    def same(a: str | Path, b: str | Path) -> bool:
        return Path(a).resolve() == Path(b).resolve()

    if not (same(library, cfg["prototypes"].out) and same(library, cfg["index"].library)
            and same(face_model, Path(cfg["invert"].out) / "face_model")):
        raise FileNotFoundError(f"no prototype library at {library} or no face model at {face_model}, and they are not this "
                                f"params file's stage outputs (run `dvc repro index invert`, or point compile.library and "
                                f"compile.face_model at a library and face model)")
    from pipelines.curate import run as run_curate_job
    from pipelines.extract import run as run_extract_job
    from pipelines.invert import run as run_invert_job

    log.info("%s or %s missing: running the curate, extract, invert and library stages on %s first (where their outputs "
             "are missing; `dvc repro` makes the same files)", library, face_model, cfg["curate"].manifest)
    done: dict[str, Any] = {}
    if not (Path(cfg["curate"].out) / "clips.parquet").is_file():
        done["curate"] = run_curate_job(cfg["curate"])
    if not (Path(cfg["extract"].out) / "frames.parquet").is_file():
        done["extract"] = run_extract_job(cfg["extract"])
    invert_out = Path(cfg["invert"].out)
    if not ((invert_out / "controls.parquet").is_file() and (invert_out / "events.parquet").is_file()
            and (face_model / "model.json").is_file()):
        done["invert"] = run_invert_job(cfg["invert"])
    if not library_ok:
        done["library"] = run_library_build(cfg, argparse.Namespace(only=None, local=False))
    return done


def run_generate(cfg: Configs, args: argparse.Namespace) -> dict:
    from pipelines.generate import run

    prepared = ensure_stage1_inputs(cfg)
    result = run(cfg["generate"], cfg["compile"], cfg["invert"].events, cfg["extract"], cfg["curate"].crop_scale)
    return {**result, **({"prepared": prepared} if prepared else {})}


UPSTREAM = {  # the inputs of the per-clip jobs (prototypes, kto mine)
    "controls": "invert's output folder (controls/events.parquet)",
    "clips": "curate's clips.parquet (labels, identities, audio)",
    "frames": "extract's frames.parquet (keypoints)",
}

VERBS: dict[str, Verb] = {
    "curate": Verb(
        "raw videos -> clean 512² 25 fps face clips (Ray Data job)", run_curate, ("curate",),
        (_set("curate", "manifest", "--manifest", "manifest.csv (its folder is the dataset root)"),
         _set("curate", "out", "--out", "output folder"), _workers("curate"),
         Option(("--fresh",), "ignore the journal of finished videos (by default a rerun resumes)", kwargs={"action": "store_true"})),
    ),
    "extract": Verb(
        "clips -> per-frame landmarks, blendshapes, pose, keypoints (Ray Data job)", run_extract, ("extract",),
        (_set("extract", "clips", "--clips", "clips.parquet written by curate"),
         _set("extract", "out", "--out", "output folder (frames.parquet, clips.parquet, rejects.parquet, metrics.json)"),
         _set("extract", "au_backend", "--au-backend", "blendshape (default) or pyfeat"), _workers("extract")),
    ),
    "invert": Verb(
        "frames -> 17-channel controls, face model, events (Ray Data job)", run_invert, ("invert",),
        (_set("invert", "frames", "--frames", "folder written by extract"),
         _set("invert", "out", "--out", "output folder (controls.parquet, events.parquet, face_model/, metrics.json)"),
         _workers("invert")),
    ),
    "library build": Verb(
        "controls -> prototypes.parquet (Ray Data job) -> FAISS index", run_library_build, ("prototypes", "index"),
        (*(_set("prototypes", k, f"--{k}", h) for k, h in UPSTREAM.items()),
         Option(("--out",), "library folder (prototypes.parquet + index/)", ("prototypes.out", "index.library")),
         Option(("--only",), "run one of the two steps", kwargs={"choices": ("prototypes", "index")}),
         Option(("--local",), "segment in-process without Ray (small data)", kwargs={"action": "store_true"}),
         _workers("prototypes")),
    ),
    "library query": Verb(
        "top-k prototypes by Eq. 3 for channel targets", run_library_query, ("index",),
        (_set("index", "library", "--library", "library folder (default: params index.library)"),
         Option(("--target",), "channel target, a value or LO..HI (head angles in degrees), e.g. AU45L=0.6..1.0; repeat",
                kwargs={"action": "append", "required": True, "metavar": "NAME=VALUE"}),
         Option(("--label",), "only prototypes with this label"),
         Option(("--event-type",), "only this event type (or 'window')"),
         Option(("-k",), "how many results", kwargs={"type": int, "default": 5}),
         Option(("--min-frames",), "only prototypes at least this long", kwargs={"type": int}),
         Option(("--exclude-identity",), "leave out this identity; repeat", kwargs={"action": "append"}),
         Option(("--json",), "stdout: exactly one JSON list, ascending distance", kwargs={"action": "store_true"}),
         Option(("--arrays",), "include controls and keypoints per result", kwargs={"action": "store_true"})),
    ),
    "library stats": Verb(
        "counts per label and event type, lengths, index kind and recall (JSON)", run_library_stats, ("index",),
        (Option(("library_pos",), "library folder (default: params index.library)", kwargs={"nargs": "?", "metavar": "LIB"}),
         _set("index", "library", "--library", argparse.SUPPRESS)),
    ),
    "library show": Verb(
        "one prototype's metadata (JSON) and optionally a plot of its 17 channels", run_library_show, (),
        (Option(("library_pos",), "library folder", kwargs={"metavar": "LIB"}),
         Option(("prototype_id",), "prototype id", kwargs={"metavar": "ID"}),
         Option(("--plot",), "write a PNG of the channels over time"),
         Option(("--arrays",), "include controls and keypoints", kwargs={"action": "store_true"})),
    ),
    "library report": Verb(
        "a static HTML page to browse the library (counts, one card per prototype with its channel plot and "
        "animated keypoints, label / event type filters; works offline from file://)", run_library_report, (),
        (Option(("library_pos",), "library folder", kwargs={"metavar": "LIB"}),
         Option(("--out",), "report folder (index.html + assets/); replaced as a whole, so new, empty or an earlier report",
                kwargs={"required": True}),
         Option(("--limit",), "at most this many prototype cards, spread over event types and labels (default: all)",
                kwargs={"type": int})),
    ),
    "kto mine": Verb(
        "mine desirable boundary-case windows (3-5 s) from real clips (Ray Data job)", run_kto_mine, ("kto_mine",),
        (*(_set("kto_mine", k, f"--{k}", h) for k, h in UPSTREAM.items()),
         _set("kto_mine", "out", "--out", "output folder (kto.parquet, metrics.json)"), _workers("kto_mine")),
    ),
    "kto negatives": Verb(
        "undesirable KTO samples: the Stage 2 checkpoint regenerates each desirable window, poorly controlled videos "
        "are kept (Ray Data job)", run_kto_negatives, ("kto_negatives", "kto_mine", "extract", "invert"),
        (_set("kto_negatives", "kto", "--kto", "kto_mine's kto.parquet"),
         _set("kto_negatives", "checkpoint", "--checkpoint", "a Stage 2 checkpoint or a folder of them (latest); '' = the config's weights"),
         _set("kto_negatives", "stage2_config", "--config", "training config (training/configs/*.yaml)"),
         _set("kto_negatives", "split", "--split", "train (default), test or all"),
         _set("kto_negatives", "sample_steps", "--sample-steps", "sampler steps"),
         _set("kto_negatives", "out", "--out", "output folder (negatives.parquet, rejects.parquet, videos/, metrics.json)"),
         _workers("kto_negatives")),
    ),
    "face convert-flame": Verb(
        "convert a licensed FLAME model.pkl + MediaPipe landmark embedding.npz into a pickle-free OUT.npz "
        "(the only command that reads a pickle: run it once, on your own file)", run_face_convert_flame, (),
        (Option(("model",), "FLAME generic_model.pkl (from flame.is.tue.mpg.de, under its licence)"),
         Option(("embedding",), "mediapipe_landmark_embedding.npz (lmk_face_idx, lmk_b_coords, landmark_indices)"),
         Option(("out",), "output .npz read by the flame face-model backend"),
         Option(("--n-shape",), "shape components before the expression ones (FLAME 2020: 300)", kwargs={"type": int, "default": 300})),
    ),
    "face fit-generic": Verb(
        "fit the generic face model (every dataset's prior: per-identity statistics, basis, average rest baseline) "
        "on one or more extract folders (Ray Data job; the invert section's ridge, rest and symmetric settings)",
        run_face_fit_generic, ("invert",),
        (Option(("--frames",), "an extract output folder (frames.parquet, clips.parquet); repeat to pool datasets",
                kwargs={"action": "append", "required": True}),
         Option(("--out",), "output folder, e.g. cogportrait/face/generic (the shipped one; replaced atomically)",
                kwargs={"required": True}),
         _workers("invert")),
    ),
    "compile": Verb(
        "Stage 1: a label and/or instructions -> plan, 17 controls and 62 eye-region keypoints per frame",
        run_compile, ("compile", "invert", "extract", "curate"),
        (_set("compile", "library", "--library", "prototype library folder (default: params compile.library)"),
         Option(("--label",), "behaviour label, e.g. 'cognitive effort' (the known categories: datasets/emh/categories.yaml)"),
         Option(("--instruction",), "fine-grained instruction, e.g. 'raise your left eyebrow, then blink twice'; repeat",
                kwargs={"action": "append"}),
         Option(("--duration",), "length in seconds (or give --audio)", kwargs={"type": float}),
         Option(("--audio",), "a WAV file: its length sets the duration and it is muxed into preview.mp4"),
         Option(("--reference",), "reference portrait (its head pose starts the sequence; keypoints are placed on it)"),
         Option(("--out",), "output folder", kwargs={"required": True}),
         Option(("--identity",), "a library identity (face model baseline) to animate instead of the average face"),
         _set("compile", "backend", "--backend", "rules (offline, default) or openai (any OpenAI-compatible endpoint)"),
         _set("compile", "seed", "--seed", "random seed: same seed, same files"),
         Option(("--base-url",), "openai backend: endpoint base URL (else compile.openai.base_url or OPENAI_BASE_URL)"),
         Option(("--model",), "openai backend: model name (else compile.openai.model or OPENAI_MODEL)")),
    ),
    "evaluate stage1": Verb(
        "leave-one-clip-out evaluation of Stage 1 (AU-F1, AU-Temp, Eye-LMD; the paper's Table 3 rows)",
        run_evaluate_stage1, ("evaluate_stage1", "compile", "invert"),
        (_set("evaluate_stage1", "library", "--library", "prototype library folder"),
         _set("evaluate_stage1", "out", "--out", "output folder (report.json, table.md, metrics.json)"),
         _set("evaluate_stage1", "max_clips", "--max-clips", "evaluate only the first N clips (0 = all)")),
    ),
    "evaluate cases": Verb(
        "EMH cases of the annotation file -> reference clips, portraits, audio and a requests table for generate",
        run_evaluate_cases, ("evaluate_videos", "compile"),
        (_set("evaluate_videos", "annotations", "--annotations", "EMH annotation file"),
         _set("evaluate_videos", "clips", "--clips", "curated clips.parquet whose video_ids are the case ids"),
         _set("evaluate_videos", "cases_out", "--out", "output folder (requests.parquet, reference/, portraits/, audio/)")),
    ),
    "evaluate videos": Verb(
        "generated videos against reference videos, both re-extracted: AU-F1, AU-Temp, Eye-LMD, ID-Sim "
        "(the paper's Table 2, per EMH category and overall)",
        run_evaluate_videos, ("evaluate_videos", "compile", "extract", "invert"),
        (_set("evaluate_videos", "generated", "--generated", "folder of generated videos (<case_id>.mp4)"),
         _set("evaluate_videos", "reference", "--reference", "folder of reference videos (<case_id>.mp4)"),
         _set("evaluate_videos", "out", "--out", "output folder (metrics.json, report.json, table.md, chart.png, rejects.parquet)"),
         _set("evaluate_videos", "annotations", "--annotations", "EMH annotation file (\"\" = none: every case unlabelled)"),
         _set("evaluate_videos", "arcface_dir", "--arcface-dir", "local insightface model pack for ID-Sim (e.g. buffalo_l)")),
    ),
    "train": Verb(
        "Stage 2: fine-tune PortraitDiT with flow matching on Ray Train (resumes from the latest checkpoint)",
        run_train, (),
        _training_options("training config (training/configs/*.yaml)"),
    ),
    "train-kto": Verb(
        "Stage 2: KTO refinement on boundary cases (desirable real windows vs the generator's poor ones) on Ray Train",
        run_train_kto, (),
        _training_options("KTO training config (training/configs/*-kto.yaml)"),
    ),
    "sample": Verb(
        "Stage 2: reference portrait + Stage 1 keypoints (+ audio, prompt) -> mp4 with dynamic eye-region CFG",
        run_sample, (),
        (Option(("--config",), "training config (training/configs/*.yaml)", kwargs={"required": True}),
         Option(("--checkpoint",), "checkpoint folder (default: the config's weights, random for tiny)"),
         Option(("--reference",), "reference portrait image", kwargs={"required": True}),
         Option(("--keypoints",), "Stage 1's keypoints.parquet (cogportrait compile)", kwargs={"required": True}),
         Option(("--audio",), "16 kHz WAV: muxed, and its length sets the frame count"),
         Option(("--prompt",), "text prompt (default: the config's template without a label)"),
         Option(("--seed",), "random seed: same seed, same video", kwargs={"type": int, "default": 0}),
         Option(("--out",), "output folder (video.mp4, sample.json)", kwargs={"required": True}),
         _stage2_set()),
    ),
    "generate": Verb(
        "batch generation (Ray Data job): a requests table -> Stage 1 compile -> Stage 2 sample -> one mp4 per request",
        run_generate, ("generate", "compile", "invert", "extract", "curate", "prototypes", "index"),
        (_set("generate", "requests", "--requests", "requests table (request_id, label, instruction, reference, audio, prompt, "
                                                    "seed, duration_s; paths relative to its folder)"),
         _set("generate", "out", "--out", "output folder (requests/<id>/, generated.parquet, rejects.parquet, metrics.json)"),
         _set("generate", "checkpoint", "--checkpoint", "Stage 2 checkpoint folder, or train's checkpoints/ (the latest); "
                                                        "default: the training config's own weights"),
         _set("generate", "stage2_config", "--config", "training config (default: training/configs/tiny.yaml)"),
         _workers("generate")),
    ),
    "models check": Verb("verify the sha256 of every bundled model file", run_models_check),
    "doctor": Verb(
        "report which parts of the installation are present and what each enables (exit 1: a required part is missing)",
        run_doctor, (),
        (Option(("--json",), "stdout: exactly one JSON list of checks (name, required, ok, detail, enables)",
                kwargs={"action": "store_true"}),)),
}
GROUP_HELP = {
    "library": "the prototype library: build, query, stats, show, report",
    "kto": "KTO preference data",
    "face": "face-model utilities",
    "models": "local model files",
    "evaluate": "evaluation harnesses (the paper's metrics)",
}


# ------------------------------------------------------------------------------------------------
# parsing, configs, errors
# ------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (exit 2), like every other user error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cogportrait", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="params file (default: ./params.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true")
    top = parser.add_subparsers(dest="command", required=True, metavar="VERB", parser_class=_Parser)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, verb in VERBS.items():
        words = name.split()
        sub = top
        if len(words) == 2:
            if words[0] not in groups:
                group = top.add_parser(words[0], help=GROUP_HELP[words[0]])
                groups[words[0]] = group.add_subparsers(dest=f"{words[0]}_command", required=True, metavar="VERB",
                                                        parser_class=_Parser)
            sub = groups[words[0]]
        p = sub.add_parser(words[-1], help=verb.help, description=verb.help)
        for opt in verb.options:
            if opt.keys:
                dest = opt.flags[0].lstrip("-").replace("-", "_")
                p.add_argument(*opt.flags, help=opt.help, dest=f"set:{dest}", metavar=dest.upper())
            else:
                p.add_argument(*opt.flags, help=opt.help, **opt.kwargs)
        if verb.sections:
            p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                           help=f"override a params key of {', '.join(verb.sections)} (dotted for nested keys); repeat")
        p.set_defaults(verb=name)
    return parser


def load_configs(verb: Verb, args: argparse.Namespace) -> Configs:
    """Each section of ``verb`` from the params file, with the command line's overrides applied."""
    params_path = Path(args.params)
    if params_path.exists():
        params = load_params(params_path)
    elif args.params != "params.yaml":
        raise ConfigError(f"params file {params_path} not found")
    else:
        params = {}
    values = {s: dict(params.get(s) or {}) for s in verb.sections}
    overrides: list[tuple[str, str]] = []
    for opt in verb.options:
        given = getattr(args, "set:" + opt.flags[0].lstrip("-").replace("-", "_"), None) if opt.keys else None
        if given is not None:
            overrides += [(key, given) for key in opt.keys]
    for item in getattr(args, "overrides", []):
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
        key = key.strip()
        if key.split(".")[0] not in verb.sections:  # a key of the verb's section (the one that has it)
            owners = [s for s in verb.sections if key.split(".")[0] in {f.name for f in fields(STAGE_CONFIGS[s])}]
            key = f"{owners[0] if len(owners) == 1 else verb.sections[0]}.{key}"
        overrides.append((key, text))
    for key, text in overrides:
        section, _, rest = key.partition(".")
        set_dotted(values[section], rest, parse_value(STAGE_CONFIGS[section], rest, text, section))
    return {s: from_mapping(STAGE_CONFIGS[s], values[s], s) for s in verb.sections}


def setup_logging(verbose: bool = False) -> None:
    """One logging style for every command; logs go to stderr so stdout stays machine-readable."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _stop_ray() -> None:
    """Shut down the Ray instance this process started or joined (workers, tasks, actors)."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _remove_temporaries(configs: Configs) -> None:
    """After an interrupt: the hidden temporaries of killed writers in the verb's output folders."""
    from cogportrait.io.atomic import remove_temporaries

    for cfg in configs.values():
        for folder in {getattr(cfg, "out", None), getattr(cfg, "library", None)} - {None}:
            removed = remove_temporaries(folder)
            if removed:
                log.info("removed %d temporaries in %s", removed, folder)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    verb = VERBS[args.verb]
    # Ray and the libraries under it may replace the SIGINT handler; Ctrl-C must still interrupt
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    configs: Configs = {}
    try:
        configs = load_configs(verb, args)
        result = verb.run(configs, args)
    except USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"cogportrait {args.verb}: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        log.warning("%s interrupted: stopping Ray and removing temporaries; no table was replaced", args.verb)
        _stop_ray()
        _remove_temporaries(configs)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGINT, previous)
    if isinstance(result, dict):
        print(json.dumps(result, indent=2, sort_keys=True, default=str))
        return 0
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
