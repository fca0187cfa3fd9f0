"""``PrototypeStore``: Eq. 3 top-k queries over one library, exact, with metadata filters.

How a query is answered (see ``retrieval.py`` for D, bench/RESULTS.md for the numbers):
* Filters. Metadata filters run on the per-row metadata the store holds in memory (label, event
  type, T, identity as integer codes) and give the allowed row positions; cached per combination.
* Walk and scan, both exact and bit-identical. From ``walk_min_rows`` rows, opening the store sorts
  every feature once and a query walks those sorted orders (``walk.py``: a seed bounds the k-th
  result, the smallest sorted window of a targeted feature holds every row that can beat it,
  windows are intersected and pruned). Dense targets (window above ``walk_max_fraction`` of the
  rows), filters keeping under half the rows and smaller libraries go to a column scan of the
  targeted features (``scan.py``). ``search="auto"`` chooses so; ``"walk"`` / ``"scan"`` force one
  (the scan is the reference the tests hold the walk to). The FAISS index (``index.py``) is not
  queried: for 1-4 targeted channels it was slower than the scan at every measured size.
* Staleness. The index's meta.json holds the Parquet's content fingerprint and file stat; opening
  rehashes a rewritten file and refuses an index built for other content (``index.load_meta``).
* Fetching arrays. Callers name the arrays they need (``arrays=``: the composer reads controls
  only). Controls come from the index's memory-mapped sidecar (``table.ControlsSidecar``: a slice
  per row, microseconds); keypoints from the Parquet, decoding only the row groups of the rows
  asked for, through the one ``ParquetFile`` the store keeps open (re-opening it parsed the whole
  footer per fetch: ~0.2 s at 10^6 rows in 256-row groups). An index built before the sidecar
  existed still works, reading controls from the Parquet too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cogportrait.config import IndexConfig
from cogportrait.schema import CONTROL_CHANNELS, N_CHANNELS, N_KEYPOINTS, PROTOTYPE_EVENT_TYPES
from prototype_store.errors import EmptyLibraryError, LibraryError, StaleIndexError, UnknownLabelError
from prototype_store.index import load_meta
from prototype_store.retrieval import WeightedQuery, to_intervals, weighted_query
from prototype_store.scan import ColumnScan
from prototype_store.table import ControlsSidecar, library_paths, list_column_values, read_features
from prototype_store.walk import SortedFeatures


log = logging.getLogger("cogportrait.prototype_store")

SEARCH_PATHS = ("auto", "walk", "scan")
ARRAY_COLUMNS = ("controls", "keypoints")
ARRAY_INNER = {"controls": N_CHANNELS, "keypoints": N_KEYPOINTS * 2}  # values per frame
# what a fetch reads: True = both arrays, False / None = neither, or one name or several names
Arrays = bool | str | Sequence[str] | None
KNOWN_EVENT_TYPES = PROTOTYPE_EVENT_TYPES
META_COLUMNS = ("prototype_id", "label", "event_type", "clip_id", "video_id", "identity", "start_frame", "end_frame", "T")


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


def array_columns(arrays: Arrays) -> tuple[str, ...]:
    """The array columns a fetch reads, in ARRAY_COLUMNS order (``Arrays`` above).

    Checked before any work, so a typo ("keypoint") fails loudly instead of silently reading both.
    """
    if arrays is None or isinstance(arrays, (bool, np.bool_)):
        return ARRAY_COLUMNS if arrays else ()
    if not isinstance(arrays, (str, Sequence)):
        raise TypeError(f"arrays={arrays!r}: choose True, False, or among {ARRAY_COLUMNS}")
    names = (arrays,) if isinstance(arrays, str) else tuple(arrays)
    unknown = [x for x in names if x not in ARRAY_COLUMNS]
    if unknown:
        raise ValueError(f"arrays={arrays!r}: unknown {unknown}; choose True, False, or among {ARRAY_COLUMNS}")
    return tuple(c for c in ARRAY_COLUMNS if c in names)


# ------------------------------------------------------------------------------------------------
# the store
# ------------------------------------------------------------------------------------------------
class PrototypeStore:
    """Read-only access to one library: filters on in-memory metadata, exact top k by the walk or the scan."""

    def __init__(
        self, parquet: Path, index_dir: Path, meta: dict[str, Any], feats: np.ndarray,
        overrides: Mapping[str, Any] | None = None, parquet_file: pq.ParquetFile | None = None,
        verify: str = "auto",
    ) -> None:
        self.parquet = parquet
        # kept open for the store's life: fetches read row groups without re-parsing the footer
        self._pf: pq.ParquetFile | None = parquet_file if parquet_file is not None else pq.ParquetFile(parquet)
        self.index_dir = index_dir
        self.meta = meta
        self.features = feats  # (N, 34) native units
        cfg_values = {k: v for k, v in meta["config"].items() if k in IndexConfig.__dataclass_fields__}
        cfg_values.update(overrides or {})
        self.cfg = IndexConfig(**cfg_values)
        if self.cfg.search not in SEARCH_PATHS:
            raise ValueError(f"search={self.cfg.search!r}; the store searches by {', '.join(SEARCH_PATHS)}")
        self.fweights = np.asarray(meta["feature_weights"])
        self.n = len(feats)
        self.ids = np.arange(self.n)  # positions double as the final tie-break (ids are sorted)
        self.scanner = ColumnScan(feats.astype(np.float64) * self.fweights, threads=self.cfg.threads)
        self.weighted = self.scanner.cols64.T  # one float64 copy only: a row view of the columns
        # small per-row metadata stays in memory: results are assembled without touching the file
        self._meta_table = self._pf.read(columns=list(META_COLUMNS) + ["quality_flags"]).combine_chunks()
        labels = pc.unique(self._meta_table.column("label")).to_pylist()
        self.labels: list[str] = sorted(x for x in labels if x is not None)
        self._filter_cache: dict[tuple, np.ndarray | None] = {}
        self._code_cache: dict[str, np.ndarray] = {}
        self._dictionaries: dict[str, dict[str, int]] = {}
        self._mask_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._walker: SortedFeatures | None = None
        if self.cfg.search == "walk" or (self.cfg.search == "auto" and self.n >= self.cfg.walk_min_rows):
            self.walker()  # sort once at open, so no query pays for it
        md = self._pf.metadata
        self._row_groups = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
        sidecar = meta.get("controls_sidecar")
        self._controls: ControlsSidecar | None = None
        if sidecar is not None:
            self._controls = ControlsSidecar(index_dir, sidecar, self.n, verify)
        else:
            log.warning(
                "%s was indexed without the controls sidecar: fetching controls decodes Parquet row groups "
                "(slow on large libraries); rebuild the index: `cogportrait library build --only index`", index_dir,
            )

    # -- opening ----------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike, **overrides: Any) -> PrototypeStore:
        """Open LIB (folder or its prototypes.parquet); refuses empty libraries and stale indexes.

        ``overrides`` replace query-time settings of the index config (search, threads,
        walk_min_rows, walk_max_fraction), e.g. for benchmarks. ``verify="full"`` rehashes the
        Parquet even when its size, mtime and inode are those recorded at indexing.
        """
        verify = overrides.pop("verify", "auto")
        if verify not in ("auto", "full"):
            raise ValueError(f"verify={verify!r}; choose auto (rehash only a rewritten file) or full")
        allowed = {"search", "threads", "walk_min_rows", "walk_max_fraction"}
        if set(overrides) - allowed:
            raise TypeError(f"cannot override {sorted(set(overrides) - allowed)}; allowed: {sorted(allowed)}")
        parquet, index_dir = library_paths(path)
        if not parquet.exists():
            raise LibraryError(f"no prototype library at {path} (expected {parquet}); build one with `cogportrait library build`")
        pf = pq.ParquetFile(parquet)  # parsed once, then kept by the store
        rows = pf.metadata.num_rows
        if rows == 0:
            raise EmptyLibraryError(
                f"the library {parquet} holds 0 prototypes; rebuild it from non-empty controls "
                f"(`cogportrait library build --controls DIR --out LIB`)"
            )
        meta = load_meta(parquet, index_dir, verify)
        feats = read_features(parquet, pf)
        if len(feats) != meta["n"]:
            raise StaleIndexError(f"index covers {meta['n']} prototypes but {parquet} has {len(feats)}; rebuild the index")
        return cls(parquet, index_dir, meta, feats, overrides, parquet_file=pf, verify=verify)

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
        """Row positions passing the metadata filters (None = every row), from the in-memory metadata.

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
        """From the in-memory metadata: integer codes per string column, so a filter is a few numpy
        comparisons (~1 ms at 1e6 rows) instead of a Parquet scan (~135 ms at 1e6, the first time
        each of a compile's event types was asked)."""
        excluded = [identity_exclude] if isinstance(identity_exclude, str) else list(identity_exclude or ())
        if label is None and event_type is None and min_frames is None and not excluded:
            return None
        mask = np.ones(self.n, dtype=bool)
        for column, value in (("label", label), ("event_type", event_type)):
            if value is not None:
                mask &= self._codes(column) == self._code_of(column, value)
        if min_frames is not None:
            mask &= self._codes("T") >= int(min_frames)
        if excluded:
            mask &= ~np.isin(self._codes("identity"), [self._code_of("identity", x) for x in excluded])
        return np.flatnonzero(mask).astype(np.int64)

    def _codes(self, column: str) -> np.ndarray:
        """A metadata column as integers (strings: dictionary codes, null = -1), built once."""
        if column not in self._code_cache:
            col = self._meta_table.column(column)
            if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
                encoded = pc.dictionary_encode(col).combine_chunks()
                self._dictionaries[column] = {v: i for i, v in enumerate(encoded.dictionary.to_pylist())}
                codes = pc.fill_null(encoded.indices, -1)
            else:
                codes = col
            self._code_cache[column] = np.asarray(codes.to_numpy(zero_copy_only=False))
        return self._code_cache[column]

    def _code_of(self, column: str, value: str) -> int:
        """The code of ``value`` in a string column; -2 (matches nothing) when absent."""
        self._codes(column)
        return self._dictionaries[column].get(value, -2)

    # -- search -----------------------------------------------------------------------------------
    def search(self, q: WeightedQuery, k: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Positions and exact distances of the top k among ``rows`` (None = all).

        ``search`` = walk: exact walk of per-feature sorted orders (``walk.py``), handing dense
        targets over to the scan; scan: exact column scan; auto: the walk from walk_min_rows rows
        (unless a filter keeps < 1/2 of them), the scan below.
        """
        n_sub = self.n if rows is None else len(rows)
        if n_sub == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        k = min(k, n_sub)
        mode = self.cfg.search
        if mode == "walk" or (mode == "auto" and n_sub >= self.cfg.walk_min_rows and 2 * n_sub >= self.n):
            # a filter keeping under half the rows (a label) makes the walk's windows sparse and
            # the scan of its rows cheap: measured faster with the scan (bench/RESULTS.md)
            found = self.walker().topk(q, k, self.ids, self._row_mask(rows), n_sub)
            if found is not None:
                return found
        return self.scanner.topk(q, k, self.ids, rows)

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
        """Stop the scan threads (also done at interpreter exit) and close the Parquet file."""
        self.scanner.close()
        if self._pf is not None:
            self._pf.close()
            self._pf = None

    def _parquet_file(self) -> pq.ParquetFile:
        """The open Parquet file (re-opened after ``close``, so a closed store still answers)."""
        if self._pf is None:
            self._pf = pq.ParquetFile(self.parquet)
        return self._pf

    def __enter__(self) -> PrototypeStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public API -------------------------------------------------------------------------------
    def query(
        self,
        targets: Mapping[str, object],
        label: str | None = None,
        event_type: str | None = None,
        k: int = 5,
        min_frames: int | None = None,
        identity_exclude: str | Iterable[str] | None = None,
        arrays: Arrays = True,
    ) -> list[Match]:
        """Top-k prototypes by Eq. 3 for ``targets`` ({channel: value | [lo, hi] | "lo..hi"}).

        ``arrays`` says which per-frame arrays the results carry (see ``fetch``). Head angles are in
        degrees. Ties are broken by the distance to the range midpoints, then by prototype id.
        Filters that match nothing give an empty list.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        array_columns(arrays)  # a bad value fails before the search, not after
        intervals = to_intervals(targets)
        self._check_filters(label, event_type)
        q = weighted_query(intervals, self.fweights)
        rows = self.filter_rows(label, event_type, min_frames, identity_exclude)
        pos, dist = self.search(q, k, rows)
        return self.fetch(pos, dist, arrays=arrays)

    def fetch(self, positions: np.ndarray, distances: np.ndarray | None = None, arrays: Arrays = True) -> list[Match]:
        """Rows at ``positions`` as Match objects, in order (duplicates allowed).

        ``arrays``: True = controls and keypoints, False = neither, "controls" / "keypoints" / a
        sequence of those names = just these (the composer asks for "controls": a memory-map slice
        per row; keypoints decode their rows' Parquet row groups). Every array is a fresh copy.
        """
        if len(positions) == 0:
            return []
        columns = array_columns(arrays)
        positions = np.asarray(positions, dtype=np.int64)
        records = self._meta_table.take(pa.array(positions)).to_pylist()
        rows: dict[int, dict[str, Any]] = {}
        for p, rec in zip(positions.tolist(), records):
            rec["channel_mean"] = self.features[p, :N_CHANNELS].copy()
            rec["channel_max"] = self.features[p, N_CHANNELS:].copy()
            rows[p] = rec
        unique = sorted(rows)
        from_parquet = list(columns)
        if "controls" in columns and self._controls is not None:
            from_parquet.remove("controls")
            for p in unique:
                rows[p]["controls"] = self._controls.get(p)
        if from_parquet:
            for name, per_row in self._read_arrays(np.asarray(unique, dtype=np.int64), from_parquet).items():
                for p, arr in zip(unique, per_row):
                    rows[p][name] = arr.reshape(-1, N_KEYPOINTS, 2) if name == "keypoints" else arr
        out = []
        handed_out: set[int] = set()
        for r, p in enumerate(positions.tolist()):
            rec = rows[p]
            if p in handed_out:  # a duplicate position gets its own arrays, not an alias of the first
                rec = {**rec, **{c: rec[c].copy() for c in ("controls", "keypoints", "channel_mean", "channel_max")
                                 if rec.get(c) is not None}}
            handed_out.add(p)
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

    def _read_arrays(self, unique: np.ndarray, columns: Sequence[str]) -> dict[str, list[np.ndarray]]:
        """``columns`` of the sorted distinct rows ``unique``, from their row groups only.

        One read of just those groups and columns, single-threaded (for a handful of groups the
        thread pool costs more than it saves, and doubles p99 on a loaded machine), then a take of
        the wanted rows before any conversion to numpy.
        """
        groups = np.searchsorted(self._row_groups, unique, side="right") - 1
        read = np.unique(groups)
        sizes = self._row_groups[read + 1] - self._row_groups[read]
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # each read group's first row in the table
        local = starts[np.searchsorted(read, groups)] + unique - self._row_groups[groups]
        table = self._parquet_file().read_row_groups(read.tolist(), columns=list(columns), use_threads=False)
        sub = table.take(pa.array(local))
        out: dict[str, list[np.ndarray]] = {}
        for name in columns:
            values, offsets = list_column_values(sub.column(name), ARRAY_INNER[name])
            out[name] = [values[offsets[i] : offsets[i + 1]].copy() for i in range(len(unique))]
        return out

    def get(self, prototype_id: str, arrays: Arrays = True) -> Match:
        """One prototype by id (a clear KeyError naming the library when absent).

        Looked up in the in-memory id column: the file is sorted by label first, so ids are not in
        an order a search could use, but a vectorised compare of 10^6 strings takes milliseconds.
        """
        pos = pc.index(self._meta_table.column("prototype_id"), pa.scalar(prototype_id, pa.string())).as_py()
        if pos is None or pos < 0:
            raise KeyError(f"no prototype {prototype_id!r} in {self.parquet}")
        return self.fetch(np.array([pos], dtype=np.int64), None, arrays=arrays)[0]

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
