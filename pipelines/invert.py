"""invert: per-frame face signals -> 17-channel controls, face model, behaviour events.

    clips ─prepare (1:1 clip → signals; reads its own frames)─▶ rest frames + moments ─▶ driver:
                                                                  baselines, ridge fit, LOCO
          ─invert (1:1, model held by the actor)─┬─ controls rows (1:N) ─▶ controls.parquet
                                                 ├─ events ─────────────▶ events.parquet
                                                 └─ FLAME fits (optional, 1:N) ─▶ flame_fits.parquet

extract writes each clip's frames contiguously (row groups never mix clips), so a clip's task
reads just its own rows with a predicate on clip_id: no shuffle. A clip then travels as one row
(its arrays packed as npz bytes). The face model is fitted over the whole dataset in the driver
from per-clip moments (tiny matrices) that give the ridge statistics for any baseline, which also
makes exact leave-one-clip-out (LOCO) fits cheap for the quality metrics.

Run: ``cogportrait invert --frames data/extract --out data/invert``.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from tqdm import tqdm
from pipelines._ray import LARGE_BLOCKS, start_ray
from ray.data import ActorPoolStrategy, TaskPoolStrategy

from cogportrait.behavior.events import detect_events, event_rows
from cogportrait.config import EventsConfig, InvertConfig
from cogportrait.face.extract import frames_files
from cogportrait.face.flame import FlameFitter, FlameModel
from cogportrait.face.inversion import InversionSettings
from cogportrait.face.library import (
    PROXY_COMPARED,
    ClipStats,
    CorrSums,
    RestData,
    RestSettings,
    baseline_from_rest,
    clip_moments,
    inverted_matrix,
    invert_signals,
    loco_bases,
    pack_arrays,
    pack_signals,
    prepare_frames,
    proxy_matrix,
    r2_by_group,
    refine_baseline,
    rest_frames,
    unpack_arrays,
    unpack_signals,
)
from cogportrait.face.model import FIT_AUS, MOMENT_FIELDS, Baseline, ClipMoments, LinearFaceModel
from cogportrait.io.atomic import AtomicParquetWriter, atomic_dir, write_json, write_table
from cogportrait.schema import (
    CLIPS_SCHEMA,
    CONTROLS_SCHEMA,
    EVENTS_SCHEMA,
    FLAME_FITS_SCHEMA,
    N_CHANNELS,
    REJECTS_SCHEMA,
    check_reason,
)

log = logging.getLogger("cogportrait.invert")

LIGHT_CPUS = 0.25
# The actor pool has exactly num_workers actors, so a fraction never oversubscribes the cores,
# and it leaves CPUs free for the tasks downstream while the pool is still alive (a 1-CPU
# cluster whose only CPU is held by an idle actor would hang the next step).
ACTOR_CPUS = 0.5
FRAME_COLUMNS = ["clip_id", "frame", "face_present", "landmarks", "transform", "au", "gaze", "head_pose", "width", "height"]


def prepare_step(row: dict, refine: str, rest: RestSettings) -> dict:
    """1:1 — one clip's frames -> packed signals, its rest frames and its raw moments."""
    if row["row_groups"]:  # the clip's own row groups (extract writes one per clip)
        table = pq.ParquetFile(row["path"]).read_row_groups(row["row_groups"], columns=FRAME_COLUMNS)
        table = table.filter(pc.equal(table.column("clip_id"), row["clip_id"]))
    else:
        table = pq.read_table(row["path"], columns=FRAME_COLUMNS, filters=[("clip_id", "==", row["clip_id"])])
    sig = prepare_frames(table, row["identity"], row["mirrored"], refine=refine)
    idx = rest_frames(sig, rest)
    mom = clip_moments(sig)
    return {
        "clip_id": row["clip_id"],
        "identity": row["identity"],
        "signals": pack_signals(sig),
        "rest": pack_arrays(RestData.of(sig, idx).arrays()),
        "n_rest": len(idx),
        "moments": pack_arrays({f: np.asarray(getattr(mom, f)) for f in MOMENT_FIELDS}),
    }


def _sig(row: dict):
    return unpack_signals(row["clip_id"], row["identity"], row["signals"])


class InvertClip:
    """1:1 — controls, residual error and events of one clip (model + baselines held once)."""

    def __init__(self, model: LinearFaceModel, baselines: dict[str, Baseline], loco: dict[str, tuple[np.ndarray, Baseline]],
                 settings: InversionSettings, events: EventsConfig, flame_model: str = "", flame_ridge: float = 1e-3) -> None:
        self.model, self.baselines, self.loco, self.settings, self.events = model, baselines, loco, settings, events
        self.flame = FlameFitter(FlameModel.load(flame_model), ridge=flame_ridge) if flame_model else None

    def __call__(self, row: dict) -> dict:
        sig = _sig(row)
        base = self.baselines[row["identity"]]
        controls, err = invert_signals(sig, self.model, base, self.settings)
        prox = proxy_matrix(sig)
        fit_corr = CorrSums.of(inverted_matrix(controls), prox)
        loco = self.loco.get(row["clip_id"])
        if loco is not None and np.all(np.isfinite(loco[0])):
            loco_controls, _ = invert_signals(sig, LinearFaceModel(loco[0], self.model.ridge), loco[1], self.settings)
            loco_corr = CorrSums.of(inverted_matrix(loco_controls), prox)
        else:
            loco_corr = CorrSums.of(np.full_like(prox, np.nan), prox)
        aperture = np.stack([sig.lid["aperture_left"], sig.lid["aperture_right"]], axis=1)
        events = event_rows(row["clip_id"], sig.frame, detect_events(controls, aperture, sig.present, self.events))
        result = {"frame": sig.frame, "present": sig.present, "controls": controls.astype(np.float32), "err": err.astype(np.float32)}
        if self.flame is not None:
            result.update(_flame_arrays(self.flame, sig))
        return {
            "clip_id": row["clip_id"],
            "result": pack_arrays(result),
            "fit_corr": fit_corr.as_array().ravel().tolist(),
            "loco_corr": loco_corr.as_array().ravel().tolist(),
            "events": events,
            "err_sum": float(np.nansum(err)),
            "err_n": int(np.isfinite(err).sum()),
        }


def _flame_arrays(fitter: FlameFitter, sig) -> dict[str, np.ndarray]:
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
    a = unpack_arrays(row["result"])
    out = []
    for i, f in enumerate(a["frame"]):
        ok = bool(np.isfinite(a["flame_res"][i]))
        out.append({"clip_id": row["clip_id"], "frame": int(f),
                    "expression": a["flame_expr"][i].tolist() if ok else None,
                    "eye_pose": a["flame_eye"][i].tolist() if ok else None,
                    "residual": float(a["flame_res"][i]) if ok else None})
    return out


def controls_table(batch: pa.Table) -> pa.Table:
    """1:N — clip results -> CONTROLS_SCHEMA rows, built column-wise (null where no face)."""
    parts = []
    for cid, blob in zip(batch.column("clip_id").to_pylist(), batch.column("result").to_pylist()):
        a = unpack_arrays(blob)
        t = len(a["frame"])
        ok = a["present"].astype(bool) & np.isfinite(a["err"])
        parts.append(pa.table({
            "clip_id": pa.array([cid] * t, pa.string()),
            "frame": pa.array(a["frame"].astype(np.int32)),
            "face_present": pa.array(a["present"].astype(bool)),
            "controls": pa.FixedSizeListArray.from_arrays(pa.array(a["controls"].astype(np.float32).ravel()), N_CHANNELS,
                                                          mask=pa.array(~ok)),
            "residual_error": pa.array(a["err"].astype(np.float32), mask=~ok),
        }))
    return pa.concat_tables(parts).cast(CONTROLS_SCHEMA) if parts else CONTROLS_SCHEMA.empty_table()


def _clip_info(frames_dir: Path) -> tuple[dict[str, tuple[str, bool]], pa.Table | None]:
    """clip_id -> (identity key, mirrored) from extract's clips.parquet; unknown identity = per clip."""
    path = frames_dir / "clips.parquet"
    if not path.exists():
        return {}, None
    clips = pq.read_table(path, schema=CLIPS_SCHEMA)
    info = {}
    for r in clips.select(["clip_id", "identity", "mirrored"]).to_pylist():
        ident = r["identity"]
        if not ident or ident == "unknown":
            ident = f"clip:{r['clip_id']}"
        info[r["clip_id"]] = (ident, bool(r["mirrored"]))
    return info, clips


def run(cfg: InvertConfig, events_cfg: EventsConfig | None = None) -> dict:
    """Run the job; returns the metrics also written to ``metrics.json``."""
    t_start = time.perf_counter()
    events_cfg = events_cfg or EventsConfig()
    frames_dir = Path(cfg.frames).resolve()
    out_dir = Path(cfg.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    files = frames_files(frames_dir)
    if not files:
        raise FileNotFoundError(f"no frames-*.parquet or frames.parquet in {frames_dir}; run extract first")
    clip_info, clips = _clip_info(frames_dir)
    settings = InversionSettings(
        z_weight=cfg.z_weight, iterations=cfg.solver_iterations, blink_au45_delta=cfg.blink_au45_delta,
        au41_smooth_frames=cfg.au41_smooth_frames, au41_deadzone=cfg.au41_deadzone,
    )
    rest = RestSettings(cfg.rest_quantile, cfg.rest_max_angle_deg, cfg.rest_min_frames, cfg.rest_max_frames_per_clip)

    start_ray(cfg.num_workers, LARGE_BLOCKS)
    n = cfg.num_workers
    clip_rows = _clip_rows(files, clip_info)
    if not clip_rows:
        raise ValueError(f"no clip in {frames_dir}")
    marks = [("start", time.perf_counter())]
    # a few clips per task: a clip is ~10 ms of work, a Ray task ~100 ms of overhead here
    n_blocks = min(len(clip_rows), max(2 * n, -(-len(clip_rows) // cfg.clips_per_task)))
    ds = ray.data.from_items(clip_rows, override_num_blocks=n_blocks)
    # 1:1 clip -> signals, rest frames, moments; reads the clip's rows, pose removal  (1 CPU)
    clips_ds = ds.map(prepare_step, fn_kwargs={"refine": cfg.pose_refine, "rest": rest}, num_cpus=1,
                      compute=TaskPoolStrategy(size=n)).materialize()
    n_clips = clips_ds.count()
    summary = clips_ds.select_columns(["clip_id", "identity", "rest", "n_rest", "moments"]).take_all()

    marks.append(("prepare", time.perf_counter()))
    by_identity: dict[str, list[RestData]] = defaultdict(list)
    for r in summary:
        if r["n_rest"]:
            by_identity[r["identity"]].append(RestData(**unpack_arrays(r["rest"])))
    rest_data = {ident: RestData.concat(parts) for ident, parts in by_identity.items()}
    first = {ident: baseline_from_rest(ident, rest) for ident, rest in rest_data.items()}
    no_rest = sorted({r["clip_id"] for r in summary if r["identity"] not in first})
    good = clips_ds.filter(lambda r: r["identity"] in first) if no_rest else clips_ds
    identity_of = {r["clip_id"]: r["identity"] for r in summary}
    moments = {r["clip_id"]: _moments(unpack_arrays(r["moments"])) for r in summary if r["identity"] in first}

    # fit, re-centre each baseline under the basis (no offset at rest), refit
    stats0 = {c: m.stats(first[identity_of[c]]) for c, m in moments.items()}
    model0 = LinearFaceModel.fit(_sum(stats0.values()), cfg.ridge)
    baselines = {i: refine_baseline(b, rest_data[i], model0.basis) for i, b in first.items()}
    stats = {c: m.stats(baselines[identity_of[c]]) for c, m in moments.items()}
    total = _sum(stats.values())
    meta = {"clips": len(stats), "frames": int(total.n), "identities": len(baselines), "frames_dir": str(frames_dir)}
    model = LinearFaceModel.fit(total, cfg.ridge, meta)
    # leave-one-clip-out: basis without the clip; the clip's identity baseline re-centred under it
    loco: dict[str, tuple[np.ndarray, Baseline]] = {}
    loco_stats: dict[str, ClipStats] = {}
    if len(stats) >= 2:
        for cid, basis in loco_bases(stats, cfg.ridge).items():
            ident = identity_of[cid]
            b = refine_baseline(baselines[ident], rest_data[ident], basis) if np.all(np.isfinite(basis)) else baselines[ident]
            loco[cid] = (basis, b)
            loco_stats[cid] = moments[cid].stats(b)

    marks.append(("fit", time.perf_counter()))
    # 1:1 clip -> controls, residuals, events, correlation sums              (actor per core)
    results = good.map(
        InvertClip,
        fn_constructor_kwargs={"model": model, "baselines": baselines, "loco": loco, "settings": settings, "events": events_cfg,
                               "flame_model": cfg.flame_model, "flame_ridge": cfg.flame_ridge},
        compute=ActorPoolStrategy(size=n), num_cpus=ACTOR_CPUS,
    ).materialize()

    marks.append(("invert", time.perf_counter()))
    n_rows = 0
    with AtomicParquetWriter(out_dir / "controls.parquet", CONTROLS_SCHEMA) as writer:
        # 1:N clip -> its controls rows, column-wise                              (light CPU)
        tables = results.select_columns(["clip_id", "result"]).map_batches(
            controls_table, batch_format="pyarrow", num_cpus=LIGHT_CPUS, compute=TaskPoolStrategy(size=n)
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
    summaries = results.select_columns(["clip_id", "fit_corr", "loco_corr", "events", "err_sum", "err_n"]).take_all()
    event_list = [e for r in summaries for e in r["events"]]
    n_events = write_table(out_dir / "events.parquet", event_list, EVENTS_SCHEMA)
    with atomic_dir(out_dir / "face_model") as tmp:
        model.save(tmp, baselines)

    reject_rows = []
    for cid in no_rest:
        check_reason("invert", "no_face")
        reject_rows.append({"video_id": cid, "stage": "invert", "reason": "no_face", "detail": "no frame with a usable face"})
    write_table(out_dir / "rejects.parquet", reject_rows, REJECTS_SCHEMA)

    marks.append(("write", time.perf_counter()))
    metrics = _metrics(cfg, stats, model, loco, loco_stats, summaries, baselines)
    wall = time.perf_counter() - t_start
    metrics.update({
        "clips": n_clips - len(no_rest), "rejects": len(no_rest), "frames": n_rows, "events": n_events,
        "events_by_type": dict(Counter(e["event_type"] for e in event_list)),
        "wall_seconds": round(wall, 3), "workers": n,
        "step_seconds": {name: round(t - marks[i][1], 3) for i, (name, t) in enumerate(marks[1:])},
        "frames_per_second": round(n_rows / wall, 1) if wall > 0 else None,
        "frames_per_second_per_core": round(n_rows / wall / n, 1) if wall > 0 else None,
        "peak_rss_mb_driver": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    })
    write_json(out_dir / "metrics.json", metrics)
    if clips is not None:
        log.info("invert: %d clips (%d listed by extract)", n_clips, clips.num_rows)
    log.info("invert: %d frames, %d events in %.1f s; gates %s", n_rows, n_events, wall, metrics["gates"])
    if cfg.fail_on_gates and not all(g["passed"] for g in metrics["gates"].values()):
        raise RuntimeError(f"quality gates failed: {metrics['gates']}")
    return metrics


def _sum(items) -> ClipStats:
    total = ClipStats.zero()
    for s in items:
        total = total + s
    return total


def _delta(new: dict[str, Baseline], old: dict[str, Baseline], ident: str) -> np.ndarray:
    return (new[ident].keypoints - old[ident].keypoints).reshape(-1)


def _moments(a: dict[str, np.ndarray]) -> ClipMoments:
    return ClipMoments(int(a["n"]), a["zz"], a["zk"], a["z"], a["k"], a["kk"])


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
                raise ValueError(f"clip {cid} appears in more than one frames file")
            continue
        seen[cid] = path
        identity, mirrored = clip_info.get(cid, (f"clip:{cid}", False))
        row_groups = [] if (path, cid) in mixed else groups[(path, cid)]
        rows.append({"clip_id": cid, "identity": identity, "mirrored": mirrored, "path": path, "row_groups": row_groups})
    return rows


def _metrics(cfg: InvertConfig, stats, model, loco, loco_stats, summaries, baselines) -> dict:
    def corr_of(key: str) -> dict[str, float]:
        total = None
        for r in summaries:
            s = CorrSums.from_array(np.asarray(r[key], dtype=np.float64).reshape(6, -1))
            total = s if total is None else total + s
        if total is None:
            return {}
        return {name: _round(v) for name, v in zip(PROXY_COMPARED, total.r())}

    r2_fit = r2_by_group(stats, {c: model.basis for c in stats})
    loco_bases_ = {c: v[0] for c, v in loco.items()}
    r2_loco = r2_by_group(loco_stats, loco_bases_) if loco else {}
    r2_fit_xy = r2_by_group(stats, {c: model.basis for c in stats}, planar=True)
    r2_loco_xy = r2_by_group(loco_stats, loco_bases_, planar=True) if loco else {}
    fit_corr, loco_corr = corr_of("fit_corr"), corr_of("loco_corr")
    err_n = sum(r["err_n"] for r in summaries)
    gates = {
        "loco_r2_overall": _gate(r2_loco_xy.get("overall"), cfg.gate_loco_r2_overall),
        "loco_r2_iris": _gate(r2_loco_xy.get("iris"), cfg.gate_loco_r2_iris),
    }
    for ch in ("AU1", "AU2L", "AU2R", "AU45L", "AU45R", "gaze_horizontal"):
        gates[f"loco_corr_{ch}"] = _gate(loco_corr.get(ch), cfg.gate_loco_corr)
    return {
        "face_model": {"version": model.version, "regressors": len(model.basis), "ridge": cfg.ridge, "identities": len(baselines)},
        "r2_by_group": {
            "in_sample_xy": _rounded(r2_fit_xy), "loco_xy": _rounded(r2_loco_xy),
            "in_sample_xyz": _rounded(r2_fit), "loco_xyz": _rounded(r2_loco),
            "note": "xy: in-plane coordinates (what Stage 2 renders; gates use these); xyz adds MediaPipe's relative depth",
        },
        "r2_per_au_in_sample": {k: _round(v * v) if v is not None else None for k, v in fit_corr.items() if k in FIT_AUS},
        "corr_inverted_vs_proxy_in_sample": fit_corr,
        "corr_inverted_vs_proxy_loco": loco_corr,
        "mean_residual_error_iod": _round(sum(r["err_sum"] for r in summaries) / err_n) if err_n else None,
        "gates": gates,
    }


def _round(v) -> float | None:
    return None if v is None or not np.isfinite(v) else round(float(v), 4)


def _rounded(d: dict) -> dict:
    return {k: _round(v) for k, v in d.items()}


def _gate(value, threshold: float) -> dict:
    v = _round(value) if value is not None else None
    return {"value": v, "threshold": threshold, "passed": bool(v is not None and v >= threshold)}


if __name__ == "__main__":
    from cogportrait.cli import main

    raise SystemExit(main(["invert", *os.sys.argv[1:]]))


__all__ = ["InvertClip", "controls_table", "flame_rows", "prepare_step", "run"]
