"""The prototype library: Parquet on disk, a FAISS index beside it, and ``PrototypeStore.query``.

Layout of a library folder ``LIB``::

    LIB/prototypes.parquet      one row per prototype (PROTOTYPES_SCHEMA), fingerprint in metadata
    LIB/index/faiss.index       FAISS binary index (exact IndexFlat L1, or IVFFlat L1 when large)
    LIB/index/meta.json         fingerprint, weights, kind, nprobe, measured recall, build time

How a query stays exact (see ``retrieval.py`` for D):
* Masking. Eq. 3 gives channels a target leaves out weight 0, but a FAISS index has fixed weights.
  The index therefore stores u = [v - c, -(v - c)] (v: weighted features, c: per-feature centre).
  For a targeted feature the query holds (m - c, -(m - c)) and the L1 term is 2|v - m| (m: interval
  midpoint); for an omitted feature it holds (B, B) with B >= |v - c| for every row, and the term is
  the constant 2B. So FAISS ranks by L(p) = sum over targeted features of |v - m|, exactly.
* Intervals. D(p) = sum max(0, |v - m| - h) with h the half-widths, so L(p) - H <= D(p) <= L(p)
  where H = sum h. Candidates come back in L order; after the re-rank by (D, L, id) the k-th result
  is certified when no unfetched row can beat it (every unfetched row has L >= L_last, hence
  D >= L_last - H). Otherwise the exact index fetches more (x4) and finally scans.
* Filters. Metadata filters run in polars over the Parquet (predicate push-down; the file is
  sorted by label so other labels' row groups are skipped) and give the allowed row positions;
  FAISS searches only those (an ``IDSelectorBitmap``), the scan reads only those.
* Walk and scan. ``search="auto"`` answers exactly up to ``exact_scan_max`` rows: from
  ``walk_min_rows`` rows by walking per-feature sorted orders (``walk.py``: a seed bounds the k-th
  result, the smallest sorted window of a targeted feature holds every row that can beat it,
  windows are intersected and pruned; bit-identical to the scan), handing dense targets and
  filters keeping under half the rows to a column scan of the targeted features (``scan.py``),
  which also answers smaller libraries: for 1-4 targeted channels both beat any full-vector
  index (bench/RESULTS.md).
  ``search="walk"`` / ``"scan"`` force one of them. ``search="index"`` uses FAISS: the flat index
  is exact by the certificate; IVF is approximate, nprobe tuned at build time to a recall@5 target
  (stored in meta.json), and for a filtered subset nprobe grows with 1 / selectivity.
* Staleness. meta.json holds the Parquet's content fingerprint and file stat; opening rehashes a
  rewritten file and refuses an index built for other content.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cogportrait.config import IndexConfig
from cogportrait.io.atomic import atomic_dir, atomic_path, write_json
from cogportrait.schema import (
    CONTROL_CHANNELS,
    EVENT_TYPES,
    N_CHANNELS,
    N_KEYPOINTS,
    PROTOTYPE_WINDOW_EVENT,
    PROTOTYPES_SCHEMA,
)
from prototype_store.scan import ColumnScan
from prototype_store.walk import SortedFeatures
from prototype_store.fingerprint import (
    FINGERPRINT_KEY,
    cached_fingerprint,
    file_stat,
    parquet_fingerprint,
    stored_fingerprint,
    table_fingerprint,
)
from prototype_store.retrieval import (
    N_FEATURES,
    Intervals,
    WeightedQuery,
    feature_weights,
    interval_distance,
    midpoint_l1,
    rank,
    to_intervals,
    weighted_query,
)

log = logging.getLogger("cogportrait.prototype_store")

PARQUET_NAME = "prototypes.parquet"
INDEX_DIR = "index"
INDEX_FILE = "faiss.index"
META_FILE = "meta.json"
INDEX_FORMAT = 1
KNOWN_EVENT_TYPES: tuple[str, ...] = EVENT_TYPES + (PROTOTYPE_WINDOW_EVENT,)
META_COLUMNS = ("prototype_id", "label", "event_type", "clip_id", "video_id", "identity", "start_frame", "end_frame", "T")


class LibraryError(RuntimeError):
    """Base class of the store's user-facing errors."""


class EmptyLibraryError(LibraryError):
    """The library holds no prototypes, so nothing can be indexed or retrieved."""


class StaleIndexError(LibraryError):
    """The index was built for other Parquet content than the file on disk now."""


class MissingIndexError(LibraryError):
    """The library folder has no index yet."""


class UnknownLabelError(LibraryError, KeyError):
    """A filter names a label or event type that the library does not contain."""

    def __str__(self) -> str:
        return str(self.args[0])


# ------------------------------------------------------------------------------------------------
# writing the Parquet
# ------------------------------------------------------------------------------------------------
def library_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(parquet, index folder) for a library folder or its prototypes.parquet."""
    p = Path(path)
    if p.suffix == ".parquet":
        return p, p.parent / INDEX_DIR
    return p / PARQUET_NAME, p / INDEX_DIR


def write_prototypes(path: str | os.PathLike, table: pa.Table, row_group_size: int = 256) -> str:
    """Write prototypes sorted by (label, event type, id), with the content fingerprint in the metadata.

    The sort makes each label a contiguous run of row groups, so a label filter pushed down to
    Parquet skips the other labels' row groups by their min/max statistics; ids make it total.
    """
    table = _with_flat_stats(table).select(PROTOTYPES_SCHEMA.names).cast(PROTOTYPES_SCHEMA)
    if table.num_rows:
        table = table.sort_by([("label", "ascending"), ("event_type", "ascending"), ("prototype_id", "ascending")])
    fingerprint = table_fingerprint([table], PROTOTYPES_SCHEMA.names)
    schema = PROTOTYPES_SCHEMA.with_metadata({FINGERPRINT_KEY: fingerprint.encode()})
    table = table.replace_schema_metadata(schema.metadata)
    with atomic_path(path, ".parquet") as tmp:
        with pq.ParquetWriter(tmp, schema=schema, compression="zstd") as writer:
            writer.write_table(table, row_group_size=row_group_size)
    return fingerprint


def _with_flat_stats(table: pa.Table) -> pa.Table:
    """(Re)derive the flat mean_<channel>/peak_<channel> columns from channel_mean/channel_max."""
    n = table.num_rows
    for stat, source in (("mean", "channel_mean"), ("peak", "channel_max")):
        col = table.column(source).combine_chunks()
        if n and col.null_count == 0:
            values = np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(n, N_CHANNELS)
        else:
            values = np.full((n, N_CHANNELS), np.nan, dtype=np.float32)
        for j, name in enumerate(CONTROL_CHANNELS):
            field_name = f"{stat}_{name}"
            arr = pa.array(values[:, j], type=pa.float32())
            if field_name in table.column_names:
                table = table.set_column(table.column_names.index(field_name), field_name, arr)
            else:
                table = table.append_column(field_name, arr)
    return table


def _read_features(parquet: Path) -> np.ndarray:
    """[channel_mean, channel_max] as an (N, 34) float32 array."""
    t = pq.read_table(parquet, columns=["channel_mean", "channel_max"])
    n = t.num_rows
    out = np.empty((n, N_FEATURES), dtype=np.float32)
    for i, name in enumerate(("channel_mean", "channel_max")):
        col = t.column(name).combine_chunks()
        if col.null_count:
            raise LibraryError(f"{parquet}: {col.null_count} rows have no {name}")
        flat = col.flatten().to_numpy(zero_copy_only=False)
        if flat.size != n * N_CHANNELS:
            raise LibraryError(f"{parquet}: {name} must hold {N_CHANNELS} values per row")
        out[:, i * N_CHANNELS : (i + 1) * N_CHANNELS] = flat.reshape(n, N_CHANNELS)
    if not np.isfinite(out).all():
        bad = int((~np.isfinite(out)).any(axis=1).sum())
        raise LibraryError(f"{parquet}: {bad} prototypes have non-finite channel mean/max")
    return out


# ------------------------------------------------------------------------------------------------
# the index
# ------------------------------------------------------------------------------------------------
@dataclass
class _IndexGeometry:
    fweights: np.ndarray  # (34,)
    centre: np.ndarray  # (34,)
    bound: np.ndarray  # (34,) B >= |v - c| for every row

    def encode(self, weighted: np.ndarray) -> np.ndarray:
        d = weighted - self.centre
        return np.ascontiguousarray(np.concatenate([d, -d], axis=1), dtype=np.float32)

    def query_vector(self, q: WeightedQuery) -> tuple[np.ndarray, float]:
        """The FAISS query for q, and the constant that omitted features add to its distances."""
        m = q.mid - self.centre
        top = np.where(q.mask, m, self.bound)
        bottom = np.where(q.mask, -m, self.bound)
        const = float(2.0 * self.bound[~q.mask].sum())
        return np.concatenate([top, bottom])[None, :].astype(np.float32), const


def _weights_from(cfg: IndexConfig) -> np.ndarray:
    return feature_weights(cfg.weight_au, cfg.weight_gaze, cfg.weight_head, cfg.weight_mean, cfg.weight_peak)


def sample_queries(features: np.ndarray, n: int, seed: int = 0, max_channels: int = 4) -> list[dict[str, Any]]:
    """Random composer-like targets: 1-4 channels near a random prototype, values and ranges mixed.

    Used to tune and measure IVF recall, and by the benchmark and tests.
    """
    rng = np.random.default_rng(seed)
    out: list[dict[str, Any]] = []
    for _ in range(n):
        row = features[rng.integers(len(features))]
        chans = rng.choice(N_CHANNELS, size=int(rng.integers(1, max_channels + 1)), replace=False)
        targets: dict[str, Any] = {}
        for j in chans:
            name = CONTROL_CHANNELS[j]
            scale = 30.0 if name in ("yaw", "pitch", "roll") else 1.0
            centre = float(row[j if rng.random() < 0.5 else N_CHANNELS + j]) + rng.normal(0, 0.05) * scale
            if rng.random() < 0.5:
                targets[name] = round(centre, 4)
            else:
                half = float(rng.uniform(0.02, 0.15)) * scale
                targets[name] = [round(centre - half, 4), round(centre + half, 4)]
        out.append(targets)
    return out


def _exact_top(weighted: np.ndarray, q: WeightedQuery, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions and distances of the k best rows of ``weighted`` (exhaustive)."""
    d = interval_distance(weighted, q)
    order = rank(d, midpoint_l1(weighted, q), ids, k)
    return order, d[order]


def build_index(library: str | os.PathLike, cfg: IndexConfig) -> dict[str, Any]:
    """Index LIB/prototypes.parquet into LIB/index (atomically); returns the meta written."""
    parquet, index_dir = library_paths(library)
    if not parquet.exists():
        raise LibraryError(f"no {parquet}; run `cogportrait library build` (or `dvc repro prototypes`)")
    t0 = time.perf_counter()
    stat = file_stat(parquet)
    fingerprint = parquet_fingerprint(parquet)
    feats = _read_features(parquet)
    n = len(feats)
    if n == 0:
        raise EmptyLibraryError(f"{parquet} holds 0 prototypes: nothing to index (check the upstream stages' outputs)")
    fweights = _weights_from(cfg)
    weighted = feats.astype(np.float64) * fweights
    lo, hi = weighted.min(axis=0), weighted.max(axis=0)
    centre = 0.5 * (lo + hi)
    bound = 0.5 * (hi - lo) * 1.001 + 1e-3
    geo = _IndexGeometry(fweights, centre, bound)
    u = geo.encode(weighted)
    dim = u.shape[1]
    meta: dict[str, Any] = {
        "format": INDEX_FORMAT,
        "fingerprint": fingerprint,
        "parquet_stat": stat,
        "n": n,
        "dim": dim,
        "faiss_version": faiss.__version__,
        "weights": {k: getattr(cfg, k) for k in ("weight_au", "weight_gaze", "weight_head", "weight_mean", "weight_peak")},
        "feature_weights": fweights.tolist(),
        "centre": centre.tolist(),
        "bound": bound.tolist(),
        "config": {f: getattr(cfg, f) for f in cfg.__dataclass_fields__},
    }
    if n < cfg.ivf_threshold:
        index = faiss.IndexFlat(dim, faiss.METRIC_L1)
        index.add(u)
        meta.update(kind="flat_l1", nlist=0, nprobe=0, recall_at_5=1.0)
    else:
        nlist = cfg.nlist or int(min(max(16, round(math.sqrt(n))), n // 8))
        quantizer = faiss.IndexFlat(dim, faiss.METRIC_L1)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_L1)
        rng = np.random.default_rng(cfg.seed)
        train = u[rng.choice(n, size=min(n, max(cfg.train_size, 40 * nlist)), replace=False)]
        index.cp.seed = cfg.seed
        index.train(train)
        index.add(u)
        meta.update(kind="ivf_flat_l1", nlist=nlist)
        nprobe, recall = _tune_nprobe(index, geo, weighted, feats, cfg, nlist)
        meta.update(nprobe=nprobe, recall_at_5=recall)
    meta["build_s"] = round(time.perf_counter() - t0, 3)
    with atomic_dir(index_dir) as tmp:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        write_json(tmp / META_FILE, meta)
    log.info("indexed %d prototypes (%s, recall@5 %.3f) in %.1f s", n, meta["kind"], meta["recall_at_5"], meta["build_s"])
    return meta


def recall_at_k(truth_d: Sequence[np.ndarray], found_d: Sequence[np.ndarray]) -> float:
    """recall@k counting a result as right when its exact distance is within the true top-k's."""
    hits = total = 0
    for d_true, d_found in zip(truth_d, found_d):
        if len(d_true) == 0:
            continue
        kth = d_true[-1] + 1e-9
        hits += int(np.sum(d_found[: len(d_true)] <= kth))
        total += len(d_true)
    return hits / max(total, 1)


def _tune_nprobe(
    index: faiss.IndexIVFFlat, geo: _IndexGeometry, weighted: np.ndarray, feats: np.ndarray, cfg: IndexConfig, nlist: int
) -> tuple[int, float]:
    """Smallest power-of-two nprobe whose measured recall@5 reaches the target (or cfg.nprobe)."""
    queries = [weighted_query(to_intervals(t), geo.fweights) for t in sample_queries(feats, cfg.recall_queries, cfg.seed + 1)]
    ids = np.arange(len(weighted))
    scanner = ColumnScan(weighted, threads=cfg.threads)
    truth = [scanner.topk(q, 5, ids)[1] for q in queries]
    scanner.close()
    candidates = [cfg.nprobe] if cfg.nprobe else [p for p in (2**i for i in range(0, 20)) if p < nlist] + [nlist]
    recall = 0.0
    nprobe = candidates[-1]
    for probe in candidates:
        found = [_ivf_search(index, geo, weighted, q, ids, 5, probe, cfg, None)[1] for q in queries]
        recall = recall_at_k(truth, found)
        log.debug("nprobe %d: recall@5 %.4f", probe, recall)
        if recall >= cfg.recall_target or cfg.nprobe:
            nprobe = probe
            break
    return nprobe, round(recall, 4)


def _ivf_search(
    index: faiss.Index,
    geo: _IndexGeometry,
    weighted: np.ndarray,
    q: WeightedQuery,
    ids: np.ndarray,
    k: int,
    nprobe: int,
    cfg: IndexConfig,
    sel: faiss.IDSelector | None,
) -> tuple[np.ndarray, np.ndarray]:
    """IVF proposes candidates from ``nprobe`` lists; the certified loop re-ranks them exactly.

    Approximate only in which lists are probed: within them the top k is exact.
    """
    params = faiss.SearchParametersIVF(nprobe=int(nprobe), sel=sel) if sel is not None else faiss.SearchParametersIVF(nprobe=int(nprobe))
    return _certified_search(index, geo, weighted, q, ids, k, cfg, params, n_limit=None)


def _certified_search(
    index: faiss.Index,
    geo: _IndexGeometry,
    weighted: np.ndarray,
    q: WeightedQuery,
    ids: np.ndarray,
    k: int,
    cfg: IndexConfig,
    params: faiss.SearchParameters | None,
    n_limit: int | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fetch candidates in L order (x4 each round) until no unfetched row can enter the top k.

    Returns (positions, distances); stops early when FAISS has no more rows to give (fewer than
    asked) or ``n_limit`` rows were fetched. See the module doc for the certificate.
    """
    qvec, const = geo.query_vector(q)
    slack = q.slack
    kk = max(4 * k, cfg.min_candidates)
    n_total = index.ntotal if n_limit is None else n_limit
    while True:
        kk = min(kk, n_total)
        D, I = index.search(qvec, kk, params=params) if params is not None else index.search(qvec, kk)
        valid = I[0] >= 0
        cand, fd = I[0][valid], D[0][valid]
        if len(cand) == 0:
            return cand.astype(np.int64), np.zeros(0)
        top, dist = _exact_top(weighted[cand], q, ids[cand], k)
        if kk >= n_total or len(cand) < kk:
            return cand[top], dist
        eps = 1e-5 * (abs(const) + abs(float(fd[-1]))) + 1e-7
        l_last = (float(fd[-1]) - const) / 2.0 - eps
        bound = max(0.0, l_last - slack)
        d_k = float(dist[-1])
        l_k = float(midpoint_l1(weighted[cand[top[-1:]]], q)[0])
        if len(top) >= k and (d_k < bound - 1e-9 or (d_k <= bound and l_k < l_last)):
            return cand[top], dist
        kk *= 4


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------
@dataclass
class Match:
    """One retrieved prototype, with its Eq. 3 distance and (optionally) its arrays."""

    rank: int
    distance: float
    prototype_id: str
    label: str | None
    event_type: str | None
    clip_id: str | None
    video_id: str | None
    identity: str | None
    start_frame: int
    end_frame: int
    T: int
    channel_mean: np.ndarray
    channel_max: np.ndarray
    quality_flags: list[str] = field(default_factory=list)
    controls: np.ndarray | None = None  # (T, 17)
    keypoints: np.ndarray | None = None  # (T, 62, 2)

    def to_dict(self, arrays: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rank": self.rank,
            "distance": float(self.distance),
            "prototype_id": self.prototype_id,
            "label": self.label,
            "event_type": self.event_type,
            "clip_id": self.clip_id,
            "video_id": self.video_id,
            "identity": self.identity,
            "start_frame": self.start_frame,
            "end_frame": self.end_frame,
            "T": self.T,
            "channel_mean": dict(zip(CONTROL_CHANNELS, np.round(self.channel_mean.astype(float), 5).tolist())),
            "channel_max": dict(zip(CONTROL_CHANNELS, np.round(self.channel_max.astype(float), 5).tolist())),
            "quality_flags": list(self.quality_flags),
        }
        if arrays and self.controls is not None:
            out["controls"] = self.controls.round(5).tolist()
        if arrays and self.keypoints is not None:
            out["keypoints"] = self.keypoints.round(5).tolist()
        return out


def _list_to_numpy(col: pa.ChunkedArray | pa.Array, inner: int) -> list[np.ndarray]:
    """A list<list<float32>> column as one (T, inner) array per row."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    out = []
    for i in range(len(arr)):
        row = arr[i].values
        if row is None:
            out.append(np.zeros((0, inner), dtype=np.float32))
            continue
        flat = row.flatten().to_numpy(zero_copy_only=False)
        out.append(flat.reshape(-1, inner))
    return out


# ------------------------------------------------------------------------------------------------
# the store
# ------------------------------------------------------------------------------------------------
class PrototypeStore:
    """Read-only access to one library: filters in polars, candidates from FAISS, exact re-rank."""

    def __init__(
        self, parquet: Path, index_dir: Path, meta: dict[str, Any], index: faiss.Index, feats: np.ndarray,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.parquet = parquet
        self.index_dir = index_dir
        self.meta = meta
        self.index = index
        self.features = feats  # (N, 34) native units
        cfg_values = {k: v for k, v in meta["config"].items() if k in IndexConfig.__dataclass_fields__}
        cfg_values.update(overrides or {})
        self.cfg = IndexConfig(**cfg_values)
        self.geo = _IndexGeometry(
            np.asarray(meta["feature_weights"]), np.asarray(meta["centre"]), np.asarray(meta["bound"])
        )
        self.weighted = feats.astype(np.float64) * self.geo.fweights
        self.n = len(feats)
        self.ids = np.arange(self.n)  # positions double as the final tie-break (ids are sorted)
        self.nprobe = int(self.cfg.nprobe or meta.get("nprobe") or 0) if meta["kind"] != "flat_l1" else 0
        self.scanner = ColumnScan(self.weighted, threads=self.cfg.threads)
        self.weighted = self.scanner.cols64.T  # one float64 copy only: a row view of the columns
        # small per-row metadata stays in memory: results are assembled without touching the file
        self._meta_table = pq.read_table(parquet, columns=list(META_COLUMNS) + ["quality_flags"]).combine_chunks()
        labels = pc.unique(self._meta_table.column("label")).to_pylist()
        self.labels: list[str] = sorted(x for x in labels if x is not None)
        self._filter_cache: dict[tuple, np.ndarray | None] = {}
        self._mask_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._walker: SortedFeatures | None = None
        if self.cfg.search == "walk" or (self.cfg.search == "auto" and self.n >= self.cfg.walk_min_rows):
            self.walker()  # sort once at open, so no query pays for it
        self._row_groups = np.cumsum([0] + [pq.ParquetFile(parquet).metadata.row_group(i).num_rows for i in range(pq.ParquetFile(parquet).num_row_groups)])

    # -- opening ----------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, **overrides: Any) -> PrototypeStore:
        """Open LIB (folder or its prototypes.parquet); refuses empty libraries and stale indexes.

        ``overrides`` replace query-time settings of the index config (search, exact_scan_max,
        threads, nprobe, overfetch, min_candidates, walk_min_rows, walk_max_fraction), e.g. for
        benchmarks. ``verify="full"``
        rehashes the Parquet even when its size, mtime and inode are those recorded at indexing.
        """
        verify = overrides.pop("verify", "auto")
        if verify not in ("auto", "full"):
            raise ValueError(f"verify={verify!r}; choose auto (rehash only a rewritten file) or full")
        allowed = {"search", "exact_scan_max", "threads", "nprobe", "overfetch", "min_candidates", "walk_min_rows", "walk_max_fraction"}
        if set(overrides) - allowed:
            raise TypeError(f"cannot override {sorted(set(overrides) - allowed)}; allowed: {sorted(allowed)}")
        parquet, index_dir = library_paths(path)
        if not parquet.exists():
            raise LibraryError(f"no prototype library at {path} (expected {parquet}); build one with `cogportrait library build`")
        rows = pq.ParquetFile(parquet).metadata.num_rows
        if rows == 0:
            raise EmptyLibraryError(
                f"the library {parquet} holds 0 prototypes; rebuild it from non-empty controls "
                f"(`cogportrait library build --controls DIR --out LIB`)"
            )
        meta_path, index_path = index_dir / META_FILE, index_dir / INDEX_FILE
        if not meta_path.exists() or not index_path.exists():
            raise MissingIndexError(f"{parquet} has no index at {index_dir}; run `cogportrait library build --only index`")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != INDEX_FORMAT:
            raise StaleIndexError(f"index format {meta.get('format')} at {index_dir} is not {INDEX_FORMAT}; rebuild the index")
        claimed = stored_fingerprint(parquet)
        if verify == "full":
            actual = parquet_fingerprint(parquet)
        else:
            actual = cached_fingerprint(parquet, meta.get("parquet_stat"), meta.get("fingerprint"))
        if meta.get("fingerprint") != actual:
            raise StaleIndexError(
                f"stale index: {index_dir} was built for content {str(meta.get('fingerprint'))[:12]}, but "
                f"{parquet} now holds {actual[:12]} ({rows} rows); the Parquet changed after indexing. "
                "Rebuild it: `cogportrait library build --only index --library LIB` (or `dvc repro index`)"
            )
        if claimed is not None and claimed != actual:
            log.warning(
                "%s was edited after the prototypes stage wrote it (content %s, written as %s); the index "
                "matches the edited content", parquet, actual[:12], claimed[:12],
            )
        feats = _read_features(parquet)
        if len(feats) != meta["n"]:
            raise StaleIndexError(f"index covers {meta['n']} prototypes but {parquet} has {len(feats)}; rebuild the index")
        index = faiss.read_index(str(index_path))
        if index.ntotal != len(feats):
            raise StaleIndexError(f"{index_path} holds {index.ntotal} vectors for {len(feats)} prototypes; rebuild the index")
        return cls(parquet, index_dir, meta, index, feats, overrides)

    # -- filters ----------------------------------------------------------------------------------
    def _check_filters(self, label: str | None, event_type: str | None) -> None:
        if label is not None and label not in self.labels:
            raise UnknownLabelError(f"unknown label {label!r}; the library's labels: {', '.join(map(repr, self.labels))}")
        if event_type is not None and event_type not in KNOWN_EVENT_TYPES:
            raise UnknownLabelError(f"unknown event type {event_type!r}; known: {', '.join(KNOWN_EVENT_TYPES)}")

    def filter_rows(
        self,
        label: str | None = None,
        event_type: str | None = None,
        min_frames: int | None = None,
        identity_exclude: str | Iterable[str] | None = None,
    ) -> np.ndarray | None:
        """Row positions passing the metadata filters (None = every row), via polars push-down.

        Results are cached per filter combination: the composer repeats the same label many times,
        and the Parquet cannot change under an open store (its fingerprint was checked at open).
        """
        excluded_key = (identity_exclude,) if isinstance(identity_exclude, str) else tuple(sorted(identity_exclude or ()))
        key = (label, event_type, min_frames, excluded_key)
        if key in self._filter_cache:
            return self._filter_cache[key]
        rows = self._filter_rows_uncached(label, event_type, min_frames, identity_exclude)
        if len(self._filter_cache) >= 64:
            self._filter_cache.pop(next(iter(self._filter_cache)))
        self._filter_cache[key] = rows
        return rows

    def _filter_rows_uncached(
        self,
        label: str | None,
        event_type: str | None,
        min_frames: int | None,
        identity_exclude: str | Iterable[str] | None,
    ) -> np.ndarray | None:
        exprs = []
        if label is not None:
            exprs.append(pl.col("label") == label)
        if event_type is not None:
            exprs.append(pl.col("event_type") == event_type)
        if min_frames is not None:
            exprs.append(pl.col("T") >= int(min_frames))
        if identity_exclude is not None:
            excluded = [identity_exclude] if isinstance(identity_exclude, str) else list(identity_exclude)
            if excluded:
                exprs.append(~pl.col("identity").is_in(excluded) | pl.col("identity").is_null())
        if not exprs:
            return None
        lf = pl.scan_parquet(self.parquet).select("label", "event_type", "T", "identity").with_row_index("_row")
        rows = lf.filter(pl.all_horizontal(exprs)).select("_row").collect()["_row"].to_numpy()
        return rows.astype(np.int64)

    # -- search -----------------------------------------------------------------------------------
    def search(self, q: WeightedQuery, k: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Positions and exact distances of the top k among ``rows`` (None = all).

        ``search`` = walk: exact walk of per-feature sorted orders (``walk.py``), handing dense
        targets over to the scan; scan: exact column scan; index: the FAISS index (flat: exact by
        certificate; IVF: approximate, within its measured recall); auto: the walk from
        walk_min_rows rows (unless a filter keeps < 1/2 of them), the scan below, both up to
        exact_scan_max rows, the index above.
        """
        n_sub = self.n if rows is None else len(rows)
        if n_sub == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        k = min(k, n_sub)
        mode = self.cfg.search
        if mode == "walk" or (mode == "auto" and self.cfg.walk_min_rows <= n_sub <= self.cfg.exact_scan_max
                              and 2 * n_sub >= self.n):
            # exact; a filter keeping under half the rows (a label) makes the walk's windows sparse
            # and the scan of its rows cheap: measured faster with the scan (bench/RESULTS.md)
            found = self.walker().topk(q, k, self.ids, self._row_mask(rows), n_sub)
            if found is not None:
                return found
            return self.scanner.topk(q, k, self.ids, rows)
        if mode == "scan" or (mode == "auto" and n_sub <= self.cfg.exact_scan_max):
            return self.scanner.topk(q, k, self.ids, rows)
        sel, keep = self._selector(rows)
        if self.meta["kind"] == "flat_l1":
            return self._flat_search(q, k, rows, n_sub, sel)
        probe = self.nprobe
        if rows is not None:
            probe = min(int(self.meta["nlist"]), int(math.ceil(self.nprobe * self.n / max(n_sub, 1))))
        pos, dist = _ivf_search(self.index, self.geo, self.weighted, q, self.ids, k, probe, self.cfg, sel)
        del keep
        return pos, dist

    def walker(self) -> SortedFeatures:
        """The per-feature sort orders (``walk.py``), built on first use (at open for large libraries)."""
        if self._walker is None:
            self._walker = SortedFeatures(
                self.scanner.cols64, self.scanner.cols32, max_fraction=self.cfg.walk_max_fraction, threads=self.cfg.threads
            )
        return self._walker

    def _row_mask(self, rows: np.ndarray | None) -> np.ndarray | None:
        """Boolean row mask of a filter's positions, cached per (cached) positions array."""
        if rows is None:
            return None
        hit = self._mask_cache.get(id(rows))
        if hit is not None and hit[0] is rows:
            return hit[1]
        mask = np.zeros(self.n, dtype=bool)
        mask[rows] = True
        if len(self._mask_cache) >= 64:
            self._mask_cache.pop(next(iter(self._mask_cache)))
        self._mask_cache[id(rows)] = (rows, mask)
        return mask

    def close(self) -> None:
        """Stop the scan threads (also done at interpreter exit)."""
        self.scanner.close()

    def __enter__(self) -> PrototypeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _selector(self, rows: np.ndarray | None) -> tuple[faiss.IDSelector | None, np.ndarray | None]:
        if rows is None:
            return None, None
        mask = np.zeros(self.n, dtype=bool)
        mask[rows] = True
        bitmap = np.packbits(mask, bitorder="little")
        return faiss.IDSelectorBitmap(self.n, faiss.swig_ptr(bitmap)), bitmap

    def _flat_search(
        self, q: WeightedQuery, k: int, rows: np.ndarray | None, n_sub: int, sel: faiss.IDSelector | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact: the certified loop over the flat index (ends at worst with every row fetched)."""
        params = faiss.SearchParameters(sel=sel) if sel is not None else None
        return _certified_search(self.index, self.geo, self.weighted, q, self.ids, k, self.cfg, params, n_limit=n_sub)

    # -- public API -------------------------------------------------------------------------------
    def query(
        self,
        targets: Mapping[str, object],
        label: str | None = None,
        event_type: str | None = None,
        k: int = 5,
        min_frames: int | None = None,
        identity_exclude: str | Iterable[str] | None = None,
        arrays: bool = True,
    ) -> list[Match]:
        """Top-k prototypes by Eq. 3 for ``targets`` ({channel: value | [lo, hi] | "lo..hi"}).

        Head angles are in degrees. Ties are broken by the distance to the range midpoints, then by
        prototype id. Filters that match nothing give an empty list.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        intervals = to_intervals(targets)
        self._check_filters(label, event_type)
        q = weighted_query(intervals, self.geo.fweights)
        rows = self.filter_rows(label, event_type, min_frames, identity_exclude)
        pos, dist = self.search(q, k, rows)
        return self.fetch(pos, dist, arrays=arrays)

    def intervals(self, targets: Mapping[str, object]) -> Intervals:
        return to_intervals(targets)

    def fetch(self, positions: np.ndarray, distances: np.ndarray | None = None, arrays: bool = True) -> list[Match]:
        """Rows at ``positions`` as Match objects, in order; arrays come from their row groups only."""
        if len(positions) == 0:
            return []
        positions = np.asarray(positions, dtype=np.int64)
        records = self._meta_table.take(pa.array(positions)).to_pylist()
        rows: dict[int, dict[str, Any]] = {}
        for p, rec in zip(positions.tolist(), records):
            rec["channel_mean"] = self.features[p, :N_CHANNELS].copy()
            rec["channel_max"] = self.features[p, N_CHANNELS:].copy()
            rows[p] = rec
        if arrays:
            pf = pq.ParquetFile(self.parquet)
            groups = np.searchsorted(self._row_groups, positions, side="right") - 1
            for g in sorted(set(groups.tolist())):
                wanted = [int(p) for p, gg in zip(positions, groups) if gg == g]
                table = pf.read_row_group(g, columns=["controls", "keypoints"])
                sub = table.take(pa.array([p - int(self._row_groups[g]) for p in wanted]))
                ctrl = _list_to_numpy(sub.column("controls"), N_CHANNELS)
                kps = _list_to_numpy(sub.column("keypoints"), N_KEYPOINTS * 2)
                for i, p in enumerate(wanted):
                    rows[p]["controls"] = ctrl[i]
                    rows[p]["keypoints"] = kps[i].reshape(-1, N_KEYPOINTS, 2)
        out = []
        for r, p in enumerate(positions):
            rec = rows[int(p)]
            out.append(
                Match(
                    rank=r + 1,
                    distance=float(distances[r]) if distances is not None else float("nan"),
                    prototype_id=rec["prototype_id"],
                    label=rec["label"],
                    event_type=rec["event_type"],
                    clip_id=rec["clip_id"],
                    video_id=rec["video_id"],
                    identity=rec["identity"],
                    start_frame=int(rec["start_frame"]),
                    end_frame=int(rec["end_frame"]),
                    T=int(rec["T"]),
                    channel_mean=rec["channel_mean"],
                    channel_max=rec["channel_max"],
                    quality_flags=list(rec.get("quality_flags") or []),
                    controls=rec.get("controls"),
                    keypoints=rec.get("keypoints"),
                )
            )
        return out

    def get(self, prototype_id: str, arrays: bool = True) -> Match:
        """One prototype by id (a clear KeyError naming the library when absent)."""
        rows = (
            pl.scan_parquet(self.parquet).select("prototype_id").with_row_index("_row")
            .filter(pl.col("prototype_id") == prototype_id).select("_row").collect()["_row"].to_numpy()
        )
        if len(rows) == 0:
            raise KeyError(f"no prototype {prototype_id!r} in {self.parquet}")
        return self.fetch(rows.astype(np.int64), None, arrays=arrays)[0]

    def stats(self) -> dict[str, Any]:
        """Counts per label and event type, length statistics, index kind and recall."""
        lf = pl.scan_parquet(self.parquet)
        per_label = lf.group_by("label").agg(pl.len().alias("n")).sort("label").collect()
        per_type = lf.group_by("event_type").agg(pl.len().alias("n")).sort("event_type").collect()
        t = lf.select(
            pl.col("T").min().alias("min"), pl.col("T").median().alias("median"), pl.col("T").max().alias("max"),
            pl.col("identity").n_unique().alias("identities"), pl.col("clip_id").n_unique().alias("clips"),
        ).collect().row(0, named=True)
        flags = lf.select(pl.col("quality_flags").explode()).drop_nulls().group_by("quality_flags").agg(pl.len()).collect()
        return {
            "library": str(self.parquet),
            "prototypes": self.n,
            "clips": t["clips"],
            "identities": t["identities"],
            "frames": {"min": t["min"], "median": t["median"], "max": t["max"]},
            "labels": {r["label"]: r["n"] for r in per_label.iter_rows(named=True)},
            "event_types": {r["event_type"]: r["n"] for r in per_type.iter_rows(named=True)},
            "quality_flags": {r["quality_flags"]: r["len"] for r in flags.iter_rows(named=True)},
            "index": {k: self.meta.get(k) for k in ("kind", "nlist", "nprobe", "recall_at_5", "build_s", "fingerprint")},
            "weights": self.meta["weights"],
        }
