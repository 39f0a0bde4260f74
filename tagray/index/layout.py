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
    broken by the lower index, i.e. the lower global row within a shard)."""
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
