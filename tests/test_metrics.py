"""Evaluation metrics against their definitions (seed 001 §5, SPEC §6) and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from tagray.metrics import (
    annotation_at_k,
    average_precision,
    mean_average_precision,
    retrieval_precision_at_k,
    retrieval_queries,
    roc_auc,
    tag_prediction_at_k,
)


def test_tag_prediction_by_hand():
    scores = np.array([[0.9, 0.8, 0.1, 0.0], [0.1, 0.2, 0.3, 0.9]])
    truth = np.array([[1, 0, 1, 0], [0, 0, 0, 1]])
    m = tag_prediction_at_k(scores, truth, k=2)
    # image 0: top-2 {0, 1} → 1 hit: P 1/2, R 1/2; image 1: top-2 {3, 2} → 1 hit: P 1/2, R 1
    assert m["precision@2"] == pytest.approx(0.5)
    assert m["recall@2"] == pytest.approx(0.75)
    assert m["f1@2"] == pytest.approx(2 * 0.5 * 0.75 / 1.25)


def test_annotation_per_tag_by_hand():
    scores = np.array([[0.9, 0.8, 0.1], [0.9, 0.1, 0.8], [0.9, 0.2, 0.1]])
    truth = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0]])
    m = annotation_at_k(scores, truth, k=1)
    # predicted: tag 0 on all 3 images (1 correct); tags 1, 2 never predicted → P 0.
    assert m["precision@1"] == pytest.approx((1 / 3 + 0 + 0) / 3)
    assert m["recall@1"] == pytest.approx((1 + 0 + 0) / 3)


def test_average_precision_and_auc_match_sklearn_with_ties():
    g = np.random.default_rng(0)
    truth = (g.random((300, 6)) < 0.2).astype(int)
    scores = np.round(g.random((300, 6)) + truth * 0.3, 1)  # rounded: many ties
    ap = average_precision(scores, truth)
    for j in range(6):
        assert ap[j] == pytest.approx(average_precision_score(truth[:, j], scores[:, j]))
    auc = roc_auc(scores, truth)
    assert auc["macro_auc"] == pytest.approx(roc_auc_score(truth, scores, average="macro"))
    assert auc["micro_auc"] == pytest.approx(roc_auc_score(truth, scores, average="micro"))
    m = mean_average_precision(scores, truth)
    assert m["map_label"] == pytest.approx(average_precision_score(truth, scores, average="macro"))
    keep = truth.sum(1) > 0
    assert m["map_image"] == pytest.approx(average_precision_score(truth[keep].T, scores[keep].T, average="macro"))


def test_retrieval_queries_need_a_relevant_image():
    truth = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 1, 0]])
    q = retrieval_queries(truth)
    assert sorted(map(tuple, q[1])) == [(0,), (1,), (2,)]  # tag 3 is on no image
    assert sorted(map(tuple, q[2])) == [(0, 1), (0, 2), (1, 2)]
    assert sorted(map(tuple, q[3])) == [(0, 1, 2)]


def test_retrieval_normalised_precision_by_hand():
    truth = np.array([[1, 1]] + [[1, 0]] * 6 + [[0, 1]] * 2)
    log_p = np.zeros(truth.shape)
    # tag 0: images 1…5 (relevant) lead, image 0 (relevant) and 7, 8 (not) further down
    log_p[:, 0] = np.log([0.6, 0.85, 0.8, 0.75, 0.7, 0.65, 0.62, 0.55, 0.5])
    # tag 1 (relevant: 0, 7, 8): ranked 0 (0.9), 1, 8 (0.27), 2, 3, 4, 5, 6, 7 → top 5 = {0, 1, 8, 2, 3}
    log_p[:, 1] = np.log([0.9, 0.28, 0.26, 0.24, 0.22, 0.20, 0.18, 0.16, 0.27])
    m = retrieval_precision_at_k(log_p, truth, max_terms=2, k=5)
    assert m["queries_1"] == 2 and m["queries_2"] == 1
    # query (0): 7 relevant, top 5 = images 1…5, all relevant → 5/5; query (1): 2 hits of
    # min(5, 3) → 2/3; query (0, 1): image 0 only, ranked first (0.6 · 0.9) → 1/1
    assert m["p@5_1"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["p@5_2"] == pytest.approx(1.0)


def _retrieval_reference(log_p: np.ndarray, truth: np.ndarray, max_terms: int, k: int) -> dict[str, float]:
    """Seed 001 §5.3 written out query by query (itertools, a full sort per query)."""
    from itertools import combinations

    out = {}
    for n in range(1, max_terms + 1):
        scores = []
        for q in combinations(range(truth.shape[1]), n):
            relevant = truth[:, q].all(1)
            if not relevant.any():
                continue
            top = np.argsort(-log_p[:, q].sum(1), kind="stable")[:k]
            scores.append(relevant[top].sum() / min(k, relevant.sum()))
        out[f"p@{k}_{n}"] = float(np.mean(scores))
        out[f"queries_{n}"] = len(scores)
    return out


def test_retrieval_matches_a_query_by_query_reference():
    g = np.random.default_rng(4)
    truth = (g.random((120, 7)) < 0.3).astype(int)
    log_p = np.log(g.random(truth.shape) * 0.5 + 0.4 * truth)  # informative, no ties
    m = retrieval_precision_at_k(log_p, truth, max_terms=3, k=5)
    ref = _retrieval_reference(log_p, truth, 3, 5)
    assert {key: m[key] for key in ref} == pytest.approx(ref)
    assert 0.3 < ref["p@5_3"] < 1.0  # a ranking neither trivial nor perfect
