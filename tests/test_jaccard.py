"""Jaccard M-nearest neighbours over an inverted index = brute force (seed 003 eq. 3)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import scipy.sparse as sp

from tagray.data.jaccard import (
    NO_NEIGHBOR,
    indicator_matrix,
    jaccard_neighbors,
    jaccard_neighbors_brute,
    metadata_vocabulary,
    top_m,
)
from tagray.data.jaccard_lsh import EMPTY, jaccard_neighbors_lsh, minhash_signatures


def random_lists(n: int, values: int, seed: int) -> pa.ListArray:
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, values + 1)  # Zipf-like: a few values are in many images
    popularity /= popularity.sum()
    out = []
    for _ in range(n):
        k = rng.integers(0, 6)  # some images have no metadata at all
        out.append([f"v{j}" for j in rng.choice(values, size=k, p=popularity)])  # repeats allowed
    return pa.array(out, pa.list_(pa.string()))


def test_vocabulary_and_indicator_matrix() -> None:
    lists = pa.array([["a", "b", "b"], ["b", "c"], [], ["b", "zz"]], pa.list_(pa.string()))
    vocab = metadata_vocabulary(lists, top=3)
    assert list(vocab) == ["b", "a", "c"]  # by count, ties by value; "zz" beyond τ=3
    a = indicator_matrix(lists, vocab).toarray()
    assert a.tolist() == [[1, 1, 0], [1, 0, 1], [0, 0, 0], [1, 0, 0]]  # duplicates count once


def test_hand_case_distances() -> None:
    lists = pa.array([["a", "b"], ["a", "b", "c"], ["c"], ["d"]], pa.list_(pa.string()))
    a = indicator_matrix(lists, metadata_vocabulary(lists))
    nn, dist = jaccard_neighbors(a, m=2)
    # image 0: image 1 shares {a,b} of {a,b,c} → d = 1/3; nothing else shares → −1, d = 1
    assert nn[0].tolist() == [1, NO_NEIGHBOR]
    np.testing.assert_allclose(dist[0], [1 - 2 / 3, 1.0], rtol=1e-6)
    # image 1: image 0 (d = 1/3), then image 2 (|{c}| / |{a,b,c}| → d = 2/3)
    assert nn[1].tolist() == [0, 2]
    np.testing.assert_allclose(dist[1], [1 / 3, 2 / 3], rtol=1e-6)
    assert nn[3].tolist() == [NO_NEIGHBOR, NO_NEIGHBOR]  # shares nothing: never its own neighbour


@pytest.mark.parametrize("max_pairs", [50, 20_000_000])  # many tiny chunks, and one chunk
def test_inverted_index_equals_brute_force(max_pairs: int) -> None:
    lists = random_lists(600, values=40, seed=3)
    a = indicator_matrix(lists, metadata_vocabulary(lists, top=30))
    nn, dist = jaccard_neighbors(a, m=6, max_pairs=max_pairs)
    ref_nn, ref_dist = jaccard_neighbors_brute(a, m=6)
    np.testing.assert_array_equal(nn, ref_nn)
    np.testing.assert_array_equal(dist, ref_dist)
    assert (nn != np.arange(600)[:, None]).all()
    assert (nn >= 0).mean() > 0.5  # the case is not vacuous
    some = np.array([5, 17, 599])
    sub_nn, sub_dist = jaccard_neighbors(a, m=6, max_pairs=max_pairs, queries=some)
    np.testing.assert_array_equal(sub_nn, ref_nn[some])
    np.testing.assert_array_equal(sub_dist, ref_dist[some])


def _top_m_by_lexsort(rows, cols, sim, n_rows, m):
    """The reference: every pair sorted by (row, similarity descending, column), repeats once."""
    pairs = sorted(set(zip(rows.tolist(), cols.tolist(), sim.tolist(), strict=True)), key=lambda p: (p[0], -p[2], p[1]))
    nn, best = np.full((n_rows, m), NO_NEIGHBOR, np.int32), np.zeros((n_rows, m))
    for r in range(n_rows):
        mine = [p for p in pairs if p[0] == r][:m]
        nn[r, : len(mine)] = [p[1] for p in mine]
        best[r, : len(mine)] = [p[2] for p in mine]
    return nn, best


@pytest.mark.parametrize("case", ["ratios", "below_the_key_resolution", "wide_ids"])
def test_top_m_is_the_lexsort_order_with_ties_by_column_and_repeats_once(case: str) -> None:
    """`top_m` sorts one packed int64 key where that is exact and falls back to a three-key
    lexsort where it is not; both give the reference's neighbours and similarities."""
    rng = np.random.default_rng(7)
    n_rows, n = 40, 3000
    rows, cols = rng.integers(0, n_rows, n), rng.integers(0, 500, n)
    shared, union = rng.integers(1, 4, n), rng.integers(4, 7, n)
    sim = shared / union  # many exact ties, as Jaccard ratios of small sets have
    if case == "below_the_key_resolution":  # ids of 2^30 leave 25 bits: sims 2^-30 apart share a bucket
        cols, sim = cols + (1 << 30), 0.5 + rng.integers(0, 3, n) * 2.0**-30
    if case == "wide_ids":  # ids of 2^30: the packed key keeps 25 bits for the similarity
        cols = cols + (1 << 30)
    dup = rng.integers(0, n, 200)  # pairs listed twice (LSH meets a pair in several bands)
    rows, cols, sim = np.r_[rows, rows[dup]], np.r_[cols, cols[dup]], np.r_[sim, sim[dup]]
    # one pair per (row, column): a repeat carries its pair's similarity
    first = {}
    for i, p in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
        first.setdefault(p, i)
    sim = sim[[first[p] for p in zip(rows.tolist(), cols.tolist(), strict=True)]]
    nn, best = top_m(rows, cols, sim, n_rows, 6)
    ref_nn, ref_best = _top_m_by_lexsort(rows, cols, sim, n_rows, 6)
    np.testing.assert_array_equal(nn, ref_nn)
    np.testing.assert_array_equal(best, ref_best)


def test_bad_neighbour_count() -> None:
    lists = pa.array([["a"]], pa.list_(pa.string()))
    with pytest.raises(ValueError, match="neighbours must be ≥ 1"):
        jaccard_neighbors(indicator_matrix(lists, metadata_vocabulary(lists)), m=0)


def assert_true_distances(nn: np.ndarray, dist: np.ndarray, dense: np.ndarray) -> None:
    """Every neighbour reported carries the pair's exact Jaccard distance (eq. 3)."""
    rows, slots = np.nonzero(nn >= 0)
    j = nn[rows, slots]
    shared = (dense[rows] & dense[j]).sum(1)
    union = (dense[rows] | dense[j]).sum(1)
    np.testing.assert_allclose(dist[rows, slots], 1 - shared / union, atol=1e-6)


def test_capped_postings_keep_exact_distances_and_most_neighbours() -> None:
    lists = random_lists(600, values=40, seed=4)
    a = indicator_matrix(lists, metadata_vocabulary(lists))
    exact_nn, exact_dist = jaccard_neighbors_brute(a, m=6)
    df = np.asarray(a.sum(0)).ravel()
    cap = int(np.sort(df)[-4])  # the three most frequent values generate no candidates
    nn, dist = jaccard_neighbors(a, m=6, max_posting=cap - 1, max_pairs=500)
    dense = a.toarray().astype(bool)
    assert_true_distances(nn, dist, dense)
    # approximate: the similarity mass found is most of the exact one, never more
    found, best = (1 - dist[nn >= 0]).sum(), (1 - exact_dist[exact_nn >= 0]).sum()
    assert 0.8 * best <= found <= best + 1e-9
    only_frequent = ~dense[:, df <= cap - 1].any(1) & dense.any(1)
    assert only_frequent.any()  # such queries are searched exactly
    np.testing.assert_array_equal(nn[only_frequent], exact_nn[only_frequent])


def test_minhash_collision_rate_is_the_jaccard_similarity() -> None:
    # P[min h(A) = min h(B)] = |A ∩ B| / |A ∪ B|: sets of 30 values sharing 20 → J = 0.5
    a = np.zeros((3, 50), np.int32)
    a[0, :30] = 1
    a[1, 10:40] = 1
    sig = minhash_signatures(sp.csr_matrix(a), hashes=4000, seed=1)
    assert abs((sig[0] == sig[1]).mean() - 20 / 40) < 0.03  # 4000 hashes: standard error 0.008
    assert (sig[2] == EMPTY).all()  # no values: never bucketed


def test_lsh_finds_most_of_the_exact_neighbours() -> None:
    lists = random_lists(2000, values=60, seed=5)
    a = indicator_matrix(lists, metadata_vocabulary(lists))
    exact_nn, exact_dist = jaccard_neighbors_brute(a, m=6)
    nn, dist = jaccard_neighbors_lsh(a, m=6)
    dense = a.toarray().astype(bool)
    assert_true_distances(nn, dist, dense)
    assert (nn != np.arange(2000)[:, None]).all()
    assert all(len(set(r[r >= 0])) == (r >= 0).sum() for r in nn)  # a pair met in several bands counts once
    assert (np.diff(dist, axis=1) >= 0).all()  # nearest first
    assert (nn[~dense.any(1)] == NO_NEIGHBOR).all()  # images without metadata have none
    recall = (1 - dist).sum() / (1 - exact_dist).sum()
    one_band = (1 - jaccard_neighbors_lsh(a, m=6, bands=1)[1]).sum() / (1 - exact_dist).sum()
    assert recall >= 0.9 and recall > one_band + 0.2, (recall, one_band)
    # identical sets collide in every band: most images with a duplicate find one at distance 0
    first = exact_dist[:, 0] == 0
    assert first.any() and (dist[first, 0] == 0).mean() > 0.9
    np.testing.assert_array_equal(nn, jaccard_neighbors_lsh(a, m=6)[0])  # seeded


def test_split_neighbours_by_lsh_stay_in_their_split_and_match_the_index() -> None:
    from tagray.heads.neighborhood import NeighborsConfig
    from tagray.heads.split_arrays import SplitArrays, metadata_neighbors

    lists = random_lists(1200, values=50, seed=6)
    split = np.where(np.arange(1200) % 3 == 0, "test", "train")
    parts = [SplitArrays(name, rows, None, np.zeros((len(rows), 1), np.float32), None, None, None)
             for name in ("train", "test") for rows in [np.nonzero(split == name)[0]]]
    kw = {"max_rank": 6, "tau": 30, "m": 3}
    exact = metadata_neighbors(lists, pa.array(split), parts, NeighborsConfig(**kw), progress=False)
    approx = metadata_neighbors(lists, pa.array(split), parts, NeighborsConfig(search="lsh", **kw), progress=False)
    for part in parts:
        nn = approx[part.split]
        assert nn.max() < len(part.rows)  # rows into the split's own images
        assert (nn >= 0).sum() >= 0.95 * (exact[part.split] >= 0).sum()
        assert (nn == exact[part.split]).mean() > 0.3  # same neighbours where not tied
