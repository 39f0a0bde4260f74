"""Approximate M nearest images by Jaccard distance through MinHash LSH (seed 003 §3.1, eq. 3;
Broder 1997, Leskovec, Rajaraman & Ullman, *Mining of Massive Datasets* §3.4).

For tag-like metadata over a fixed vocabulary the inverted index (`tagray.data.jaccard`) visits
O(N) images per query: the frequent tags' postings grow with the corpus. MinHash makes the
candidate set independent of N:

- signature: K = bands · rows independent hash functions h_k over the metadata values
  (splitmix64 of the value id salted per k, so each is a random permutation of the values); an image's signature is min_{v ∈ t_x} h_k(v), and
  P[sig_k(x) = sig_k(x')] = J(x, x') (the Jaccard similarity);
- banding: images whose signatures agree on all `rows` entries of a band share a bucket, so a
  pair of similarity s becomes a candidate with probability 1 − (1 − s^rows)^bands;
- buckets of images that share a frequent value are large, so within a bucket (in a seeded
  random order) each image is paired only with the `window` images after it (and so the
  `window` before): at most 2 · window candidates per image per band.

Every candidate's distance is the exact eq. 3 (never the signature estimate), so what is
approximate is only which images are considered: recall is measured in BENCHMARKS.md. Cost:
O(nnz · K) for the signatures and O(N · bands · window) candidate pairs, each scored once per
band and merged into the running M best; never an N×N matrix, and memory is O(N · window) per band.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp

from tagray.data.jaccard import NO_NEIGHBOR, distances, top_m

log = logging.getLogger(__name__)

EMPTY = np.iinfo(np.uint64).max  # the signature of an image with no values: never bucketed


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 whose outputs behave as independent
    uniform draws for distinct inputs (so each h_k is a random permutation of the values)."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def minhash_signatures(a: sp.csr_matrix, hashes: int, seed: int = 0, block: int = 100_000) -> np.ndarray:
    """(N, hashes) uint64 MinHash signatures of the rows of the binary (N, V) matrix `a`,
    sig[i, k] = min over i's values v of h_k(v); rows with no values are `EMPTY`."""
    salts = _mix(np.arange(hashes, dtype=np.uint64) + np.uint64(seed) * np.uint64(1 << 32))  # one h_k per salt
    sig = np.full((a.shape[0], hashes), EMPTY, dtype=np.uint64)
    for lo in range(0, a.shape[0], block):
        sub = a[lo : lo + block]
        filled = np.nonzero(np.diff(sub.indptr))[0]
        if len(filled):
            h = _mix(_mix(sub.indices.astype(np.uint64))[:, None] ^ salts[None, :])  # (nnz, hashes)
            sig[lo + filled] = np.minimum.reduceat(h, sub.indptr[filled], axis=0)
    return sig


def band_keys(sig: np.ndarray, bands: int, rows: int, seed: int = 0) -> np.ndarray:
    """(bands, N) uint64 bucket keys: each band's `rows` signature entries mixed into one word
    (collisions of different bands' contents: ~2^-64 per pair)."""
    mixers = np.random.default_rng([seed, 37]).integers(1, 1 << 63, rows, dtype=np.uint64) | np.uint64(1)
    keys = np.zeros((bands, len(sig)), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for b in range(bands):
            part = sig[:, b * rows : (b + 1) * rows]
            keys[b] = (part * mixers).sum(1) ^ (part[:, 0] >> np.uint64(7))
    return keys


def bucket_pairs(keys: np.ndarray, valid: np.ndarray, window: int, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidate pairs (i, j) of one band: images with equal keys, each paired with the next
    `window` images of its bucket in the random `order` (a rank per image)."""
    idx = np.nonzero(valid)[0]
    s = idx[np.lexsort((order[idx], keys[idx]))]
    ks = keys[s]
    firsts, seconds = [], []
    for d in range(1, min(window, len(s) - 1) + 1):
        same = ks[:-d] == ks[d:]
        firsts.append(s[:-d][same])
        seconds.append(s[d:][same])
    if not firsts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(firsts), np.concatenate(seconds)


def pair_similarity(a: sp.csr_matrix, sizes: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Exact Jaccard similarity (eq. 3) of the row pairs (i, j)."""
    shared = np.asarray(a[i].multiply(a[j]).sum(1)).ravel().astype(np.float64)
    return shared / (sizes[i] + sizes[j] - shared)


def jaccard_neighbors_lsh(
    a: sp.csr_matrix, m: int, bands: int = 16, rows: int = 2, window: int = 10, seed: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """The (approximately) m nearest rows of every row of `a` by eq. 3, through MinHash LSH.
    Returns what `jaccard_neighbors` does: (neighbours (N, m) int32, −1 where none was found;
    exact distances (N, m) float32), ties by the lower row index among the candidates found."""
    if m < 1:
        raise ValueError(f"the number of neighbours must be ≥ 1, got {m}")
    if min(bands, rows, window) < 1:
        raise ValueError(f"LSH needs bands, rows and window ≥ 1, got {bands}, {rows}, {window}")
    a = sp.csr_matrix(a, dtype=np.int32)
    n = a.shape[0]
    sizes = np.asarray(a.sum(1)).ravel().astype(np.float64)
    sig = minhash_signatures(a, bands * rows, seed)
    keys = band_keys(sig, bands, rows, seed)
    valid = sig[:, 0] != EMPTY
    order = np.random.default_rng([seed, 41]).permutation(n)
    best_nn = np.full((n, m), NO_NEIGHBOR, dtype=np.int32)
    best_sim = np.zeros((n, m), dtype=np.float64)
    band_iter = range(bands)
    if progress:
        from tqdm import tqdm

        band_iter = tqdm(band_iter, desc="jaccard LSH bands", unit="band")
    for b in band_iter:
        i, j = bucket_pairs(keys[b], valid, window, order)
        sim = pair_similarity(a, sizes, i, j)
        keep = sim > 0  # equal keys by a hash collision, or a pair sharing nothing
        i, j, sim = i[keep], j[keep], sim[keep]
        held = best_nn >= 0
        held_rows = np.broadcast_to(np.arange(n)[:, None], best_nn.shape)[held]
        r = np.concatenate([held_rows, i, j])
        c = np.concatenate([best_nn[held].astype(np.int64), j, i])
        s = np.concatenate([best_sim[held], sim, sim])
        best_nn, best_sim = top_m(r, c, s, n, m)  # a pair met again (another band) counts once
    return best_nn, distances(best_sim)
