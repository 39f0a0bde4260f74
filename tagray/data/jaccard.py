"""M nearest images by Jaccard distance on metadata (seed 003 §3.1, eq. 3):

    d(x, x') = 1 − |t_x ∩ t_x'| / |t_x ∪ t_x'|

where t_x is an image's set of tags (limited to the τ most frequent), photo-sets or groups.

Never an N×N matrix: the images' sets are a sparse N×V indicator matrix A, its transpose is
an inverted index (metadata value → images), and a chunk of query rows Q is scored by the
sparse product Q·Aᵀ, which visits only the images that share a value with each query.
Cost: Σ_q Σ_{t ∈ t_q} |posting(t)| — linear in N for a fixed vocabulary distribution, but
dominated by the most frequent values (why τ caps the tag vocabulary). Chunks are sized so
that at most `max_pairs` candidate pairs are held at once.

Images that share nothing with x (d = 1) are never neighbours: such a slot is −1 with
distance 1. An image is never its own neighbour. Ties are broken by the lower row index,
so the result is deterministic and equal to brute force (`jaccard_neighbors_brute`).
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

log = logging.getLogger(__name__)

NO_NEIGHBOR = -1


def metadata_vocabulary(lists: pa.Array | pa.ChunkedArray, top: int | None = None) -> np.ndarray:
    """Distinct values of the lists, most frequent first (ties by value); the `top` most frequent
    when given (seed 003: the τ most frequent tags of the training set)."""
    flat = pc.list_flatten(lists)
    if len(flat) == 0:
        return np.zeros(0, dtype=object)
    counts = pc.value_counts(flat)
    values = counts.field("values").to_numpy(zero_copy_only=False)
    n = counts.field("counts").to_numpy()
    order = np.lexsort((values.astype(str), -n))
    return values[order][:top] if top else values[order]


def indicator_matrix(lists: pa.Array | pa.ChunkedArray, vocabulary: np.ndarray) -> sp.csr_matrix:
    """(N, V) binary CSR: row i marks the vocabulary values in image i's list (others ignored)."""
    arr = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    n = len(arr)
    rows = pc.list_parent_indices(arr).to_numpy()
    idx = pc.index_in(pc.list_flatten(arr), value_set=pa.array(vocabulary, type=arr.type.value_type))
    keep = pc.is_valid(idx).to_numpy(zero_copy_only=False)
    rows, cols = rows[keep], pc.fill_null(idx, -1).to_numpy()[keep].astype(np.int64)
    a = sp.csr_matrix((np.ones(len(rows), np.int32), (rows, cols)), shape=(n, len(vocabulary)))
    a.sum_duplicates()
    a.data[:] = 1
    return a


def top_m(rows: np.ndarray, cols: np.ndarray, sim: np.ndarray, n_rows: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the m candidates of highest similarity (ties: lower column; a (row, column) pair
    listed more than once counts once) → (neighbours (n_rows, m), −1 where fewer; their
    similarities (n_rows, m) float64, 0 where none). Pairs must be 0 ≤ row < n_rows, 0 ≤ column."""
    order = _row_best_first(rows, cols, sim)
    key_rows = rows[order]
    once = np.ones(len(order), dtype=bool)  # a repeated pair has the same similarity: adjacent here
    once[1:] = (key_rows[1:] != key_rows[:-1]) | (cols[order[1:]] != cols[order[:-1]])
    order, key_rows = order[once], key_rows[once]
    starts = np.searchsorted(key_rows, np.arange(n_rows))
    rank = np.arange(len(order)) - starts[key_rows]
    keep = rank < m
    order, key_rows, rank = order[keep], key_rows[keep], rank[keep]
    nn = np.full((n_rows, m), NO_NEIGHBOR, dtype=np.int32)
    best = np.zeros((n_rows, m), dtype=np.float64)
    nn[key_rows, rank] = cols[order]
    best[key_rows, rank] = sim[order]
    return nn, best


def _row_best_first(rows: np.ndarray, cols: np.ndarray, sim: np.ndarray) -> np.ndarray:
    """The permutation that sorts the pairs by row, then similarity (highest first), then column:
    `np.lexsort((cols, -sim, rows))`, in one argsort of an int64 key where it can be exact.

    The key packs (row, 2^s − ⌊sim·2^s⌋, column) into 63 bits, s the bits left over (≥ 20).
    ⌊sim·2^s⌋ is monotone in sim and equal sims give equal keys, so the order is lexsort's
    unless two different sims of one row share a bucket — which the check after the sort
    finds (a row's similarities must not rise), falling back to the three-key lexsort then.
    Jaccard similarities are ratios of small integers, so the buckets (2^-s apart) separate
    them: one int64 sort is ~5× faster than lexsort's three passes (BENCHMARKS.md, *Neighbourhood
    models*)."""
    if len(rows) == 0:
        return np.zeros(0, dtype=np.int64)
    rows64, cols64 = rows.astype(np.int64, copy=False), cols.astype(np.int64, copy=False)
    row_bits, col_bits = int(rows64.max()).bit_length(), int(cols64.max()).bit_length()
    s = 62 - row_bits - col_bits
    if s >= 20 and sim.min() >= 0.0 and sim.max() <= 1.0:
        scale = float(1 << s)
        inverse = (1 << s) - np.floor(sim * scale).astype(np.int64)  # in [0, 2^s]: s + 1 bits
        key = (rows64 << (s + 1 + col_bits)) | (inverse << col_bits) | cols64
        order = np.argsort(key)
        r, v = rows64[order], sim[order]
        if not np.any((r[1:] == r[:-1]) & (v[1:] > v[:-1])):
            return order
    return np.lexsort((cols64, -sim, rows64))


def distances(sim: np.ndarray) -> np.ndarray:
    """Jaccard distances (float32) of `top_m`'s similarities; 1 where no neighbour."""
    return (1.0 - sim).astype(np.float32)


def jaccard_neighbors(
    a: sp.csr_matrix, m: int, max_pairs: int = 20_000_000, progress: bool = False, queries: np.ndarray | None = None,
    max_posting: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The m nearest rows of every row of `a` (or of the rows `queries`) among the rows of `a`
    by eq. 3, through the inverted index. Returns (neighbours (Q, m) int32, −1 where fewer
    share a value; distances (Q, m) float32).

    `max_posting` (approximate, off by default): values on more than this many images do not
    generate candidates — images that share only such values with x are not considered — but
    still count in every candidate's exact distance; a query whose values are all frequent is
    searched exactly. Tag-like metadata over a fixed vocabulary has postings that grow ∝ N,
    so exact search costs O(N) per query; the cap bounds it (BENCHMARKS.md measures recall)."""
    if m < 1:
        raise ValueError(f"the number of neighbours must be ≥ 1, got {m}")
    a = sp.csr_matrix(a, dtype=np.int32)
    queries = np.arange(a.shape[0]) if queries is None else np.asarray(queries, dtype=np.int64)
    q_rows = a[queries]
    sizes = np.asarray(a.sum(1)).ravel().astype(np.int64)
    postings = a.T.tocsr()  # the inverted index: value → images
    df = np.asarray(postings.sum(1)).ravel().astype(np.int64)
    frequent = df > max_posting if max_posting is not None else np.zeros(len(df), bool)
    capped = _capped_index(a, postings, frequent) if frequent.any() else None
    # Candidate pairs each query will visit (with repeats), to size the chunks.
    visits = q_rows @ np.where(frequent, 0, df)
    if capped is not None:
        visits = np.where(visits > 0, visits, q_rows @ df)  # all-frequent queries: searched exactly
    bounds = _chunks(visits, max_pairs)
    nn = np.full((len(queries), m), NO_NEIGHBOR, dtype=np.int32)
    dist = np.ones((len(queries), m), dtype=np.float32)
    chunks = zip(bounds[:-1], bounds[1:], strict=True)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(list(chunks), desc="jaccard neighbours", unit="chunk")
    for lo, hi in chunks:
        rows, cols, shared = _shared_counts(q_rows[lo:hi], queries[lo:hi], postings, capped)
        query = queries[lo:hi][rows]
        not_self = cols != query
        rows, cols, shared, query = rows[not_self], cols[not_self], shared[not_self], query[not_self]
        sim = shared / (sizes[query] + sizes[cols] - shared)
        nn[lo:hi], best = top_m(rows, cols, sim, hi - lo, m)
        dist[lo:hi] = distances(best)
    return nn, dist


def _capped_index(a: sp.csr_matrix, postings: sp.csr_matrix, frequent: np.ndarray) -> dict:
    """The inverted index without the frequent values, and the frequent values as a dense (N, F) table."""
    keep = sp.diags((~frequent).astype(np.int32), dtype=np.int32)
    return {"rare": (keep @ postings).tocsr(), "rare_mask": (~frequent).astype(np.int64),
            "frequent": a[:, np.nonzero(frequent)[0]].toarray().astype(np.int8)}


def _shared_counts(q: sp.csr_matrix, images: np.ndarray, postings: sp.csr_matrix, capped: dict | None):
    """(query row, image, |t_q ∩ t_image|) of every candidate pair of a chunk of queries; `images`
    are the queries' own rows in `a`."""
    if capped is None:
        inter = (q @ postings).tocoo()
        return inter.row, inter.col, inter.data.astype(np.float64)
    has_rare = (q @ capped["rare_mask"]) > 0
    out = []
    for rare, sub in ((True, np.nonzero(has_rare)[0]), (False, np.nonzero(~has_rare)[0])):
        if not len(sub):
            continue
        inter = (q[sub] @ (capped["rare"] if rare else postings)).tocoo()
        rows, cols, shared = sub[inter.row], inter.col, inter.data.astype(np.float64)
        if rare:  # the frequent values the pair shares, counted exactly
            freq = capped["frequent"]
            shared = shared + (freq[images[rows]] * freq[cols]).sum(1)
        out.append((rows, cols, shared))
    if not out:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return tuple(np.concatenate(parts) for parts in zip(*out, strict=True))


def _chunks(visits: np.ndarray, max_pairs: int) -> np.ndarray:
    """Row boundaries such that each chunk visits at most `max_pairs` pairs (at least one row)."""
    n = len(visits)
    if n == 0:
        return np.zeros(1, dtype=np.int64)
    bounds = [0]
    total = np.cumsum(visits)
    while bounds[-1] < n:
        start = bounds[-1]
        base = total[start - 1] if start else 0
        end = int(np.searchsorted(total, base + max_pairs, side="right"))
        bounds.append(max(end, start + 1))
    return np.asarray(bounds, dtype=np.int64)


def jaccard_neighbors_brute(a: sp.csr_matrix, m: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Brute force over every pair (dense intersections) for the given query rows (all by
    default): the reference `jaccard_neighbors` must equal, and the benchmark's baseline."""
    a = sp.csr_matrix(a, dtype=np.int32)
    rows = np.arange(a.shape[0]) if rows is None else np.asarray(rows)
    sizes = np.asarray(a.sum(1)).ravel().astype(np.float64)
    dense_t = a.T.toarray().astype(np.float64)
    shared = a[rows].toarray().astype(np.float64) @ dense_t  # (Q, N)
    union = sizes[rows][:, None] + sizes[None, :] - shared
    with np.errstate(invalid="ignore", divide="ignore"):
        sim = np.where(union > 0, shared / union, 0.0)
    sim[np.arange(len(rows)), rows] = 0.0  # never its own neighbour
    q, c = np.nonzero(sim > 0)
    nn, best = top_m(q, c, sim[q, c], len(rows), m)
    return nn, distances(best)
