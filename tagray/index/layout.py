"""The linear heads' shard layout, exact for the AND-product ranking (seed 001 §5.3).

A query of tags t₁…t_m ranks images by Π_j P(z_{t_j}=1|x) — the sum of log P(z=1|x) rows.
Each shard keeps log P(z=1|x) of its n images tag-major, (T, n) float16, clipped to [-60, 0]:
a query reads m contiguous rows of its shard, 2 bytes per image per tag. The ranking is exact
with respect to the stored values: every shard sums the same float16 rows in the same order
in float32, so an image's score is one number whichever shard holds it, and merging the
shards' top-n by (-score, global row) equals the unsharded ranking (tests/test_index_shards.py).

The alternative measured here, int8 log-probabilities (a per-tag affine code over the row's
range, 1 byte per image per tag), is not exact: `quantisation_loss` measures what it loses
(recall@k and rank agreement against float16) and benchmarks/index_build.py reports it.
"""

from __future__ import annotations

import numpy as np

LOG_P_MIN = -60.0  # log P(z=1|x) is clipped here (P < 1e-26 ranks as 1e-26)
LAYOUT = "log_p_float16_tag_major"


def to_layout(log_true: np.ndarray) -> np.ndarray:
    """(B, T) log P(z=1|x) of a batch → its (T, B) float16 columns of the shard."""
    return np.ascontiguousarray(np.asarray(log_true, np.float32).clip(LOG_P_MIN, 0).T.astype(np.float16))


def and_scores(log_p: np.ndarray, columns: list[int]) -> np.ndarray:
    """Σ_j log P(z_{t_j}=1|x) for every image of a (T, n) layout: float32, summed in query order."""
    total = log_p[columns[0]].astype(np.float32)
    for c in columns[1:]:
        total += log_p[c]
    return total


def top_rows(total: np.ndarray, n: int) -> np.ndarray:
    """Indices of the n largest values of `total` (−inf excluded), by value descending and
    index ascending among equal values — an exact, deterministic top-n (ties at the cut are
    broken by the lower index, i.e. the lower global row within a shard).

    Above SAMPLED_ABOVE values it first keeps the candidates ≥ t, where t is the n-th largest of
    a strided sample (every SAMPLE_STRIDE-th value). A sample's n-th largest is at most the whole
    array's, so every one of the top n (and every tie at the cut) is a candidate: the answer is
    the same, from one comparison pass and a partition of ~n·SAMPLE_STRIDE candidates instead of
    a partition of all the values (BENCHMARKS, *Search over HTTP, sharded*)."""
    size = len(total)
    if n <= 0 or size == 0:
        return np.zeros(0, np.int64)
    if size > SAMPLED_ABOVE and n * SAMPLE_STRIDE * 4 <= size:
        sample = total[::SAMPLE_STRIDE]
        t = np.partition(sample, len(sample) - n)[len(sample) - n]
        if np.isfinite(t):
            cand = np.flatnonzero(total >= t)  # NaN and −inf fall out: t is finite
            return cand[_exact_top(total[cand], n)]
    return _exact_top(total, n)


SAMPLED_ABOVE = 1 << 16  # arrays longer than this take top_rows' sampled threshold first
SAMPLE_STRIDE = 64
CANDIDATES_AT_MOST = 16  # top_and gathers candidates only when the sample says ≤ 1/16 of the images are


def _exact_top(total: np.ndarray, n: int) -> np.ndarray:
    """top_rows by one partition of all the values (−inf excluded)."""
    finite = np.isfinite(total)
    avail = int(finite.sum()) if not finite.all() else len(total)
    n = min(n, avail)
    if n <= 0:
        return np.zeros(0, np.int64)
    if n < len(total):
        kth = np.partition(total, len(total) - n)[len(total) - n]  # the n-th largest value
        above = np.flatnonzero(total > kth)
        at = np.flatnonzero(total == kth)[: n - len(above)]
        cand = np.concatenate([above, at])
    else:
        cand = np.flatnonzero(finite)
    order = np.lexsort((cand, -total[cand].astype(np.float64)))
    return cand[order]


def top_and(log_p: np.ndarray, columns: list[int], n: int, mask: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """(rows, Σ_j log P of those rows): the exact top n of `and_scores(log_p, columns)` among the
    rows `mask` keeps (None: all), in `top_rows`' order, with the same float32 sums.

    Every log P is ≤ 0, so an image whose sum reaches t has every one of its m values ≥ t. With t
    the n-th largest sum of a strided sample of the images (at most the n-th largest of all of
    them), the candidates are the images whose values are all ≥ t: found by comparing the float16
    bit patterns with t's as integers (for values ≤ 0 a larger pattern is a more negative value),
    tag by tag, the most selective tag of the sample first. Only the candidates are summed and
    ranked; the others cannot be in the top n, so the answer equals summing every image (tests/
    test_index_shards.py). On 10M images that is one integer pass over one row instead of m
    float16 → float32 passes and a partition of all the sums (BENCHMARKS, *Search over HTTP*)."""
    size = log_p.shape[1] if log_p.ndim == 2 else 0
    if (log_p.dtype == np.float16 and size > SAMPLED_ABOVE and n * SAMPLE_STRIDE * 4 <= size
            and (found := _candidates(log_p, columns, n, mask)) is not None):
        total = _sum_rows(log_p, columns, found)
        local = _exact_top(total, n)
        return found[local], total[local]
    total = and_scores(log_p, columns)
    if mask is not None:
        total[~mask] = -np.inf
    rows = top_rows(total, n)
    return rows, total[rows]


def _sum_rows(log_p: np.ndarray, columns: list[int], rows: np.ndarray | slice) -> np.ndarray:
    """and_scores of `rows` (indices or a slice) only: the same float32 sums, in query order."""
    total = log_p[columns[0], rows].astype(np.float32)
    for c in columns[1:]:
        total += log_p[c, rows]
    return total


def _candidates(log_p: np.ndarray, columns: list[int], n: int, mask: np.ndarray | None) -> np.ndarray | None:
    """The rows (ascending) whose every value in `columns` is ≥ the sample's n-th largest sum;
    None when the sample gives no usable bound (then the caller sums every image)."""
    step = slice(None, None, SAMPLE_STRIDE)
    sample = _sum_rows(log_p, columns, step)
    if mask is not None:
        sample[~mask[step]] = -np.inf
    t = float(np.partition(sample, len(sample) - n)[len(sample) - n])
    if not (np.isfinite(t) and t < 0):
        return None
    t16 = np.float16(t)
    if float(t16) > t:  # round down, so that every value ≥ t is ≥ t16
        t16 = np.nextafter(t16, np.float16(-np.inf))
    bound = t16.view(np.uint16)  # negative float16: value ≥ t16 ⇔ pattern ≤ bound (and 0, +0 ≤ bound too)
    bits = log_p.view(np.uint16)
    order = sorted(dict.fromkeys(columns), key=lambda c: int(np.count_nonzero(bits[c, step] <= bound)))
    kept = np.ones(len(sample), bool)
    for c in order:
        kept &= bits[c, step] <= bound
    if np.count_nonzero(kept) * SAMPLE_STRIDE > log_p.shape[1] // CANDIDATES_AT_MOST:
        return None  # a weak bound (common tags beside rare ones): summing every image is faster than gathers
    rows = np.flatnonzero(bits[order[0]] <= bound)
    for c in order[1:]:
        rows = rows[bits[c, rows] <= bound]
    if mask is not None:
        rows = rows[mask[rows]]
    return rows


# --- the measured alternative: int8 codes --------------------------------------------------------

def quantise_int8(log_p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per tag row an affine int8 code over [row min, 0]: (codes (T, n) int8, scale (T,), offset (T,))."""
    lp = log_p.astype(np.float32)
    lo = lp.min(axis=1)
    scale = np.where(lo < 0, -lo / 255.0, 1.0).astype(np.float32)
    codes = np.round((lp - lo[:, None]) / scale[:, None]) - 128
    return codes.clip(-128, 127).astype(np.int8), scale, lo


def dequantise_int8(codes: np.ndarray, scale: np.ndarray, lo: np.ndarray) -> np.ndarray:
    return ((codes.astype(np.float32) + 128) * scale[:, None] + lo[:, None]).astype(np.float32)


def quantisation_loss(log_p: np.ndarray, queries: list[list[int]], k: int = 20) -> dict:
    """What int8 codes lose against the float16 layout on `queries`: mean recall@k of the exact
    top-k, the share of queries whose top-k is the same list in the same order, and bytes/image/tag."""
    codes, scale, lo = quantise_int8(log_p)
    approx = dequantise_int8(codes, scale, lo)
    recall, same = [], []
    for cols in queries:
        exact = top_rows(and_scores(log_p, cols), k)
        total = approx[cols[0]].copy()
        for c in cols[1:]:
            total += approx[c]
        got = top_rows(total, k)
        recall.append(len(set(exact.tolist()) & set(got.tolist())) / max(1, len(exact)))
        same.append(bool(np.array_equal(exact, got)))
    return {"k": k, "queries": len(queries), "recall_at_k": float(np.mean(recall)),
            "same_top_k_order": float(np.mean(same)), "bytes_per_image_tag": {"float16": 2, "int8": 1}}
