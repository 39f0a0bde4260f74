"""Jaccard M-nearest neighbours over an inverted index = brute force (seed 003 eq. 3)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from tagray.data.jaccard import (
    NO_NEIGHBOR,
    indicator_matrix,
    jaccard_neighbors,
    jaccard_neighbors_brute,
    metadata_vocabulary,
)


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


def test_bad_neighbour_count() -> None:
    lists = pa.array([["a"]], pa.list_(pa.string()))
    with pytest.raises(ValueError, match="neighbours must be ≥ 1"):
        jaccard_neighbors(indicator_matrix(lists, metadata_vocabulary(lists)), m=0)


def test_capped_postings_keep_exact_distances_and_most_neighbours() -> None:
    lists = random_lists(600, values=40, seed=4)
    a = indicator_matrix(lists, metadata_vocabulary(lists))
    exact_nn, exact_dist = jaccard_neighbors_brute(a, m=6)
    df = np.asarray(a.sum(0)).ravel()
    cap = int(np.sort(df)[-4])  # the three most frequent values generate no candidates
    nn, dist = jaccard_neighbors(a, m=6, max_posting=cap - 1, max_pairs=500)
    dense = a.toarray().astype(bool)
    for i in range(600):  # every distance reported is the pair's true Jaccard distance (eq. 3)
        for j, d in zip(nn[i], dist[i], strict=True):
            if j >= 0:
                union = (dense[i] | dense[j]).sum()
                assert d == pytest.approx(1 - (dense[i] & dense[j]).sum() / union, abs=1e-6)
    # approximate: the similarity mass found is most of the exact one, never more
    found, best = (1 - dist[nn >= 0]).sum(), (1 - exact_dist[exact_nn >= 0]).sum()
    assert 0.8 * best <= found <= best + 1e-9
    only_frequent = ~dense[:, df <= cap - 1].any(1) & dense.any(1)
    assert only_frequent.any()  # such queries are searched exactly
    np.testing.assert_array_equal(nn[only_frequent], exact_nn[only_frequent])
