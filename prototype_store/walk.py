"""Exact Eq. 3 top-k from per-feature sorted orders: a seed, sorted windows, intersection, pruning.

Why: a scan touches every row (at 1e6 rows one partial sort alone costs ~2 ms on the reference
box), while the top k of a target lies close to its intervals in *every* targeted feature. Each
feature's float64 values are sorted once (``SortedFeatures``, built at ``PrototypeStore.open``:
int32 positions plus float32 values, 8 bytes per row and feature). A query then

1. **seeds**: binary-searches every targeted feature's interval midpoint, takes the ``seed_rows``
   nearest rows on each side, keeps the 2k most promising by a float32 distance and takes their
   exact keys. Any k real rows bound the true k-th key (D_k, L_k) from above;
2. **windows**: a row that ties or beats the k-th key under the store's order (D, then midpoint
   L1, then position, compared rounded to 1e-9) has D <= D_k + 1.1e-9 =: T, and every feature's
   term (non-negative, summed in float) is <= D, so its value lies in [a_f - T, b_f + T]; when
   round(D_k) = 0 it also has L <= L_k + 1.1e-9, so |x_f - m_f| <= that. Each bound is one
   contiguous window of the feature's sorted order (found with a margin far above float32
   rounding), and every row that can make the top k lies in all of them;
3. **intersects** the smallest window with the next ones (one feature per channel first: a
   channel's mean and peak are correlated) through a bitmap while that is cheaper than gathering;
4. **prunes** the rows left (after the filter mask) by float32 partial sums over the targeted
   features (lower bounds of D, and of L at zero ties) against the bounds plus float32 slack;
5. **ranks** the survivors with the scan's own float64 formula and ``rank``, so results and
   distances are bit-identical to the scan's.

When the smallest window exceeds ``max_fraction`` of the allowed rows (a target in a dense
region, or a selective filter) the caller scans instead (``None`` is returned). Pure numpy, no Ray.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from prototype_store.retrieval import WeightedQuery, rank

F32_TOL = 2e-5  # as in scan.py: >= accumulated float32 rounding of a partial distance
ROUND_SLACK = 1.1e-9  # rank() compares values rounded to 1e-9: a tie may exceed the k-th by < 1e-9
WINDOW_MARGIN = 1e-6  # relative margin of the float32 windows (float32 rounding is ~6e-8)


class SortedFeatures:
    """Per-feature sort orders of the weighted feature columns, and the exact top-k query on them."""

    def __init__(
        self, cols64: np.ndarray, cols32: np.ndarray, seed_rows: int = 256, max_fraction: float = 0.2,
        intersect_min: int = 2048, intersect_ratio: float = 4.0, threads: int = 1,
    ) -> None:
        self.cols64 = cols64  # (F, N) float64: the exact values, shared with the scan
        self.cols32 = cols32  # (F, N) float32: for the pruning gathers
        self.n = cols64.shape[1]
        f = cols64.shape[0]
        self.perm = np.empty((f, self.n), dtype=np.int32)
        self.sorted32 = np.empty((f, self.n), dtype=np.float32)

        def sort_feature(c: int) -> None:
            # sorting the float64 values keeps float32 ties in float64 order (windows stay exact)
            self.perm[c] = np.argsort(cols64[c], kind="stable")
            np.take(cols32[c], self.perm[c], out=self.sorted32[c])

        if threads > 1 and f > 1:  # numpy sorts release the GIL
            with ThreadPoolExecutor(max_workers=threads) as pool:
                list(pool.map(sort_feature, range(f)))
        else:
            for c in range(f):
                sort_feature(c)
        self.absmax = np.abs(cols64).max(axis=1) if self.n else np.zeros(f)
        self.channels = f // 2  # features are [mean (channels), peak (channels)]
        self._mark = np.zeros(self.n, dtype=bool)
        self._lock = threading.Lock()
        self.intersect_min = intersect_min
        self.intersect_ratio = intersect_ratio
        self.seed_rows = seed_rows
        self.max_fraction = max_fraction

    def _intersect(self, pos: np.ndarray, window: np.ndarray) -> np.ndarray:
        """Rows of ``window`` that are in ``pos`` (both duplicate-free), via a reusable bitmap."""
        if self._lock.acquire(blocking=False):
            mark = self._mark
            try:
                np.put(mark, pos, True)
                return window[np.take(mark, window)]
            finally:
                np.put(mark, pos, False)  # the bitmap must be clean for the next query, whatever happened
                self._lock.release()
        mark = np.zeros(self.n, dtype=bool)  # another thread holds the shared bitmap
        np.put(mark, pos, True)
        return window[np.take(mark, window)]

    @property
    def nbytes(self) -> int:
        return self.perm.nbytes + self.sorted32.nbytes

    def _window(self, c: int, lo: float, hi: float) -> tuple[int, int]:
        """[start, end) of the sorted order of feature c holding every value in [lo, hi] (with margin)."""
        margin = WINDOW_MARGIN * (1.0 + abs(lo) + abs(hi))
        s32 = self.sorted32[c]
        start = int(np.searchsorted(s32, np.float32(lo - margin), side="left"))
        end = int(np.searchsorted(s32, np.float32(hi + margin), side="right"))
        return start, end

    def _exact(self, q: WeightedQuery, cols: np.ndarray, mid: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float64 D and midpoint L1 of the rows at ``pos``: the scan's formula, in the scan's order."""
        d = np.zeros(len(pos))
        l1 = np.zeros(len(pos))
        for c in cols:
            x = np.take(self.cols64[c], pos)  # np.take: ~2x faster than cols64[c, pos]
            d += np.maximum(0.0, np.maximum(q.a[c] - x, x - q.b[c]))
            l1 += np.abs(x - mid[c])
        return d, l1

    def topk(
        self, q: WeightedQuery, k: int, ids: np.ndarray, mask: np.ndarray | None = None, n_allowed: int | None = None
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Positions and exact distances of the top k (rows where ``mask`` is True), or None: scan.

        ``n_allowed`` is the mask's count (all rows without a mask).
        """
        n_allowed = self.n if n_allowed is None else n_allowed
        k = min(k, n_allowed)
        if k <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        cols = np.flatnonzero(q.mask)
        mid = q.mid
        # 1. seed: the rows nearest the midpoints in each feature, deduplicated
        half = max(self.seed_rows, 4 * k)
        if mask is not None:
            half = int(min(self.n, half * max(1.0, self.n / max(n_allowed, 1))))
        centres = [int(np.searchsorted(self.sorted32[c], np.float32(mid[c]))) for c in cols]
        seed = np.sort(np.concatenate([self.perm[c, max(0, p - half) : p + half] for c, p in zip(cols, centres)]).astype(np.intp))
        if len(seed) > 1:
            seed = seed[np.concatenate(([True], seed[1:] != seed[:-1]))]  # dedupe (np.unique hashes: slower)
        if mask is not None:
            seed = seed[np.take(mask, seed)]
        if len(seed) < k:
            return None
        if len(seed) > 8 * k:
            # any k real rows bound the k-th key from above: pick likely-good ones in float32
            # (cheaper gathers), then take their exact keys
            d32 = np.zeros(len(seed), dtype=np.float32)
            l32 = np.zeros(len(seed), dtype=np.float32)
            for c in cols:
                x = np.take(self.cols32[c], seed)
                d32 += np.maximum(np.maximum(np.float32(q.a[c]) - x, x - np.float32(q.b[c])), np.float32(0.0))
                l32 += np.abs(x - np.float32(mid[c]))
            d32 += np.float32(1e-3) * l32
            seed = seed[np.argpartition(d32, 2 * k)[: 2 * k]]
        d, l1 = self._exact(q, cols, mid, seed)
        top = rank(d, l1, ids[seed], k)
        d_k, l_k = float(d[top[-1]]), float(l1[top[-1]])
        t_d = d_k + ROUND_SLACK
        t_l = l_k + ROUND_SLACK
        ties_at_zero = float(np.round(d_k, 9)) == 0.0
        # 2. windows: every row that can tie or beat the k-th lies inside each one
        windows = []
        for c in cols:
            start, end = self._window(c, q.a[c] - t_d, q.b[c] + t_d)
            if ties_at_zero:
                s2, e2 = self._window(c, mid[c] - t_l, mid[c] + t_l)
                start, end = max(start, s2), min(end, e2)
            windows.append((max(0, end - start), start, end, c))
        # smallest first, but one feature per channel before the second ones: a channel's mean and
        # peak are correlated, so intersecting them removes little
        windows.sort()
        seen_ch: set[int] = set()
        firsts, seconds = [], []
        for w in windows:
            ch = int(w[3]) % self.channels
            (seconds if ch in seen_ch else firsts).append(w)
            seen_ch.add(ch)
        windows = firsts + seconds
        size, start, end, first = windows[0]
        if size > self.max_fraction * n_allowed:
            return None
        pos = self.perm[first, start:end].astype(np.intp)  # numpy converts int32 indices per gather
        if mask is not None:
            pos = pos[np.take(mask, pos)]
        # 3. intersect with the next windows while that is cheaper than gathering their values
        for size, start, end, c in windows[1:]:
            if len(pos) <= self.intersect_min:
                break
            if size <= self.intersect_ratio * len(pos):
                pos = self._intersect(pos, self.perm[c, start:end].astype(np.intp))
        # 4. prune with float32 partial sums (lower bounds of D and, at zero ties, of L)
        # float32 slack scaled by the magnitudes involved (targets far outside the data included)
        scale = 1.0 + float(np.sum(np.abs(q.a[cols]) + np.abs(q.b[cols]) + self.absmax[cols]))
        lim_d = np.float32(t_d + F32_TOL * (scale + t_d))
        lim_l = np.float32(t_l + F32_TOL * (scale + t_l))
        part_d = np.zeros(len(pos), dtype=np.float32)
        part_l = np.zeros(len(pos), dtype=np.float32) if ties_at_zero else None
        for _, _, _, c in windows:
            x = np.take(self.cols32[c], pos)
            g = np.maximum(np.maximum(np.float32(q.a[c]) - x, x - np.float32(q.b[c])), np.float32(0.0))
            part_d += g
            alive = part_d <= lim_d
            if part_l is not None:
                part_l += np.abs(x - np.float32(mid[c]))
                alive &= part_l <= lim_l
                part_l = part_l[alive]
            pos, part_d = pos[alive], part_d[alive]
        # 5. exact rank of the survivors (the seed's top k is among them: it satisfies every bound)
        pos = pos.astype(np.int64)
        d, l1 = self._exact(q, cols, mid, pos)
        top = rank(d, l1, ids[pos], k)
        return pos[top], d[top]
