"""The papers' evaluation metrics (SPEC §6), vectorised over images and tags.

Scores and truth are (N, T) arrays: rows are images, columns tags; truth is 0/1.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import rankdata

# Why a metric can be undefined on a split (NaN from the functions below): the reports write
# these as JSON null with the reason under "undefined" (`with_nulls`), never as NaN.
UNDEFINED = {
    "map_label": "no tag column has a positive image",
    "map_image": "no image has a positive tag",
    "micro_auc": "the truth is all positive or all negative",
    "macro_auc": "no tag column has both positive and negative images",
}


def with_nulls(metrics: dict, reasons: dict[str, str] | None = None) -> dict:
    """`metrics` with every NaN / ±inf value replaced by None (JSON null) and, when there was any,
    `undefined: {key: reason}` (reasons from `reasons`, else UNDEFINED)."""
    import math

    reasons = {**UNDEFINED, **(reasons or {})}
    out, undefined = {}, {}
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            out[key] = None
            undefined[key] = reasons.get(key, "undefined on this split")
        else:
            out[key] = value
    if undefined:
        out["undefined"] = undefined
    return out


def fmt(x: float | None, spec: str = ".3f") -> str:
    """A metric for a summary line; "n/a" for an undefined one (None)."""
    return "n/a" if x is None else format(x, spec)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """(N, T) 0/1 matrix of each row's k highest scores (ties: lowest index)."""
    k = min(k, scores.shape[1])
    idx = torch.topk(torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32)), k, dim=1).indices.numpy()
    out = np.zeros(scores.shape, dtype=bool)
    np.put_along_axis(out, idx, True, axis=1)
    return out


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def tag_prediction_at_k(scores: np.ndarray, truth: np.ndarray, k: int = 5) -> dict[str, float]:
    """Seed 001 Table 2: top-k tags per image; precision and recall per image, averaged over
    images that carry at least one tag; F = harmonic mean of the two averages."""
    keep = truth.sum(1) > 0
    hits = (_top_k(scores[keep], k) & (truth[keep] > 0)).sum(1)
    p = float(np.mean(hits / min(k, scores.shape[1]))) if keep.any() else 0.0
    r = float(np.mean(hits / truth[keep].sum(1))) if keep.any() else 0.0
    return {f"precision@{k}": p, f"recall@{k}": r, f"f1@{k}": _f1(p, r), "images": int(keep.sum())}


def annotation_at_k(scores: np.ndarray, truth: np.ndarray, k: int = 5) -> dict[str, float]:
    """Seed 001 Table 3: each image annotated with its top-k tags; per tag P = N_c/N_p (0 if
    never predicted) and R = N_c/N_g, averaged over tags with N_g > 0; F of the averages."""
    pred = _top_k(scores, k)
    gold = truth > 0
    n_g = gold.sum(0)
    n_p = pred.sum(0)
    n_c = (pred & gold).sum(0)
    keep = n_g > 0
    p = float(np.mean(np.where(n_p[keep] > 0, n_c[keep] / np.maximum(n_p[keep], 1), 0.0))) if keep.any() else 0.0
    r = float(np.mean(n_c[keep] / n_g[keep])) if keep.any() else 0.0
    return {f"precision@{k}": p, f"recall@{k}": r, f"f1@{k}": _f1(p, r), "tags": int(keep.sum())}


def precision_recall_curve(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall at each distinct score threshold, highest threshold first
    (tied scores form one threshold, as scikit-learn)."""
    y = truth > 0
    order = np.argsort(-scores, kind="stable")
    s, yy = scores[order], y[order]
    last = np.r_[s[1:] != s[:-1], True]  # last index of each threshold
    tp = np.cumsum(yy)[last]
    fp = np.cumsum(~yy)[last]
    return tp / (tp + fp), tp / max(1, y.sum())


def average_precision(scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Average precision of each column, AP = Σ_n (R_n − R_{n−1}) P_n over distinct score
    thresholds; NaN for a column with no positives."""
    out = np.full(scores.shape[1], np.nan)
    for j in np.nonzero((truth > 0).any(0))[0]:
        precision, recall = precision_recall_curve(scores[:, j], truth[:, j])
        out[j] = np.sum(np.diff(np.r_[0.0, recall]) * precision)
    return out


def mean_average_precision(scores: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """mAP per label (mAP_L: AP of each tag over images) and per image (mAP_I: AP of each
    image over tags), each averaged where there is at least one positive (seeds 002, 003)."""
    return {
        "map_label": float(np.nanmean(average_precision(scores, truth))),
        "map_image": float(np.nanmean(average_precision(scores.T, truth.T))),
    }


def _auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """ROC-AUC by the rank-sum (Mann–Whitney) statistic, ties at average rank; NaN if one class."""
    y = truth > 0
    n_pos, n_neg = y.sum(), (~y).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_auc(scores: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Micro AUC (all (image, tag) pairs pooled) and macro AUC (mean over tags)."""
    per_tag = [_auc(scores[:, j], truth[:, j]) for j in range(scores.shape[1])]
    return {"micro_auc": _auc(scores.ravel(), truth.ravel()), "macro_auc": float(np.nanmean(per_tag))}


def retrieval_queries(truth: np.ndarray, max_terms: int = 3) -> dict[int, np.ndarray]:
    """Every 1-, 2-, …, max_terms-tag query with at least one relevant image (all its tags
    present): {terms: (Q, terms) array of tag indices}."""
    gold = torch.from_numpy((truth > 0).astype(np.float32))
    t = gold.shape[1]
    out: dict[int, np.ndarray] = {}
    count1 = gold.sum(0)
    out[1] = np.nonzero(count1.numpy() > 0)[0][:, None]
    if max_terms >= 2:
        co = gold.T @ gold  # co-occurrence counts
        i, j = np.nonzero(np.triu(co.numpy() > 0, k=1))
        out[2] = np.stack([i, j], 1)
    if max_terms >= 3:
        triples = []
        for a in range(t):
            sub = gold * gold[:, a : a + 1]
            co = (sub.T @ gold).numpy() > 0
            j, k = np.nonzero(np.triu(co, k=1))
            keep = j > a
            triples.append(np.stack([np.full(keep.sum(), a), j[keep], k[keep]], 1))
        out[3] = np.concatenate(triples) if triples else np.zeros((0, 3), np.int64)
    return out


def retrieval_precision_at_k(
    log_probs: np.ndarray, truth: np.ndarray, max_terms: int = 3, k: int = 5, chunk: int = 2048
) -> dict[str, float]:
    """Seed 001 Table 4: for every query with ≥ 1 relevant image, rank images by the product
    of the query tags' probabilities (sum of log-probabilities) and score normalised
    P@k = hits / min(k, #relevant). Returns {"p@5_1": …, "p@5_2": …, "queries_2": …}."""
    lp = torch.from_numpy(np.ascontiguousarray(log_probs, dtype=np.float32))
    gold = torch.from_numpy(truth > 0)
    out: dict[str, float] = {}
    for terms, queries in retrieval_queries(truth, max_terms).items():
        scores_sum, n_sum = 0.0, 0
        q_all = torch.from_numpy(queries.astype(np.int64))
        for lo in range(0, len(q_all), chunk):
            q = q_all[lo : lo + chunk]
            score = lp[:, q].sum(2)  # (N, Q)
            relevant = gold[:, q].all(2)  # (N, Q)
            top = torch.topk(score, min(k, len(lp)), dim=0).indices  # (k, Q)
            hits = relevant.gather(0, top).sum(0).float()
            n_rel = relevant.sum(0).clamp(max=k).float()
            scores_sum += float((hits / n_rel).sum())
            n_sum += len(q)
        out[f"p@{k}_{terms}"] = scores_sum / n_sum if n_sum else float("nan")
        out[f"queries_{terms}"] = n_sum
    return out

