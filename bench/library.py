"""Benchmark the prototype library: build time, memory, query latency, exact vs IVF recall@5, filters.

Prints one JSON document on stdout. Libraries of 1e4, 1e5, 1e6 prototypes are synthesised by
perturbing a seed library (``--seed-library LIB``, e.g. data/library built from the sample clips;
by default the synthetic upstream tables of ``bench/synthetic.py``): each row is a random
seed row's controls resampled to 8 frames plus a per-channel offset (see ``perturb_prototypes``);
keypoints are left empty because no index or query cost depends on them. ``--frames`` and
``--keypoint-frames`` make rows realistic for the fetch measurement (prototypes are 5-100 frames,
~30 on the sample library, with T x 62 x 2 keypoints), e.g. ``--frames 32 --keypoint-frames 32``.
Row groups hold ``--row-group-size`` rows (default: params.yaml's prototypes.row_group_size, what
the pipeline writes; this benchmark used 4096 before the fetch measurement).

Per size it measures: writing the Parquet, building the exact (flat L1) and IVF indexes, opening
(fingerprint check included), resident memory, query latency p50/p99 (wall, and process CPU time)
over random composer-like targets (1-4 channels, values and ranges) for the exact column scan
(search=scan), the default path (search=auto: the sorted walk from walk_min_rows rows, checked
identical to the scan on every query), and the FAISS index the store does not query
(``prototype_store.index.FaissSearch``: flat L1 with the certificate up to 1e5, IVF with its recall@5
against exact and an nprobe curve), and a polars label + channel-range filter over the Parquet.
``--skip-ivf`` leaves IVF out. ``fetch``: latency of ``PrototypeStore.fetch`` of 5 random rows,
their controls only (what the composer asks for: the index's memory-mapped controls sidecar) and
both arrays (keypoints decode their rows' Parquet row groups).

    nice -n 10 .venv/bin/python bench/library.py --sizes 10000 100000 1000000 > bench/out/library.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import psutil
import pyarrow.parquet as pq

from cogportrait.config import IndexConfig, PrototypesConfig
from prototype_store import PrototypeStore, build_index, write_prototypes
from prototype_store.build import build_prototypes_local
from prototype_store.index import FaissSearch, recall_at_k, sample_queries
from synthetic import perturb_prototypes, write_synthetic_upstream

log = logging.getLogger("cogportrait.bench")


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def _store_mb(store: PrototypeStore) -> float:
    """Memory an open store holds: features, scan columns, per-row metadata."""
    arrays = store.features.nbytes + store.scanner.cols64.nbytes + store.scanner.cols32.nbytes
    arrays += store._meta_table.nbytes
    return round(arrays / 2**20, 1)


def _faiss_mb(fs: FaissSearch) -> float:
    """Memory of a loaded FAISS index: its vectors and the weighted features of the re-rank."""
    return round((fs.index.ntotal * fs.index.d * 4 + fs.weighted.nbytes) / 2**20, 1)


def _pct(xs: list[float], cpu: list[float] | None = None) -> dict[str, float]:
    """Wall-clock percentiles, and (``cpu``) the process CPU time per query: less sensitive to
    other jobs on a shared box than wall time (it counts the scan's threads too)."""
    a = np.asarray(xs) * 1e3
    out = {"p50_ms": round(float(np.percentile(a, 50)), 3), "p99_ms": round(float(np.percentile(a, 99)), 3),
           "mean_ms": round(float(a.mean()), 3)}
    if cpu is not None:
        c = np.asarray(cpu) * 1e3
        out.update(cpu_p50_ms=round(float(np.percentile(c, 50)), 3), cpu_p99_ms=round(float(np.percentile(c, 99)), 3))
    return out


def _top5(search, targets) -> np.ndarray:
    """Distances of the top 5 for ``targets`` from a PrototypeStore or a FaissSearch."""
    if isinstance(search, FaissSearch):
        return search.query(targets, 5)[1]
    return np.array([m.distance for m in search.query(targets, k=5, arrays=False)])


def seed_table(seed_library: str | None, work: Path):
    if seed_library:
        return pq.read_table(Path(seed_library) / "prototypes.parquet"), str(seed_library)
    up = write_synthetic_upstream(work / "upstream", n_clips=24, n_frames=200, seed=0)
    build_prototypes_local(PrototypesConfig(controls=str(up["controls"]), clips=str(up["clips"]), out=str(work / "seed")))
    return pq.read_table(work / "seed" / "prototypes.parquet"), "synthetic upstream (bench/synthetic.py)"


def fetch_latency(store: PrototypeStore, reps: int, seed: int = 0) -> dict:
    """p50/p99 of fetching 5 random rows, controls only and both arrays (the composer's k = 5)."""
    rng = np.random.default_rng(seed)
    out: dict = {"k": 5, "reps": reps, "controls_sidecar": store._controls is not None}
    for name, arrays in (("controls", "controls"), ("arrays", True)):
        lat, cpu = [], []
        for _ in range(reps):
            positions = rng.integers(0, store.n, 5)
            c, t = time.process_time(), time.perf_counter()
            store.fetch(positions, arrays=arrays)
            lat.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        out[name] = _pct(lat, cpu)
    return out


def bench_size(n: int, source, work: Path, n_queries: int, recall_queries: int, skip_ivf: bool = False,
               frames: int = 8, keypoint_frames: int = 0, row_group_size: int | None = None) -> dict:
    row_group_size = row_group_size or PrototypesConfig().row_group_size
    out: dict = {"n": n, "frames": frames, "keypoint_frames": keypoint_frames, "row_group_size": row_group_size}
    lib = work / f"lib_{n}"
    if lib.exists():
        shutil.rmtree(lib)
    t = time.perf_counter()
    table = perturb_prototypes(source, n, seed=n, frames=frames, keypoint_frames=keypoint_frames)
    out["synthesise_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    write_prototypes(lib / "prototypes.parquet", table, row_group_size=row_group_size)
    out["write_parquet_s"] = round(time.perf_counter() - t, 3)
    out["parquet_mb"] = round((lib / "prototypes.parquet").stat().st_size / 2**20, 2)
    del table
    labels = pl.scan_parquet(lib / "prototypes.parquet").select(pl.col("label").unique()).collect()["label"].to_list()

    def measure(search, queries: list, with_label: bool = True) -> dict:
        """Latency of ``search`` (a PrototypeStore, or a FaissSearch: no label filter there)."""
        lat, cpu, lat_label = [], [], []
        for q in queries:
            c, t = time.process_time(), time.perf_counter()
            _top5(search, q)
            lat.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
        entry = {"query": _pct(lat, cpu)}
        if with_label:
            cpu_label = []
            for i, q in enumerate(queries[: max(20, len(queries) // 3)]):
                c, t = time.process_time(), time.perf_counter()
                search.query(q, k=5, label=labels[i % len(labels)], arrays=False)
                lat_label.append(time.perf_counter() - t)
                cpu_label.append(time.process_time() - c)
            entry["query_with_label_filter"] = _pct(lat_label, cpu_label)
        return entry

    def recall(search, queries: list, truth: list) -> float:
        return round(recall_at_k(truth, [_top5(search, q) for q in queries]), 4)

    results: dict = {}
    # exact: flat L1 index on disk; queries answered by the exact column scan (search=scan), and
    # for comparison by the FAISS flat index with the certificate (search=index, up to 1e5)
    rss0 = _rss_mb()
    t = time.perf_counter()
    meta = build_index(lib, IndexConfig(ivf_threshold=10**9))
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    store = PrototypeStore.open(lib, search="scan")
    open_s = time.perf_counter() - t
    queries = sample_queries(store.features, n_queries, seed=12345)
    truth = [_top5(store, q) for q in queries[:recall_queries]]
    entry = {"index_kind": meta["kind"], "build_index_s": round(build_s, 3), "open_s": round(open_s, 3),
             "index_mb": round(sum(f.stat().st_size for f in (lib / "index").iterdir()) / 2**20, 2),
             "rss_store_mb": round(_rss_mb() - rss0, 1), "store_arrays_mb": _store_mb(store),
             "controls_sidecar_mb": round(sum((lib / "index" / meta["controls_sidecar"][k]).stat().st_size
                                              for k in ("values", "offsets")) / 2**20, 2)}
    entry["scan"] = measure(store, queries)
    t = time.perf_counter()
    store.query(queries[0], k=5, arrays=True)
    entry["query_with_arrays_ms"] = round((time.perf_counter() - t) * 1e3, 3)
    # the default path (search=auto): the sorted walk (walk.py) from walk_min_rows rows
    rss1 = _rss_mb()
    t = time.perf_counter()
    auto = PrototypeStore.open(lib)
    entry["auto_open_s"] = round(time.perf_counter() - t, 3)
    entry["auto_sorted_orders_mb"] = round(auto._walker.nbytes / 2**20, 1) if auto._walker is not None else 0.0
    entry["auto_rss_extra_mb"] = round(_rss_mb() - rss1, 1)
    entry["auto"] = measure(auto, queries)
    entry["fetch"] = fetch_latency(auto, max(n_queries, 100))
    # the two paths again, alternating query by query, so that both see the same load of a shared box
    pair: dict[str, list[list[float]]] = {"scan": [[], []], "auto": [[], []]}
    for i, q in enumerate(queries):
        for name in (("scan", "auto") if i % 2 else ("auto", "scan")):
            st = store if name == "scan" else auto
            c, t = time.process_time(), time.perf_counter()
            st.query(q, k=5, arrays=False)
            pair[name][0].append(time.perf_counter() - t)
            pair[name][1].append(time.process_time() - c)
    entry["interleaved"] = {name: _pct(*v) for name, v in pair.items()}
    same = sum(
        [(m.prototype_id, m.distance) for m in auto.query(q, k=5, arrays=False)]
        == [(m.prototype_id, m.distance) for m in store.query(q, k=5, arrays=False)]
        for q in queries
    )
    entry["auto_identical_to_scan"] = f"{same}/{len(queries)}"
    auto.close()
    store.close()
    if n <= 100_000:
        entry["faiss_flat_certified"] = measure(FaissSearch.open(lib), queries[: max(30, n_queries // 5)], with_label=False)
    results["exact"] = entry
    del store
    if skip_ivf:
        out.update(results)
        return out | {"polars_label_range_filter": _polars_filter(lib, labels)}

    rss0 = _rss_mb()
    t = time.perf_counter()
    meta = build_index(lib, IndexConfig(ivf_threshold=1, recall_queries=min(recall_queries, 100)))
    build_s = time.perf_counter() - t
    ivf = FaissSearch.open(lib)
    entry = {"index_kind": meta["kind"], "nlist": meta["nlist"], "nprobe_tuned": meta["nprobe"],
             "recall_at_5_measured_at_build": meta["recall_at_5"], "build_index_s": round(build_s, 3),
             "index_mb": round(sum(f.stat().st_size for f in (lib / "index").iterdir()) / 2**20, 2),
             "rss_index_mb": round(_rss_mb() - rss0, 1), "index_arrays_mb": _faiss_mb(ivf)}
    entry.update(measure(ivf, queries, with_label=False))
    entry["recall_at_5"] = recall(ivf, queries[:recall_queries], truth)
    curve = []
    for probe in sorted({1, 4, 16, 64, meta["nprobe"]}):
        if probe > meta["nlist"]:
            continue
        ivf.nprobe = probe
        m = measure(ivf, queries[: max(50, n_queries // 3)], with_label=False)
        curve.append({"nprobe": probe, **m["query"], "recall_at_5": recall(ivf, queries[:recall_queries], truth)})
    entry["nprobe_curve"] = curve
    results["ivf"] = entry
    out.update(results)

    out["polars_label_range_filter"] = _polars_filter(lib, labels)
    return out


def _polars_filter(lib: Path, labels: list[str]) -> dict:
    """polars: label + channel-range filter straight on the Parquet (the README's example)."""
    times = []
    for i in range(10):
        t = time.perf_counter()
        df = (
            pl.scan_parquet(lib / "prototypes.parquet")
            .filter((pl.col("label") == labels[i % len(labels)]) & (pl.col("peak_AU45L") >= 0.6)
                    & (pl.col("T") >= 5))
            .select("prototype_id", "event_type", "T")
            .collect()
        )
        times.append(time.perf_counter() - t)
    return {**_pct(times), "rows": df.height}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--recall-queries", type=int, default=200)
    ap.add_argument("--seed-library", help="library folder whose prototypes seed the perturbation")
    ap.add_argument("--work", help="scratch folder (default: a temp dir, removed afterwards)")
    ap.add_argument("--skip-ivf", action="store_true", help="exact paths only (IVF build and nprobe curve take minutes at 1e6)")
    ap.add_argument("--frames", type=int, default=8, help="frames per synthesised prototype")
    ap.add_argument("--keypoint-frames", type=int, default=0, help="keypoint frames per prototype (0: empty)")
    ap.add_argument("--row-group-size", type=int, default=PrototypesConfig().row_group_size,
                    help="rows per Parquet row group (default: params.yaml's prototypes.row_group_size)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="cogportrait-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        source, seed_desc = seed_table(args.seed_library, work)
        report = {
            "benchmark": "prototype library",
            "machine": {"cpus": os.cpu_count(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
                        "platform": platform.platform(), "python": platform.python_version(),
                        "processor": platform.processor() or platform.machine()},
            "seed": {"library": seed_desc, "prototypes": source.num_rows},
            "sizes": [],
        }
        for n in args.sizes:
            log.info("size %d", n)
            report["sizes"].append(bench_size(n, source, work, args.queries, args.recall_queries, args.skip_ivf,
                                              args.frames, args.keypoint_frames, args.row_group_size))
        report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
