"""PrototypeStore: retrieval equals a brute-force Eq. 3, filters, ranges, stale/empty/unknown errors."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from bench.synthetic import perturb_prototypes
from cogportrait.config import IndexConfig, PrototypesConfig
from cogportrait.schema import (
    CHANNEL_INDEX,
    CONTROL_CHANNELS,
    HEAD_ANGLE_SCALE_DEG,
    HEAD_CHANNELS,
    N_CHANNELS,
    PROTOTYPES_SCHEMA,
)
from prototype_store import (
    EmptyLibraryError,
    PrototypeStore,
    StaleIndexError,
    UnknownChannelError,
    UnknownLabelError,
    build_index,
    write_prototypes,
)
from prototype_store.retrieval import brute_force, feature_weights
from prototype_store.index import FaissSearch, sample_queries

ROW_GROUP_SIZE = PrototypesConfig().row_group_size  # params.yaml's value


def _oracle(table: pa.Table, targets, fweights, k, keep=None):
    """Brute force over every row: Eq. 3 per channel, ties by midpoint L1 then position."""
    mean = np.asarray(table.column("channel_mean").to_pylist(), dtype=np.float32)
    peak = np.asarray(table.column("channel_max").to_pylist(), dtype=np.float32)
    d = brute_force(mean, peak, targets, fweights)
    # midpoint L1 (tie-break): same formula with zero-width intervals at the midpoints
    mids = {}
    for name, v in targets.items():
        lo, hi = (v, v) if np.isscalar(v) else v
        mids[name] = 0.5 * (lo + hi)
    l1 = brute_force(mean, peak, mids, fweights)
    pos = np.arange(len(d))
    if keep is not None:
        pos, d, l1 = pos[keep], d[keep], l1[keep]
    order = np.lexsort((pos, np.round(l1, 9), np.round(d, 9)))[:k]
    return pos[order], d[order]


def _fw(store: PrototypeStore) -> np.ndarray:
    w = store.meta["weights"]
    return feature_weights(w["weight_au"], w["weight_gaze"], w["weight_head"], w["weight_mean"], w["weight_peak"])


@pytest.fixture(scope="module")
def small_candidates_library(sample_library, tmp_path_factory):
    """The sample library indexed with min_candidates=1 so the certified fetch loop really iterates."""
    lib = tmp_path_factory.mktemp("lib_small_k")
    shutil.copy(sample_library / "prototypes.parquet", lib / "prototypes.parquet")
    build_index(lib, IndexConfig(min_candidates=1))
    return lib


def test_scan_with_many_ties_equals_brute_force(sample_library, tmp_path):
    """Wide ranges put thousands of rows at distance 0 (the midpoint L1 then decides); plain and
    pruned scans and the sorted walk, with and without filters, all equal the brute force exactly."""
    src = pq.read_table(sample_library / "prototypes.parquet")
    write_prototypes(tmp_path / "prototypes.parquet", perturb_prototypes(src, 5000, seed=4), ROW_GROUP_SIZE)
    build_index(tmp_path, IndexConfig())
    store = PrototypeStore.open(tmp_path, search="scan")
    table = pq.read_table(tmp_path / "prototypes.parquet", columns=["prototype_id", "channel_mean", "channel_max"])
    fw = _fw(store)
    wide = [{"AU45L": [0.0, 1.0]}, {"AU1": [0.0, 1.0], "yaw": [-60, 60]}, {"gaze_left": [0, 1], "AU45": 0.2}]
    walk = PrototypeStore.open(tmp_path, search="walk", walk_max_fraction=1.0)  # the walk, never the scan
    for prune_min_rows in (10**9, 0, -1):  # plain scan, pruned scan (large scans), the sorted walk
        store.scanner.prune_min_rows = max(prune_min_rows, 0)
        if prune_min_rows == -1:
            store = walk
        for i, targets in enumerate(wide + sample_queries(store.features, 60, seed=21)):
            kwargs = {"label": store.labels[i % len(store.labels)]} if i % 4 == 3 else {}
            got = store.query(targets, k=7, arrays=False, **kwargs)
            keep = None
            if kwargs:
                labels = pq.read_table(tmp_path / "prototypes.parquet", columns=["label"]).column("label").to_pylist()
                keep = np.asarray([lab == kwargs["label"] for lab in labels])
            pos, dist = _oracle(table, targets, fw, 7, keep)
            assert [m.prototype_id for m in got] == [table.column("prototype_id")[int(p)].as_py() for p in pos], targets
            np.testing.assert_allclose([m.distance for m in got], dist, atol=1e-9)


@pytest.mark.parametrize(
    "lib_fixture, search",
    [("sample_library", "scan"), ("sample_library", "walk")],
)
def test_exact_index_equals_brute_force(lib_fixture, search, request):
    """Every search path of the store (column scan; sorted walk) equals Eq. 3, filters included."""
    lib = request.getfixturevalue(lib_fixture)
    store = PrototypeStore.open(lib, search=search)
    assert store.meta["kind"] == "flat_l1"
    table = pq.read_table(lib / "prototypes.parquet")
    fw = _fw(store)
    labels = store.labels
    identities = sorted(set(x for x in table.column("identity").to_pylist() if x))
    rng = np.random.default_rng(3)
    for i, targets in enumerate(sample_queries(store.features, 120, seed=11)):
        kwargs = {}
        keep = np.ones(table.num_rows, dtype=bool)
        if i % 3 == 1:
            kwargs["label"] = labels[i % len(labels)]
            keep &= np.asarray(pc.equal(table.column("label"), kwargs["label"]).to_pylist(), dtype=bool)
        if i % 5 == 2:
            kwargs["min_frames"] = 20
            keep &= np.asarray(table.column("T").to_pylist()) >= 20
        if i % 7 == 3 and identities:
            kwargs["identity_exclude"] = [identities[int(rng.integers(len(identities)))]]
            keep &= ~np.isin(np.asarray(table.column("identity").to_pylist(), dtype=object), kwargs["identity_exclude"])
        k = int(rng.integers(1, 8))
        got = store.query(targets, k=k, arrays=False, **kwargs)
        pos, dist = _oracle(table, targets, fw, k, keep)
        assert [m.prototype_id for m in got] == [table.column("prototype_id")[int(p)].as_py() for p in pos], targets
        np.testing.assert_allclose([m.distance for m in got], dist, rtol=1e-6, atol=1e-7)
        assert all(a <= b for a, b in zip([m.distance for m in got], [m.distance for m in got][1:]))


@pytest.mark.parametrize("lib_fixture", ["sample_library", "small_candidates_library"])
def test_faiss_flat_index_with_certificate_equals_brute_force(lib_fixture, request):
    """The FAISS flat L1 index with the certificate (index.py; with min_candidates=1 it fetches in
    rounds) equals Eq. 3: the loop that IVF's nprobe tuning relies on."""
    lib = request.getfixturevalue(lib_fixture)
    flat = FaissSearch.open(lib)
    store = PrototypeStore.open(lib, search="scan")
    assert store.meta["kind"] == "flat_l1"
    table = pq.read_table(lib / "prototypes.parquet", columns=["prototype_id", "channel_mean", "channel_max"])
    fw = _fw(store)
    rng = np.random.default_rng(3)
    for targets in sample_queries(store.features, 120, seed=11):
        k = int(rng.integers(1, 8))
        pos, dist = flat.query(targets, k)
        want_pos, want_dist = _oracle(table, targets, fw, k)
        assert pos.tolist() == want_pos.tolist(), targets
        np.testing.assert_allclose(dist, want_dist, rtol=1e-6, atol=1e-7)


def test_range_targets_use_interval_distance(sample_library):
    store = PrototypeStore.open(sample_library)
    fw = _fw(store)
    j = CHANNEL_INDEX["AU45L"]
    mean, peak = store.features[:, j], store.features[:, N_CHANNELS + j]
    lo, hi = 0.3, 0.6
    best = store.query({"AU45L": [lo, hi]}, k=store.n, arrays=False)
    gap = lambda x: np.maximum(0, np.maximum(lo - x, x - hi))  # noqa: E731
    expected = np.sort(fw[j] * gap(mean) + fw[N_CHANNELS + j] * gap(peak))
    np.testing.assert_allclose([m.distance for m in best], expected, atol=1e-6)
    # a prototype whose mean and peak both lie inside the range scores exactly 0
    inside = np.flatnonzero((mean >= lo) & (mean <= hi) & (peak >= lo) & (peak <= hi))
    assert sum(m.distance == 0 for m in best) == len(inside)
    # a value target equals the degenerate range
    a = store.query({"AU45L": 0.5}, k=5, arrays=False)
    b = store.query({"AU45L": "0.5..0.5"}, k=5, arrays=False)
    assert [m.prototype_id for m in a] == [m.prototype_id for m in b]


def test_head_angles_scaled_and_aliases(sample_library):
    store = PrototypeStore.open(sample_library)
    fw = _fw(store)
    j = CHANNEL_INDEX["pitch"]
    res = store.query({"pitch": [-12, -5]}, k=3, arrays=False)
    m = res[0]
    gap = lambda x: max(0.0, -12 - x, x + 5)  # noqa: E731
    expected = (fw[j] * gap(m.channel_mean[j]) + fw[N_CHANNELS + j] * gap(m.channel_max[j]))
    assert m.distance == pytest.approx(expected, abs=1e-6)
    assert fw[j] == pytest.approx(fw[0] * 0.25 / HEAD_ANGLE_SCALE_DEG)  # head weight after the /30° scale
    both = store.query({"AU4": [0.1, 0.2]}, k=4, arrays=False)
    split = store.query({"AU4L": [0.1, 0.2], "AU4R": [0.1, 0.2]}, k=4, arrays=False)
    assert [x.prototype_id for x in both] == [x.prototype_id for x in split]


def test_filters_and_arrays(sample_library):
    store = PrototypeStore.open(sample_library)
    label = store.labels[0]
    res = store.query({"AU45L": [0.6, 1.0]}, label=label, k=5)
    assert res and all(m.label == label for m in res)
    for m in res:
        assert m.controls.shape == (m.T, N_CHANNELS)
        assert m.keypoints.shape == (m.T, 62, 2)
        np.testing.assert_allclose(m.controls.mean(axis=0), m.channel_mean, atol=1e-5)
    res = store.query({"AU45L": 1.0}, event_type="window", min_frames=10, k=5, arrays=False)
    assert all(m.event_type == "window" and m.T >= 10 for m in res)
    ident = res[0].identity
    res2 = store.query({"AU45L": 1.0}, event_type="window", identity_exclude=ident, k=50, arrays=False)
    assert res2 and all(m.identity != ident for m in res2)
    assert store.get(res[0].prototype_id).prototype_id == res[0].prototype_id
    stats = store.stats()
    assert stats["prototypes"] == store.n and sum(stats["labels"].values()) == store.n


def test_unknown_channel_and_label_errors(sample_library):
    store = PrototypeStore.open(sample_library)
    with pytest.raises(UnknownChannelError) as e:
        store.query({"AU6": 0.5})
    assert "AU45L" in str(e.value) and "gaze_left" in str(e.value)
    with pytest.raises(UnknownLabelError) as e:
        store.query({"AU45L": 0.5}, label="no-such-label")
    assert all(lab in str(e.value) for lab in store.labels)
    with pytest.raises(UnknownLabelError):
        store.query({"AU45L": 0.5}, event_type="sneeze")
    with pytest.raises(ValueError):
        store.query({"AU45L": [0.9, 0.1]})


def test_stale_index_is_an_error(sample_library, tmp_path):
    lib = tmp_path / "lib"
    shutil.copytree(sample_library, lib)
    PrototypeStore.open(lib)  # fresh copy opens
    table = pq.read_table(lib / "prototypes.parquet")
    # rewrite one row's keypoints only (not even the indexed features), keeping the file metadata
    kp = table.column("keypoints").to_pylist()
    kp[3][0][0] += 0.01
    table = table.set_column(table.schema.get_field_index("keypoints"), "keypoints", pa.array(kp, PROTOTYPES_SCHEMA.field("keypoints").type))
    pq.write_table(table, lib / "prototypes.parquet")
    with pytest.raises(StaleIndexError, match="stale index"):
        PrototypeStore.open(lib)
    with pytest.raises(StaleIndexError, match="stale index"):
        PrototypeStore.open(lib, verify="full")
    build_index(lib, IndexConfig())
    PrototypeStore.open(lib)  # rebuilding fixes it


def test_full_verify_catches_an_edit_that_restores_the_file_stat(sample_library, tmp_path):
    import os

    lib = tmp_path / "lib"
    shutil.copytree(sample_library, lib)
    build_index(lib, IndexConfig())
    path = lib / "prototypes.parquet"
    before = os.stat(path)
    table = pq.read_table(path)
    mean = table.column("channel_mean").to_pylist()
    mean[0][0] = mean[0][0] + 0.25
    table = table.set_column(table.schema.get_field_index("channel_mean"), "channel_mean",
                             pa.array(mean, PROTOTYPES_SCHEMA.field("channel_mean").type))
    pq.write_table(table, path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    with pytest.raises(StaleIndexError):
        PrototypeStore.open(lib, verify="full")


def test_empty_library_is_an_error(tmp_path):
    write_prototypes(tmp_path / "prototypes.parquet", PROTOTYPES_SCHEMA.empty_table(), ROW_GROUP_SIZE)
    with pytest.raises(EmptyLibraryError, match="0 prototypes"):
        build_index(tmp_path, IndexConfig())
    with pytest.raises(EmptyLibraryError, match="0 prototypes"):
        PrototypeStore.open(tmp_path)


def test_ivf_on_the_real_sample_library_within_measured_recall(sample_library, tmp_path):
    shutil.copy(sample_library / "prototypes.parquet", tmp_path / "prototypes.parquet")
    meta = build_index(tmp_path, IndexConfig(ivf_threshold=1, recall_queries=100))
    assert meta["kind"] == "ivf_flat_l1" and meta["recall_at_5"] >= 0.95
    ivf = FaissSearch.open(tmp_path)
    store = PrototypeStore.open(tmp_path, search="scan")
    table = pq.read_table(tmp_path / "prototypes.parquet", columns=["prototype_id", "channel_mean", "channel_max"])
    hits = total = 0
    for targets in sample_queries(store.features, 100, seed=77):
        _, got = ivf.query(targets, 5)
        _, dist = _oracle(table, targets, _fw(store), 5)
        hits += sum(d <= dist[-1] + 1e-9 for d in got)
        total += 5
    assert hits / total >= meta["recall_at_5"] - 0.05


def test_ivf_within_measured_recall(sample_library, tmp_path):
    src = pq.read_table(sample_library / "prototypes.parquet")
    write_prototypes(tmp_path / "prototypes.parquet", perturb_prototypes(src, 6000, seed=2), ROW_GROUP_SIZE)
    meta = build_index(tmp_path, IndexConfig(ivf_threshold=1000, recall_queries=100))
    assert meta["kind"] == "ivf_flat_l1" and 0 < meta["nprobe"] <= meta["nlist"]
    assert meta["recall_at_5"] >= 0.95
    ivf = FaissSearch.open(tmp_path)
    store = PrototypeStore.open(tmp_path, search="scan")
    table = pq.read_table(tmp_path / "prototypes.parquet", columns=["prototype_id", "channel_mean", "channel_max"])
    fw = _fw(store)
    hits = total = 0
    for targets in sample_queries(store.features, 100, seed=99):
        _, got = ivf.query(targets, 5)
        _, dist = _oracle(table, targets, fw, 5)
        assert len(got) == 5
        hits += sum(d <= dist[-1] + 1e-9 for d in got)
        total += 5
        # every returned distance is exact (re-ranked), never below the true optimum
        assert got[0] >= dist[0] - 1e-9
    assert hits / total >= meta["recall_at_5"] - 0.05
    # the default (auto) search scans this size exactly
    exact = PrototypeStore.open(tmp_path)
    for targets in sample_queries(store.features, 20, seed=98):
        _, dist = _oracle(table, targets, fw, 5)
        np.testing.assert_allclose([m.distance for m in exact.query(targets, k=5, arrays=False)], dist, atol=1e-7)


def test_prototype_store_imports_no_ray():
    code = "import sys, prototype_store, cogportrait.behavior.segment, cogportrait.behavior.sources; sys.exit('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_channels_vocabulary_unchanged():
    assert len(CONTROL_CHANNELS) == 17


def test_cli_query_json_stats_show(sample_library, tmp_path, capsys):
    import json

    from pipelines.cli import main

    store = PrototypeStore.open(sample_library)
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "library", "query", "--library", str(sample_library),
         "--label", store.labels[0], "--target", "AU45L=0.6..1.0", "--target", "pitch=-12..-5", "-k", "5", "--json"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(proc.stdout)  # exactly one JSON document
    assert isinstance(results, list) and 0 < len(results) <= 5
    dists = [r["distance"] for r in results]
    assert all(isinstance(d, float) for d in dists) and dists == sorted(dists)
    assert all(r["label"] == store.labels[0] for r in results)

    assert main(["library", "query", "--library", str(sample_library), "--target", "AU6=0.5", "--json"]) == 2
    err = capsys.readouterr().err
    assert "unknown channel 'AU6'" in err and "AU45L" in err
    assert main(["library", "query", "--library", str(sample_library), "--label", "nope", "--target", "AU45=1"]) == 2
    assert store.labels[0] in capsys.readouterr().err

    assert main(["library", "stats", str(sample_library)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["prototypes"] == store.n
    png = tmp_path / "p.png"
    assert main(["library", "show", str(sample_library), results[0]["prototype_id"], "--plot", str(png)]) == 0
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def _sequential_oracle(weighted: np.ndarray, q, k: int, keep: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 3 in float64 feature by feature, ordered by (D, midpoint L1, position) rounded to 1e-9."""
    d = np.zeros(len(weighted))
    l1 = np.zeros(len(weighted))
    for c in np.flatnonzero(q.mask):
        x = weighted[:, c]
        d += np.maximum(0.0, np.maximum(q.a[c] - x, x - q.b[c]))
        l1 += np.abs(x - q.mid[c])
    pos = np.arange(len(weighted)) if keep is None else np.flatnonzero(keep)
    order = np.lexsort((pos, np.round(l1[pos], 9), np.round(d[pos], 9)))[:k]
    return pos[order], d[pos[order]]


def _tied_features(n: int, seed: int) -> np.ndarray:
    """Native-unit [mean, peak] features with heavy ties: grid values, zeros, duplicated rows."""
    rng = np.random.default_rng(seed)
    f = np.empty((n, 2 * N_CHANNELS))
    for j in range(N_CHANNELS):
        head = CONTROL_CHANNELS[j] in HEAD_CHANNELS
        scale = HEAD_ANGLE_SCALE_DEG if head else 1.0
        base = rng.normal(0.2, 0.25, n) * scale
        if j % 3 == 0:  # a coarse grid: many exact ties
            base = np.round(base * 8 / scale) * scale / 8
        if not head:
            base = np.clip(base, 0.0, 1.0)  # AU/gaze rest at exactly 0
        f[:, j] = base
        f[:, N_CHANNELS + j] = base + np.abs(rng.normal(0, 0.05, n)) * scale * (j % 2)
    dup = rng.integers(0, n, n // 5)
    f[rng.integers(0, n, n // 5)] = f[dup]
    return f.astype(np.float32)


def _random_targets(features: np.ndarray, rng: np.random.Generator) -> dict:
    """1-6 channels; values (often exactly a grid or data value), ranges, far-away targets."""
    targets: dict = {}
    for j in rng.choice(N_CHANNELS, size=int(rng.integers(1, 7)), replace=False):
        name = CONTROL_CHANNELS[j]
        scale = HEAD_ANGLE_SCALE_DEG if name in HEAD_CHANNELS else 1.0
        kind = rng.integers(5)
        v = float(features[rng.integers(len(features)), j])
        if kind == 0:
            targets[name] = v  # exactly a data value
        elif kind == 1:
            targets[name] = round(v + rng.normal(0, 0.1) * scale, 3)
        elif kind == 2:
            half = float(rng.uniform(0.0, 0.3)) * scale
            targets[name] = [v - half, v + half]
        elif kind == 3:
            targets[name] = [0.0, float(rng.uniform(0, 1)) * scale]  # ranges from the rest value
        else:
            targets[name] = float(rng.choice([-3.0, 5.0])) * scale  # far outside the data
    return targets


@pytest.mark.parametrize("max_fraction", [1.0, 0.2, 0.01])
def test_sorted_walk_equals_brute_force_with_ties(max_fraction):
    """The sorted walk (walk.py) returns exactly the brute-force top k under the total order, with
    grid ties, duplicated rows, zeros, values, ranges, far targets, 1-6 channels, k 1-20, masks.
    max_fraction 1.0 always answers by the walk; small ones hand most queries to the caller (None)."""
    from prototype_store.retrieval import to_intervals, weighted_query
    from prototype_store.scan import ColumnScan
    from prototype_store.walk import SortedFeatures

    fw = feature_weights(1.0, 0.5, 0.25, 0.5, 0.5)
    feats = _tied_features(3000, seed=7)
    weighted = feats.astype(np.float64) * fw
    scan = ColumnScan(weighted)
    walk = SortedFeatures(scan.cols64, scan.cols32, seed_rows=16, max_fraction=max_fraction, intersect_min=64, threads=2)
    ids = np.arange(len(feats))
    rng = np.random.default_rng(int(max_fraction * 100))
    answered = 0
    for i in range(250):
        targets = _random_targets(feats, rng)
        q = weighted_query(to_intervals(targets), fw)
        k = int(rng.integers(1, 21))
        keep = None
        if i % 3 == 1:
            keep = rng.random(len(feats)) < rng.choice([0.9, 0.3, 0.02])
        got = walk.topk(q, k, ids, keep, None if keep is None else int(keep.sum()))
        if got is None:
            continue
        answered += 1
        pos, dist = _sequential_oracle(weighted, q, k, keep)
        assert got[0].tolist() == pos.tolist(), (targets, k)
        assert got[1].tolist() == dist.tolist()  # bit-identical: the scan's formula and order
        ref = scan.topk(q, k, ids, None if keep is None else np.flatnonzero(keep))
        assert got[0].tolist() == ref[0].tolist() and got[1].tolist() == ref[1].tolist()
    if max_fraction == 1.0:
        assert answered >= 150  # selective masks (windows wider than the allowed rows) go back to the scan
    scan.close()


def test_walk_is_the_default_for_large_libraries(sample_library, tmp_path):
    """search=auto sorts at open from walk_min_rows rows and walks; selective filters scan; the
    answers equal the scan's, fallbacks included."""
    auto = PrototypeStore.open(sample_library, walk_min_rows=1)
    assert auto._walker is not None
    small = PrototypeStore.open(sample_library)  # 333 rows < walk_min_rows: plain scan, nothing sorted
    assert small._walker is None
    scan = PrototypeStore.open(sample_library, search="scan")
    tight = PrototypeStore.open(sample_library, search="walk", walk_max_fraction=0.0)  # always hands over
    with pytest.raises(ValueError, match="search"):
        PrototypeStore.open(sample_library, search="index")  # FAISS is built and measured, never queried
    for i, targets in enumerate(sample_queries(auto.features, 40, seed=5)):
        kwargs = {"label": auto.labels[i % len(auto.labels)]} if i % 2 else {}
        ref = [(m.prototype_id, m.distance) for m in scan.query(targets, k=6, arrays=False, **kwargs)]
        for store in (auto, small, tight):
            assert [(m.prototype_id, m.distance) for m in store.query(targets, k=6, arrays=False, **kwargs)] == ref


# ------------------------------------------------------------------------------------------------
# fetching arrays: the controls sidecar, keypoints from their row groups, the `arrays` choice
# ------------------------------------------------------------------------------------------------
ARRAY_CHOICES = [True, False, None, "controls", "keypoints", ("controls",), ["keypoints", "controls"]]


def _nested(rows: list[np.ndarray | None], inner: int) -> pa.Array:
    """list<fixed_size_list<float32>[inner]> from per-row (T, inner) arrays; None = a null row."""
    lengths = [0 if r is None else len(r) for r in rows]
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    flat = np.concatenate([r.reshape(-1) for r in rows if r is not None]).astype(np.float32)
    values = pa.FixedSizeListArray.from_arrays(pa.array(flat), inner)
    return pa.ListArray.from_arrays(offsets, values, mask=pa.array([r is None for r in rows]))


def _arrays_table(n: int, seed: int) -> pa.Table:
    """n prototypes of 0-40 frames with distinct random controls and keypoints, a null row of each."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 41, n)
    lengths[7] = 0  # an empty prototype: zero-frame arrays
    ctrl = [rng.random((t, N_CHANNELS), dtype=np.float32) for t in lengths]
    kps = [rng.random((t, 62 * 2), dtype=np.float32) for t in lengths]
    kps[11] = None  # null keypoints: read as zero frames
    ctrl[13] = None
    mean = np.stack([c.mean(axis=0) if c is not None and len(c) else np.zeros(N_CHANNELS, np.float32) for c in ctrl])
    peak = np.stack([c.max(axis=0) if c is not None and len(c) else np.zeros(N_CHANNELS, np.float32) for c in ctrl])
    return pa.table({
        "prototype_id": [f"p{i:05d}" for i in range(n)],
        "label": [f"label{i % 3}" for i in range(n)],  # the sort by label interleaves the ids
        "event_type": ["window"] * n,
        "clip_id": [f"c{i % 17}" for i in range(n)],
        "video_id": [f"v{i % 5}" for i in range(n)],
        "identity": [f"id{i % 4}" for i in range(n)],
        "start_frame": np.zeros(n, dtype=np.int32),
        "end_frame": lengths.astype(np.int32),
        "T": lengths.astype(np.int32),
        "controls": _nested(ctrl, N_CHANNELS),
        "keypoints": _nested(kps, 62 * 2),
        "channel_mean": pa.FixedSizeListArray.from_arrays(pa.array(mean.reshape(-1)), N_CHANNELS),
        "channel_max": pa.FixedSizeListArray.from_arrays(pa.array(peak.reshape(-1)), N_CHANNELS),
        "face_coverage": np.ones(n, dtype=np.float32),
        "mean_residual_error": np.zeros(n, dtype=np.float32),
        "quality_flags": [[] for _ in range(n)],
    })


@pytest.fixture(scope="module")
def arrays_library(tmp_path_factory):
    """600 variable-length prototypes in 64-row groups (10 groups), indexed: sidecar and Parquet."""
    lib = tmp_path_factory.mktemp("lib_arrays")
    write_prototypes(lib / "prototypes.parquet", _arrays_table(600, seed=3), 64)
    build_index(lib, IndexConfig())
    assert pq.ParquetFile(lib / "prototypes.parquet").num_row_groups == 10
    return lib


def _brute_rows(parquet, positions) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(id, controls (T, 17), keypoints (T, 62, 2)) of each position, read row by row from the file."""
    table = pq.read_table(parquet, columns=["prototype_id", "controls", "keypoints"])
    out = []
    for p in positions:
        row = table.slice(int(p), 1).to_pylist()[0]
        ctrl = np.asarray(row["controls"] or [], dtype=np.float32).reshape(-1, N_CHANNELS)
        kps = np.asarray(row["keypoints"] or [], dtype=np.float32).reshape(-1, 62, 2)
        out.append((row["prototype_id"], ctrl, kps))
    return out


def _assert_fetch_equals_file(store: PrototypeStore, positions, arrays) -> None:
    want_ctrl = arrays is True or arrays == "controls" or (isinstance(arrays, (tuple, list)) and "controls" in arrays)
    want_kps = arrays is True or arrays == "keypoints" or (isinstance(arrays, (tuple, list)) and "keypoints" in arrays)
    got = store.fetch(np.asarray(positions), arrays=arrays)
    assert len(got) == len(positions)
    for rank, (m, (pid, ctrl, kps)) in enumerate(zip(got, _brute_rows(store.parquet, positions)), start=1):
        assert (m.rank, m.prototype_id) == (rank, pid)
        if want_ctrl:
            assert m.controls.dtype == np.float32 and m.controls.shape == (len(ctrl), N_CHANNELS)
            assert np.array_equal(m.controls, ctrl)
        else:
            assert m.controls is None
        if want_kps:
            assert m.keypoints.dtype == np.float32 and m.keypoints.shape == (len(kps), 62, 2)
            assert np.array_equal(m.keypoints, kps)
        else:
            assert m.keypoints is None


def _position_sets(n: int) -> list[list[int]]:
    rng = np.random.default_rng(11)
    return [
        [0], [n - 1], [63, 64, 127, 128],  # first and last rows, both sides of group boundaries
        rng.integers(0, n, 12).tolist(),  # rows in many groups, unsorted
        [5, n - 1, 5, 0, 5],  # duplicates keep their order
        [7, 11, 13],  # zero frames, null keypoints, null controls
        rng.permutation(n)[:5].tolist(),
    ]


@pytest.mark.parametrize("arrays", ARRAY_CHOICES)
def test_fetch_equals_a_row_by_row_read_of_the_parquet(arrays_library, arrays):
    store = PrototypeStore.open(arrays_library)
    assert store._controls is not None  # controls come from the sidecar
    for positions in _position_sets(store.n):
        _assert_fetch_equals_file(store, positions, arrays)
    store.close()


def test_fetch_without_the_sidecar_reads_the_parquet(arrays_library, tmp_path, caplog):
    """An index built before the sidecar existed still opens and fetches the same arrays."""
    import json

    lib = tmp_path / "lib"
    shutil.copytree(arrays_library, lib)
    meta_path = lib / "index" / "meta.json"
    meta = json.loads(meta_path.read_text())
    info = meta.pop("controls_sidecar")
    meta_path.write_text(json.dumps(meta))
    for name in (info["values"], info["offsets"]):
        (lib / "index" / name).unlink()
    with caplog.at_level("WARNING", logger="cogportrait.prototype_store"):
        store = PrototypeStore.open(lib)
    assert store._controls is None and "without the controls sidecar" in caplog.text
    for arrays in (True, "controls"):
        for positions in _position_sets(store.n):
            _assert_fetch_equals_file(store, positions, arrays)


def test_the_sidecar_is_checked_and_rebuilt_with_the_index(arrays_library, tmp_path):
    import json

    lib = tmp_path / "lib"
    shutil.copytree(arrays_library, lib)
    meta = json.loads((lib / "index" / "meta.json").read_text())
    info = meta["controls_sidecar"]
    total = int(pc.sum(pc.list_value_length(pq.read_table(lib / "prototypes.parquet").column("controls"))).as_py())
    assert (info["rows"], info["frames"]) == (600, total)
    values = lib / "index" / info["values"]
    assert values.stat().st_size == total * N_CHANNELS * 4
    original = values.read_bytes()
    # a rebuild of the same Parquet writes the same bytes (and the same meta record)
    build_index(lib, IndexConfig())
    assert values.read_bytes() == original
    assert json.loads((lib / "index" / "meta.json").read_text())["controls_sidecar"] == info
    # a truncated sidecar is refused at every open
    values.write_bytes(original[:-4])
    with pytest.raises(StaleIndexError, match="controls sidecar"):
        PrototypeStore.open(lib)
    # a same-size edit passes the cheap checks; verify="full" rehashes and refuses it
    edited = bytearray(original)
    edited[100] ^= 0xFF
    values.write_bytes(bytes(edited))
    PrototypeStore.open(lib)
    with pytest.raises(StaleIndexError, match="edited after indexing"):
        PrototypeStore.open(lib, verify="full")
    values.unlink()
    with pytest.raises(StaleIndexError, match="lacks the controls sidecar"):
        PrototypeStore.open(lib)
    # new content: the Parquet's staleness check refuses the old index, the rebuild serves the new rows
    write_prototypes(lib / "prototypes.parquet", _arrays_table(300, seed=4), 64)
    with pytest.raises(StaleIndexError, match="stale index"):
        PrototypeStore.open(lib)
    build_index(lib, IndexConfig())
    store = PrototypeStore.open(lib, verify="full")
    _assert_fetch_equals_file(store, [0, 150, 299, 150], "controls")


def test_arrays_choice_is_validated_and_passed_through_query(arrays_library):
    store = PrototypeStore.open(arrays_library)
    for bad in ("kp", ("controls", "frames"), 3):
        with pytest.raises((ValueError, TypeError), match="arrays"):
            store.fetch(np.array([0]), arrays=bad)
    with pytest.raises(ValueError, match="arrays"):
        store.query({"AU45L": 0.5}, k=3, arrays="everything")
    targets = {"AU45L": [0.4, 0.6], "pitch": [-5, 5]}
    full = store.query(targets, k=5)  # arrays=True stays the default: both arrays
    assert all(m.controls is not None and m.keypoints is not None for m in full)
    ctrl = store.query(targets, k=5, arrays="controls")
    assert [m.prototype_id for m in ctrl] == [m.prototype_id for m in full]
    for a, b in zip(ctrl, full):
        assert b.keypoints is not None and a.keypoints is None and np.array_equal(a.controls, b.controls)
    kps = store.query(targets, k=5, arrays=("keypoints",))
    assert all(m.controls is None and np.array_equal(m.keypoints, b.keypoints) for m, b in zip(kps, full))
    assert all(m.controls is None and m.keypoints is None for m in store.query(targets, k=5, arrays=False))
    got = store.get(full[2].prototype_id, arrays="controls")
    assert got.prototype_id == full[2].prototype_id and np.array_equal(got.controls, full[2].controls)
    with pytest.raises(KeyError, match="no prototype"):
        store.get("no-such-id")


def test_fetched_arrays_are_owned_copies(arrays_library):
    """The composer rescales what it fetched: no array aliases another result, the sidecar or a later fetch."""
    store = PrototypeStore.open(arrays_library)
    first = store.fetch(np.array([20, 20, 300]), arrays=True)
    reference = [m.controls.copy() for m in first]
    for m in first:
        assert m.controls.flags.writeable and m.keypoints.flags.writeable
    first[0].controls *= 2.0
    first[0].keypoints[:] = 0.0
    assert np.array_equal(first[1].controls, reference[1])  # the duplicate was not touched
    again = store.fetch(np.array([20]), arrays=True)[0]
    assert np.array_equal(again.controls, reference[0]) and again.keypoints.any()
    store.close()  # a closed store re-opens its file when asked again
    _assert_fetch_equals_file(store, [0, 599], True)


def test_fetch_on_the_real_sample_library(sample_library):
    """Every row of the real library: sidecar controls and row-group keypoints equal the file's."""
    store = PrototypeStore.open(sample_library)
    assert store._controls is not None
    _assert_fetch_equals_file(store, list(range(store.n)) + [0, store.n - 1], True)
