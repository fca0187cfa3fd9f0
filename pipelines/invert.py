"""invert: per-frame face signals -> 17-channel controls, face model, behaviour events.

    clips ─prepare (1:1 clip → signals; reads its own frames)─▶ rest frames + moments ─▶ driver:
                                    fit_face_model (baselines, ridge + generic prior, LOIO, LOCO)
          ─invert (1:1, model held by the actor)─┬─ controls rows (1:N) ─▶ controls.parquet
                                                 ├─ events ─────────────▶ events.parquet
                                                 └─ FLAME fits (optional, 1:N) ─▶ flame_fits.parquet

extract writes each clip's frames contiguously (row groups never mix clips), so a clip's task
reads just its own rows with a predicate on clip_id: no shuffle. A clip then travels as one row of
typed tensor columns (``FaceSignals.to_row``). The maths is Ray-free in ``cogportrait/face``
(``signals``, ``fitting``, ``inversion``); the driver fits the model from per-clip moments (tiny
matrices), which also makes exact leave-one-identity-out (LOIO) fits cheap for the quality gates.
Rows keep the input clip order (Ray's preserve_order), so reruns write the same bytes.

Run: ``cogportrait invert --frames data/extract --out data/invert``. ``fit_generic`` is the same
prepare-fit-score path over several extract folders, writing the shipped generic face model
(``cogportrait face fit-generic --frames DIR [--frames DIR ...] --out FOLDER``).
"""

from __future__ import annotations

import json
import logging
import resource
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy, TaskPoolStrategy
from ray.data.expressions import col
from tqdm import tqdm

from cogportrait.behavior.events import detect_events, event_columns, event_rows
from cogportrait.config import ConfigError, EventsConfig, InversionSettings, InvertConfig, RestSettings
from cogportrait.face.extract import frames_files
from cogportrait.face.fitting import (
    CorrSums,
    FaceModelFit,
    RestData,
    clip_moments,
    fit_face_model,
    generic_from_fit,
    inverted_matrix,
    loio_identities,
    invert_signals,
    quality_report,
    rest_frames,
)
from cogportrait.face.flame import FlameFitter, FlameModel
from cogportrait.face.model import (
    GENERIC_VERSION,
    MOMENT_FIELDS,
    Baseline,
    ClipMoments,
    ClipStats,
    GenericFaceModel,
    LinearFaceModel,
    resolve_generic,
)
from cogportrait.face.signals import FaceSignals, prepare_frames, proxy_matrix, smoothed
from cogportrait.io.atomic import AtomicParquetWriter, atomic_dir, write_json, write_table
from cogportrait.schema import (
    CLIPS_SCHEMA,
    CONTROLS_SCHEMA,
    EVENTS_SCHEMA,
    FLAME_FITS_SCHEMA,
    N_CHANNELS,
    REJECTS_SCHEMA,
    TableError,
    check_reason,
    identity_key,
)
from pipelines._ray import LARGE_BLOCKS, start_ray

log = logging.getLogger("cogportrait.invert")

LIGHT_CPUS = 0.25
# The actor pool has exactly num_workers actors, so a fraction never oversubscribes the cores,
# and it leaves CPUs free for the tasks downstream while the pool is still alive (a 1-CPU
# cluster whose only CPU is held by an idle actor would hang the next step).
ACTOR_CPUS = 0.5
FRAME_COLUMNS = ["clip_id", "frame", "face_present", "landmarks", "transform", "au", "gaze", "head_pose", "blendshapes", "width", "height"]
SUMMARY_COLUMNS = ["clip_id", "identity", "n_rest", *(f"rest_{f}" for f in RestData.FIELDS), *(f"moment_{f}" for f in MOMENT_FIELDS)]


def prepare_step(row: dict, refine: str, rest: RestSettings, smooth_frames: int, fit_smooth_frames: int) -> dict:
    """1:1 — one clip's frames -> its signals (for the inversion, filtered over ``smooth_frames``),
    rest frames and raw moments (for the fit, over ``fit_smooth_frames``), as typed tensor columns."""
    if len(row["row_groups"]):  # the clip's own row groups (extract writes one per clip)
        table = pq.ParquetFile(row["path"]).read_row_groups([int(g) for g in row["row_groups"]], columns=FRAME_COLUMNS)
        table = table.filter(pc.equal(table.column("clip_id"), row["clip_id"]))
    else:
        table = pq.read_table(row["path"], columns=FRAME_COLUMNS, filters=[("clip_id", "==", row["clip_id"])])
    raw = prepare_frames(table, row["identity"], row["mirrored"], refine=refine)
    sig, fit_sig = smoothed(raw, smooth_frames), smoothed(raw, fit_smooth_frames)
    idx = rest_frames(fit_sig, rest)
    moments = clip_moments(fit_sig)
    return {
        **sig.to_row(),
        "n_rest": len(idx),
        **{f"rest_{k}": v for k, v in RestData.of(fit_sig, idx).arrays().items()},
        **{f"moment_{f}": np.asarray(getattr(moments, f)) for f in MOMENT_FIELDS},
    }


class InvertClip:
    """1:1 — controls, residual error and events of one clip (model + baselines held once)."""

    def __init__(self, fit: FaceModelFit, settings: InversionSettings, events: EventsConfig, flame_model: str, flame_ridge: float) -> None:
        self.fit, self.settings, self.events = fit, settings, events
        self.flame = FlameFitter(FlameModel.load(flame_model), ridge=flame_ridge) if flame_model else None

    def __call__(self, row: dict) -> dict:
        sig = FaceSignals.from_row(row)
        controls, err = invert_signals(sig, self.fit.model, self.fit.baselines[sig.identity], self.settings)
        prox = proxy_matrix(sig)
        loco_corr = self._held_out_corr(sig, prox, self.fit.loco.get(sig.clip_id))
        loio_corr = self._held_out_corr(sig, prox, self.fit.loio.get(sig.identity) if sig.clip_id in self.fit.loio_identity else None)
        aperture = np.stack([sig.lid["aperture_left"], sig.lid["aperture_right"]], axis=1)
        out = {
            "clip_id": sig.clip_id, "frame": sig.frame, "present": sig.present,
            "controls": controls.astype(np.float32), "residual": err.astype(np.float32),
            "fit_corr": CorrSums.of(inverted_matrix(controls), prox).as_array(), "loco_corr": loco_corr.as_array(),
            "loio_corr": loio_corr.as_array(),
            "err_sum": float(np.nansum(err)), "err_n": int(np.isfinite(err).sum()),
            **event_columns(sig.frame, detect_events(controls, aperture, sig.present, self.events)),
        }
        if self.flame is not None:
            out.update(_flame_arrays(self.flame, sig))
        return out

    def _held_out_corr(self, sig: FaceSignals, prox: np.ndarray, held: tuple[np.ndarray, Baseline] | None) -> CorrSums:
        """Inverted-vs-proxy sums under a basis fitted without this clip (or identity); NaN when none."""
        if held is None or not np.all(np.isfinite(held[0])):
            return CorrSums.of(np.full_like(prox, np.nan), prox)
        controls, _ = invert_signals(sig, LinearFaceModel(held[0], self.fit.model.ridge), held[1], self.settings)
        return CorrSums.of(inverted_matrix(controls), prox)


def _flame_arrays(fitter: FlameFitter, sig: FaceSignals) -> dict[str, np.ndarray]:
    """FLAME expression + eye pose per frame (NaN where no face) on the canonical keypoints."""
    t = len(sig.frame)
    ok = sig.present & np.all(np.isfinite(sig.canon.reshape(t, -1)), axis=1)
    expr = np.full((t, fitter.model.n_expr), np.nan, dtype=np.float32)
    eye = np.full((t, 6), np.nan, dtype=np.float32)
    res = np.full(t, np.nan, dtype=np.float32)
    if ok.any():
        fit = fitter.fit(sig.canon[ok])
        expr[ok], eye[ok], res[ok] = fit.expr, fit.eye_pose.reshape(-1, 6), fit.residual
    return {"flame_expr": expr, "flame_eye": eye, "flame_res": res}


def flame_rows(row: dict) -> list[dict]:
    """1:N — one clip's result -> FLAME_FITS_SCHEMA rows (face-lost frames: null fits)."""
    out = []
    for i, f in enumerate(row["frame"]):
        ok = bool(np.isfinite(row["flame_res"][i]))
        out.append({"clip_id": row["clip_id"], "frame": int(f),
                    "expression": row["flame_expr"][i].tolist() if ok else None,
                    "eye_pose": row["flame_eye"][i].tolist() if ok else None,
                    "residual": float(row["flame_res"][i]) if ok else None})
    return out


def controls_table(batch: dict[str, np.ndarray]) -> pa.Table:
    """1:N — clip results -> CONTROLS_SCHEMA rows, built column-wise (null where no face)."""
    parts = []
    for cid, frame, present, controls, err in zip(batch["clip_id"], batch["frame"], batch["present"], batch["controls"], batch["residual"]):
        ok = np.asarray(present, dtype=bool) & np.isfinite(err)
        parts.append(pa.table({
            "clip_id": pa.array([cid] * len(frame), pa.string()),
            "frame": pa.array(np.asarray(frame, dtype=np.int32)),
            "face_present": pa.array(np.asarray(present, dtype=bool)),
            "controls": pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(controls, np.float32).ravel()), N_CHANNELS,
                                                          mask=pa.array(~ok)),
            "residual_error": pa.array(np.asarray(err, np.float32), mask=~ok),
        }))
    return pa.concat_tables(parts).cast(CONTROLS_SCHEMA) if parts else CONTROLS_SCHEMA.empty_table()


def _clip_info(frames_dir: Path) -> tuple[dict[str, tuple[str, bool]], pa.Table | None]:
    """clip_id -> (identity key, mirrored) from extract's clips.parquet."""
    path = frames_dir / "clips.parquet"
    if not path.exists():
        return {}, None
    clips = pq.read_table(path, schema=CLIPS_SCHEMA)
    info = {r["clip_id"]: (identity_key(r["identity"], r["clip_id"]), bool(r["mirrored"]))
            for r in clips.select(["clip_id", "identity", "mirrored"]).to_pylist()}
    return info, clips


@dataclass
class Prepared:
    """Every clip's signals (a materialised dataset) and what the driver fits the model from."""

    clips_ds: Any  # ray.data.Dataset of FaceSignals rows + rest frames + moments
    good: Any  # the clips whose identity has rest frames
    rest: dict[str, RestData]
    moments: dict[str, ClipMoments]
    identity_of: dict[str, str]
    no_rest: list[str]
    n_clips: int


def _prepare(frames_dirs: list[Path], cfg: InvertConfig) -> Prepared:
    """1:1 clip -> signals, rest frames and raw moments, for the clips of one or more extract folders."""
    files: list[Path] = []
    clip_info: dict[str, tuple[str, bool]] = {}
    for frames_dir in frames_dirs:
        found = frames_files(frames_dir)
        if not found:
            raise FileNotFoundError(f"no frames-*.parquet or frames.parquet in {frames_dir}; run extract first")
        files += found
        clip_info.update(_clip_info(frames_dir)[0])
    n = cfg.num_workers
    clip_rows = _clip_rows(files, clip_info)
    if not clip_rows:
        raise TableError(f"no clip in {', '.join(map(str, frames_dirs))}")
    # a few clips per task: a clip is ~10 ms of work, a Ray task ~100 ms of overhead here
    n_blocks = min(len(clip_rows), max(2 * n, -(-len(clip_rows) // cfg.clips_per_task)))
    ds = ray.data.from_items(clip_rows, override_num_blocks=n_blocks)
    # 1:1 clip -> signals, rest frames, moments; reads the clip's rows, pose removal  (1 CPU)
    clips_ds = ds.map(prepare_step, fn_kwargs={"refine": cfg.pose_refine, "rest": cfg.rest, "smooth_frames": cfg.smooth_frames,
                                               "fit_smooth_frames": cfg.fit_smooth_frames}, num_cpus=1,
                      compute=TaskPoolStrategy(size=n)).materialize()
    summary = clips_ds.select_columns(SUMMARY_COLUMNS).take_all()
    by_identity: dict[str, list[RestData]] = defaultdict(list)
    for r in summary:
        if r["n_rest"]:
            by_identity[r["identity"]].append(RestData(*(np.asarray(r[f"rest_{f}"]) for f in RestData.FIELDS)))
    rest = {ident: RestData.concat(by_identity[ident]) for ident in sorted(by_identity)}
    no_rest = sorted(r["clip_id"] for r in summary if r["identity"] not in rest)
    good = clips_ds.filter(expr=col("identity").is_in(sorted(rest))) if no_rest else clips_ds
    moments = {r["clip_id"]: ClipMoments(*(np.asarray(r[f"moment_{f}"]) for f in MOMENT_FIELDS))
               for r in summary if r["identity"] in rest}
    return Prepared(clips_ds, good, rest, moments, {r["clip_id"]: r["identity"] for r in summary}, no_rest, len(summary))


def generic_prior(cfg: InvertConfig, identity_of: dict[str, str]) -> tuple[ClipStats | None, dict]:
    """The generic model's statistics of people not in this dataset, weighted as ``prior_frames``
    frames; and what metrics.json records about it. A generic identity is left out when its name
    or one of its clips is the dataset's (the sample's people are in the shipped fitting set)."""
    folder = resolve_generic(cfg.generic_model)
    if folder is None or cfg.prior_frames <= 0:
        return None, {"used": False}
    generic = GenericFaceModel.load(folder)
    prior, used = generic.prior(set(identity_of.values()), set(identity_of), cfg.prior_frames)
    fitted_with = generic.meta.get("fit_smooth_frames", generic.meta.get("smooth_frames", 1))
    if fitted_with != cfg.fit_smooth_frames:
        log.warning("the generic face model was fitted with fit_smooth_frames=%s, this dataset uses %s: the prior's signals "
                    "are filtered differently", fitted_with, cfg.fit_smooth_frames)
    info = {"used": bool(used), "generic_model": cfg.generic_model, "version": GENERIC_VERSION,
            "content_sha256": json.loads((folder / "generic.json").read_text())["content_sha256"],
            "identities": used, "left_out_as_in_dataset": sorted(set(generic.stats) - set(used)), "frames": cfg.prior_frames}
    return (prior if used else None), info


def run(cfg: InvertConfig) -> dict:
    """Run the job; returns the metrics also written to ``metrics.json``."""
    t_start = time.perf_counter()
    frames_dir = Path(cfg.frames).resolve()
    out_dir = Path(cfg.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    _, clips = _clip_info(frames_dir)

    start_ray(cfg.num_workers, LARGE_BLOCKS, preserve_order=True)
    n = cfg.num_workers
    marks = [("start", time.perf_counter())]
    prep = _prepare([frames_dir], cfg)
    summary_n, no_rest, good = prep.n_clips, prep.no_rest, prep.good

    marks.append(("prepare", time.perf_counter()))
    prior, prior_info = generic_prior(cfg, prep.identity_of)
    fit = fit_face_model(prep.rest, prep.moments, prep.identity_of, cfg.ridge, {"frames_dir": str(frames_dir), "prior": prior_info},
                         prior=prior, symmetric=cfg.symmetric)

    marks.append(("fit", time.perf_counter()))
    results = _invert(good, fit, cfg)

    marks.append(("invert", time.perf_counter()))
    with AtomicParquetWriter(out_dir / "controls.parquet", CONTROLS_SCHEMA) as writer:
        # 1:N clip -> its controls rows, column-wise                              (light CPU)
        tables = results.select_columns(["clip_id", "frame", "present", "controls", "residual"]).map_batches(
            controls_table, batch_format="numpy", num_cpus=LIGHT_CPUS, compute=TaskPoolStrategy(size=n)
        )
        for batch in tqdm(tables.iter_batches(batch_format="pyarrow", batch_size=None), desc="controls", unit="batch", disable=None):
            writer.write_table(batch)
        n_rows = writer.num_rows
    flame_path = out_dir / "flame_fits.parquet"
    if cfg.flame_model:
        with AtomicParquetWriter(flame_path, FLAME_FITS_SCHEMA) as writer:
            # 1:N clip -> one FLAME fit row per frame                             (light CPU)
            for batch in results.flat_map(flame_rows, num_cpus=LIGHT_CPUS, compute=TaskPoolStrategy(size=n)).iter_batches(
                batch_format="pyarrow", batch_size=4096
            ):
                writer.write_table(batch)
    elif flame_path.exists():
        flame_path.unlink()  # a fit from an earlier run with another model must not linger
    summaries = results.select_columns(
        ["clip_id", *CORR_COLUMNS, "err_sum", "err_n", "event_type", "event_eyes", "event_frames", "event_values"]
    ).take_all()
    event_list = [e for r in summaries for e in event_rows(r["clip_id"], r)]
    n_events = write_table(out_dir / "events.parquet", event_list, EVENTS_SCHEMA)
    with atomic_dir(out_dir / "face_model") as tmp:
        fit.model.save(tmp, fit.baselines)

    reject_rows = []
    for cid in no_rest:
        check_reason("invert", "no_face")
        reject_rows.append({"video_id": cid, "stage": "invert", "reason": "no_face", "detail": "no frame with a usable face"})
    write_table(out_dir / "rejects.parquet", reject_rows, REJECTS_SCHEMA)

    marks.append(("write", time.perf_counter()))
    metrics = _quality(fit, summaries, cfg, prior_info)
    wall = time.perf_counter() - t_start
    metrics.update({
        "clips": summary_n - len(no_rest), "rejects": len(no_rest), "frames": n_rows, "events": n_events,
        "events_by_type": dict(sorted(Counter(e["event_type"] for e in event_list).items())),
        "wall_seconds": round(wall, 3), "workers": n,
        "step_seconds": {name: round(t - marks[i][1], 3) for i, (name, t) in enumerate(marks[1:])},
        "frames_per_second": round(n_rows / wall, 1) if wall > 0 else None,
        "frames_per_second_per_core": round(n_rows / wall / n, 1) if wall > 0 else None,
        "peak_rss_mb_driver": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    })
    write_json(out_dir / "metrics.json", metrics)
    if clips is not None:
        log.info("invert: %d clips (%d listed by extract)", summary_n, clips.num_rows)
    log.info("invert: %d frames, %d events in %.1f s; gates %s", n_rows, n_events, wall, metrics["gates"])
    if cfg.fail_on_gates and not all(g["passed"] for g in metrics["gates"].values()):
        raise RuntimeError(f"quality gates failed: {metrics['gates']}")
    return metrics


CORR_COLUMNS = ("fit_corr", "loco_corr", "loio_corr")


def _invert(good: Any, fit: FaceModelFit, cfg: InvertConfig) -> Any:
    """1:1 clip -> controls, residuals, events, correlation sums              (actor per core)"""
    return good.map(
        InvertClip,
        fn_constructor_kwargs={"fit": fit, "settings": cfg.inversion, "events": cfg.events,
                               "flame_model": cfg.flame_model, "flame_ridge": cfg.flame_ridge},
        compute=ActorPoolStrategy(size=cfg.num_workers), num_cpus=ACTOR_CPUS,
    ).materialize()


def _quality(fit: FaceModelFit, summaries: list[dict[str, Any]], cfg: InvertConfig, prior_info: dict) -> dict:
    return quality_report(
        fit, *(_corr_total(summaries, k) for k in CORR_COLUMNS),
        sum(r["err_sum"] for r in summaries), sum(r["err_n"] for r in summaries), cfg, prior_info,
    )


def fit_generic(cfg: InvertConfig, frames_dirs: list[str], out: str) -> dict:
    """The generic face model from one or more extract folders (every identity they hold; no
    prior), written to ``out`` with its own leave-one-identity-out quality in generic.json.

    Identities come from curate's manifest (``identity`` column): label every person, and give a
    person the same label in every video, or LOIO leaks. Refit on a large dataset with
    ``cogportrait face fit-generic --frames data/extract --out my_generic`` and point
    ``invert.generic_model`` at the folder.
    """
    t_start = time.perf_counter()
    dirs = [Path(d).resolve() for d in frames_dirs]
    if not dirs:
        raise ConfigError("fit-generic needs at least one --frames folder")
    start_ray(cfg.num_workers, LARGE_BLOCKS, preserve_order=True)
    prep = _prepare(dirs, cfg)
    # only clips with a stated identity: an unlabelled clip may repeat a labelled person, and a
    # dataset could then not drop that person from the prior
    stated = set(loio_identities(prep.identity_of)[0]) if loio_identities(prep.identity_of)[1] else set()
    if not stated:
        raise ConfigError(f"no clip in {', '.join(map(str, dirs))} has a stated identity; label the people in the "
                          "manifest's identity column (one label per person across videos)")
    unlabelled = sorted(c for c, i in prep.identity_of.items() if i not in stated)
    rest = {i: r for i, r in prep.rest.items() if i in stated}
    moments = {c: m for c, m in prep.moments.items() if prep.identity_of[c] in stated}
    fit = fit_face_model(rest, moments, prep.identity_of, cfg.ridge, {"frames_dirs": [str(d) for d in dirs]},
                         symmetric=cfg.symmetric)
    good = prep.good.filter(expr=col("identity").is_in(sorted(stated))) if unlabelled else prep.good
    summaries = _invert(good, fit, cfg).select_columns(["clip_id", *CORR_COLUMNS, "err_sum", "err_n"]).take_all()
    quality = _quality(fit, summaries, cfg, {"used": False})
    identity_of = {c: prep.identity_of[c] for c in fit.stats}
    videos: dict[str, set[str]] = defaultdict(set)
    for d in dirs:
        clips = _clip_info(d)[1]
        for r in ([] if clips is None else clips.select(["clip_id", "video_id"]).to_pylist()):
            if r["clip_id"] in identity_of:
                videos[identity_of[r["clip_id"]]].add(r["video_id"])
    meta = {
        "fitting_set": {"frames_dirs": [str(d) for d in dirs], "clips": len(fit.stats), "identities": len(fit.baselines),
                        "frames": int(sum(s.n for s in fit.stats.values())), "rejected_clips": prep.no_rest,
                        "unlabelled_clips_left_out": unlabelled,
                        "videos_by_identity": {i: sorted(v) for i, v in sorted(videos.items())}},
        "ridge": cfg.ridge, "symmetric": cfg.symmetric, "pose_refine": cfg.pose_refine,
        "smooth_frames": cfg.smooth_frames, "fit_smooth_frames": cfg.fit_smooth_frames, "command": "cogportrait face fit-generic " + " ".join(f"--frames {d}" for d in frames_dirs) + f" --out {out}",
        "quality": {k: quality[k] for k in ("gates", "r2_by_group", "corr_inverted_vs_proxy_loio", "loio")},
    }
    generic = generic_from_fit(fit, identity_of, meta)
    out_dir = Path(out)
    with atomic_dir(out_dir) as tmp:
        digest = generic.save(tmp)
    log.info("fit-generic: %d identities, %d clips -> %s (sha256 %s); gates %s", len(fit.baselines), len(fit.stats), out_dir,
             digest, quality["gates"])
    return {"out": str(out_dir), "content_sha256": digest, "wall_seconds": round(time.perf_counter() - t_start, 3), **meta}


def _corr_total(summaries: list[dict[str, Any]], key: str) -> CorrSums | None:
    total = None
    for r in summaries:
        s = CorrSums.from_array(np.asarray(r[key], dtype=np.float64))
        total = s if total is None else total + s
    return total


def _clip_rows(files: list[Path], clip_info: dict[str, tuple[str, bool]]) -> list[dict]:
    """One row per clip in the frames files, with the row groups that hold only that clip.

    Row groups come from the Parquet statistics of clip_id (min == max); a clip that shares a
    row group with another (files not written by extract) is read with a filter instead.
    """
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    mixed: set[tuple[str, str]] = set()
    for f in files:
        meta = pq.ParquetFile(f).metadata
        col = meta.schema.names.index("clip_id")
        for i in range(meta.num_row_groups):
            st = meta.row_group(i).column(col).statistics
            if st is not None and st.has_min_max and st.min == st.max:
                groups[(str(f), st.min)].append(i)
            else:
                for cid in pq.ParquetFile(f).read_row_group(i, columns=["clip_id"]).column("clip_id").unique().to_pylist():
                    mixed.add((str(f), cid))
    keys = list(dict.fromkeys([*groups, *sorted(mixed)]))
    seen: dict[str, str] = {}
    rows = []
    for path, cid in keys:
        if cid in seen:
            if seen[cid] != path:
                raise TableError(f"clip {cid} appears in more than one frames file")
            continue
        seen[cid] = path
        identity, mirrored = clip_info.get(cid, (identity_key(None, cid), False))
        row_groups = [] if (path, cid) in mixed else groups[(path, cid)]
        rows.append({"clip_id": cid, "identity": identity, "mirrored": mirrored, "path": path, "row_groups": row_groups})
    return rows


__all__ = ["InvertClip", "controls_table", "fit_generic", "flame_rows", "generic_prior", "prepare_step", "run"]
