"""The FAISS index beside ``prototypes.parquet``: build, nprobe tuning, and its consistency checks.

Layout: ``LIB/index/faiss.index`` (exact IndexFlat L1, or IVFFlat L1 from ``ivf_threshold`` rows),
the controls sidecar for cheap fetches (``table.write_controls_sidecar``: controls.f32,
controls_offsets.npy, recorded under ``controls_sidecar``) and ``LIB/index/meta.json`` (content
fingerprint of the Parquet, Eq. 3 weights, index geometry, kind, nlist/nprobe, recall@5 measured
at build; nothing machine- or time-dependent, so a rebuild writes the same bytes). ``PrototypeStore``
reads meta.json (weights, fingerprint) and answers queries by the exact walk or scan, which beat
this index at every measured size (bench/RESULTS.md); ``FaissSearch`` queries the index itself
(nprobe tuning, the benchmark, tests).

How a FAISS search ranks by Eq. 3 (see ``retrieval.py`` for D):
* Masking. Eq. 3 gives channels a target leaves out weight 0, but a FAISS index has fixed weights.
  The index therefore stores u = [v - c, -(v - c)] (v: weighted features, c: per-feature centre).
  For a targeted feature the query holds (m - c, -(m - c)) and the L1 term is 2|v - m| (m: interval
  midpoint); for an omitted feature it holds (B, B) with B >= |v - c| for every row, and the term is
  the constant 2B. So FAISS ranks by L(p) = sum over targeted features of |v - m|, exactly.
* Intervals. D(p) = sum max(0, |v - m| - h) with h the half-widths, so L(p) - H <= D(p) <= L(p)
  where H = sum h. Candidates come back in L order; after the re-rank by (D, L, id) the k-th result
  is certified when no unfetched row can beat it (every unfetched row has L >= L_last, hence
  D >= L_last - H). Otherwise more are fetched (x4). The flat index is thus exact; IVF is
  approximate in which lists it probes: nprobe is tuned at build time to ``recall_target``.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow.parquet as pq

from cogportrait.config import IndexConfig
from cogportrait.io.atomic import atomic_dir, write_json
from cogportrait.schema import CONTROL_CHANNELS, HEAD_ANGLE_SCALE_DEG, HEAD_CHANNELS, N_CHANNELS
from prototype_store.errors import EmptyLibraryError, LibraryError, MissingIndexError, StaleIndexError
from prototype_store.fingerprint import cached_fingerprint, parquet_fingerprint, stored_fingerprint
from prototype_store.retrieval import (
    WeightedQuery,
    feature_weights,
    interval_distance,
    midpoint_l1,
    rank,
    to_intervals,
    weighted_query,
)
from prototype_store.scan import ColumnScan
from prototype_store.table import library_paths, read_features, write_controls_sidecar

log = logging.getLogger("cogportrait.prototype_store")

INDEX_FILE = "faiss.index"
META_FILE = "meta.json"
INDEX_FORMAT = 1


@dataclass
class IndexGeometry:
    """The masked-L1 encoding of the weighted features (module doc)."""

    fweights: np.ndarray  # (34,)
    centre: np.ndarray  # (34,)
    bound: np.ndarray  # (34,) B >= |v - c| for every row

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> IndexGeometry:
        return cls(np.asarray(meta["feature_weights"]), np.asarray(meta["centre"]), np.asarray(meta["bound"]))

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
            scale = HEAD_ANGLE_SCALE_DEG if name in HEAD_CHANNELS else 1.0
            centre = float(row[j if rng.random() < 0.5 else N_CHANNELS + j]) + rng.normal(0, 0.05) * scale
            if rng.random() < 0.5:
                targets[name] = round(centre, 4)
            else:
                half = float(rng.uniform(0.02, 0.15)) * scale
                targets[name] = [round(centre - half, 4), round(centre + half, 4)]
        out.append(targets)
    return out


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


class FaissSearch:
    """A FAISS index over the weighted features, searched with the certified loop (module doc).

    Built in memory by ``build_index`` (nprobe tuning) or loaded with ``open`` (the benchmark,
    tests). Results are (positions, exact Eq. 3 distances) in the store's total order.
    """

    def __init__(self, index: faiss.Index, geo: IndexGeometry, weighted: np.ndarray, min_candidates: int, nprobe: int = 0) -> None:
        self.index = index
        self.geo = geo
        self.weighted = weighted  # (N, 34) float64
        self.ids = np.arange(len(weighted))  # positions double as the final tie-break (ids are sorted)
        self.min_candidates = min_candidates
        self.nprobe = nprobe  # IVF lists probed by default; 0 for the flat index

    @classmethod
    def open(cls, path: str | os.PathLike, nprobe: int = 0) -> FaissSearch:
        """The index of LIB (checked against the Parquet like ``PrototypeStore.open``); ``nprobe``
        overrides the tuned one."""
        parquet, index_dir = library_paths(path)
        meta = load_meta(parquet, index_dir)
        feats = read_features(parquet)
        index = faiss.read_index(str(index_dir / INDEX_FILE))
        if index.ntotal != len(feats) or meta["n"] != len(feats):
            raise StaleIndexError(f"{index_dir} holds {index.ntotal} vectors for {len(feats)} prototypes; rebuild the index")
        geo = IndexGeometry.from_meta(meta)
        return cls(index, geo, feats.astype(np.float64) * geo.fweights, int(meta["config"]["min_candidates"]),
                   int(nprobe or meta.get("nprobe") or 0))

    def query(self, targets: Mapping[str, object], k: int = 5, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top k for ``targets`` ({channel: value | [lo, hi]}, head angles in degrees)."""
        return self.topk(weighted_query(to_intervals(targets), self.geo.fweights), k, nprobe)

    def topk(self, q: WeightedQuery, k: int, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Fetch candidates in L order (x4 each round) until no unfetched row can enter the top k.

        Stops early when FAISS has no more rows to give (IVF: every row of the probed lists).
        Within what it fetched the top k is exact.
        """
        probe = self.nprobe if nprobe is None else nprobe
        params = faiss.SearchParametersIVF(nprobe=int(probe)) if probe else None
        qvec, const = self.geo.query_vector(q)
        slack = q.slack
        kk = max(4 * k, self.min_candidates)
        n_total = self.index.ntotal
        while True:
            kk = min(kk, n_total)
            D, I = self.index.search(qvec, kk, params=params) if params is not None else self.index.search(qvec, kk)
            valid = I[0] >= 0
            cand, fd = I[0][valid], D[0][valid]
            if len(cand) == 0:
                return cand.astype(np.int64), np.zeros(0)
            top, dist = _exact_top(self.weighted[cand], q, self.ids[cand], k)
            if kk >= n_total or len(cand) < kk:
                return cand[top], dist
            eps = 1e-5 * (abs(const) + abs(float(fd[-1]))) + 1e-7
            l_last = (float(fd[-1]) - const) / 2.0 - eps
            bound = max(0.0, l_last - slack)
            d_k = float(dist[-1])
            l_k = float(midpoint_l1(self.weighted[cand[top[-1:]]], q)[0])
            if len(top) >= k and (d_k < bound - 1e-9 or (d_k <= bound and l_k < l_last)):
                return cand[top], dist
            kk *= 4


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
    fingerprint = cached_fingerprint(parquet)  # also remembered for the staleness check at open
    feats = read_features(parquet)
    n = len(feats)
    if n == 0:
        raise EmptyLibraryError(f"{parquet} holds 0 prototypes: nothing to index (check the upstream stages' outputs)")
    fweights = feature_weights(cfg.weight_au, cfg.weight_gaze, cfg.weight_head, cfg.weight_mean, cfg.weight_peak)
    weighted = feats.astype(np.float64) * fweights
    lo, hi = weighted.min(axis=0), weighted.max(axis=0)
    centre = 0.5 * (lo + hi)
    bound = 0.5 * (hi - lo) * 1.001 + 1e-3
    geo = IndexGeometry(fweights, centre, bound)
    u = geo.encode(weighted)
    dim = u.shape[1]
    meta: dict[str, Any] = {
        "format": INDEX_FORMAT,
        "fingerprint": fingerprint,
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
        nprobe, recall = _tune_nprobe(FaissSearch(index, geo, weighted, cfg.min_candidates), feats, cfg, nlist)
        meta.update(nprobe=nprobe, recall_at_5=recall)
    with atomic_dir(index_dir) as tmp:
        meta["controls_sidecar"] = write_controls_sidecar(pq.ParquetFile(parquet), tmp)  # swapped in with meta.json
        faiss.write_index(index, str(tmp / INDEX_FILE))
        write_json(tmp / META_FILE, meta)
    log.info("indexed %d prototypes (%s, recall@5 %.3f)", n, meta["kind"], meta["recall_at_5"])
    return meta


def _tune_nprobe(ivf: FaissSearch, feats: np.ndarray, cfg: IndexConfig, nlist: int) -> tuple[int, float]:
    """Smallest power-of-two nprobe whose measured recall@5 reaches the target (or cfg.nprobe)."""
    queries = [weighted_query(to_intervals(t), ivf.geo.fweights) for t in sample_queries(feats, cfg.recall_queries, cfg.seed + 1)]
    scanner = ColumnScan(ivf.weighted, threads=cfg.threads)
    truth = [scanner.topk(q, 5, ivf.ids)[1] for q in queries]
    scanner.close()
    candidates = [cfg.nprobe] if cfg.nprobe else [p for p in (2**i for i in range(0, 20)) if p < nlist] + [nlist]
    recall = 0.0
    nprobe = candidates[-1]
    for probe in candidates:
        found = [ivf.topk(q, 5, probe)[1] for q in queries]
        recall = recall_at_k(truth, found)
        log.debug("nprobe %d: recall@5 %.4f", probe, recall)
        if recall >= cfg.recall_target or cfg.nprobe:
            nprobe = probe
            break
    return nprobe, round(recall, 4)


def load_meta(parquet: Path, index_dir: Path, verify: str = "auto") -> dict[str, Any]:
    """meta.json of the index, refused when missing, of another format, or built for other content.

    ``verify="auto"`` rehashes the Parquet only when its size, mtime or inode differ from the last
    time this user's cache saw it (the index build fills it); ``"full"`` rehashes unconditionally.
    """
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
        actual = cached_fingerprint(parquet)
    if meta.get("fingerprint") != actual:
        rows = pq.ParquetFile(parquet).metadata.num_rows
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
    return meta
