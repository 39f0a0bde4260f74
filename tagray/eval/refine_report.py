"""Seed 002 Tables 2–5 for a refinement network: miAP (per image), mAP (per tag), micro and
macro AUC for

- refinement: scores of the training images themselves (the refined user tags), against
  UserTags (the user tags as they are), TagCooccur, TagVote and ϕ0 (Multi-CNN);
- annotation: scores of new (test) images, against RandomGuess, kNN and ϕ0.

Truth is the ground-truth labels over the label tags where a split has labelled images,
else the user tags (then refinement of the user tags against themselves is meaningless and
only annotation is informative). Keys: <refinement|annotation>.<method>.<map_image|map_label|micro_auc|macro_auc>.
"""

from __future__ import annotations

import numpy as np
import torch

from tagray.eval.metrics import fmt, mean_average_precision, roc_auc, with_nulls
from tagray.heads.split_arrays import SplitArrays, truth_of
from tagray.heads.targets import multi_hot


def ranking_metrics(scores: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    return with_nulls({**mean_average_precision(scores, truth), **roc_auc(scores, truth)})


def tag_cooccur_scores(g: np.ndarray, counts: np.ndarray, cooccur: np.ndarray) -> np.ndarray:
    """TagCooccur (Sigurbjörnsson & van Zwol 2008), in its simplest form: the user tags first, then
    every tag by the mean over the image's user tags u of P(t | u) = f(u, t) / f(u)."""
    p_t_given_u = cooccur / np.maximum(counts, 1)[:, None]  # row u
    n_user = g.sum(1, keepdims=True)
    promoted = (g @ p_t_given_u) / np.maximum(n_user, 1)
    return g + 0.5 * promoted * (1 - g)


def visual_neighbors(base: np.ndarray, query: np.ndarray, k: int, exclude_self: bool) -> np.ndarray:
    """The k nearest base rows of every query row by cosine similarity (exact faiss); (Q, k)."""
    import faiss

    b = torch.nn.functional.normalize(torch.from_numpy(base), dim=1).numpy()
    q = torch.nn.functional.normalize(torch.from_numpy(query), dim=1).numpy()
    index = faiss.IndexFlatIP(b.shape[1])
    index.add(b)
    _, nn = index.search(q, min(k + int(exclude_self), len(b)))
    if exclude_self:
        own = nn == np.arange(len(q))[:, None]
        own[:, -1] |= ~own.any(1)
        nn = nn[~own].reshape(len(q), -1)
    return nn


def tag_vote_scores(x: np.ndarray, g: np.ndarray, k: int = 50) -> np.ndarray:
    """TagVote (Li, Snoek & Worring 2009): votes of the k visual neighbours (image features, the
    image itself excluded) for each tag, minus the votes expected by chance, k · f(t) / N."""
    nn = visual_neighbors(x, x, k, exclude_self=True)
    votes = np.zeros_like(g)
    for lo in range(0, len(x), 4096):
        votes[lo : lo + 4096] = g[nn[lo : lo + 4096]].sum(1)
    return votes - nn.shape[1] * g.mean(0, keepdims=True)


def knn_scores(train_x: np.ndarray, train_g: np.ndarray, x: np.ndarray, k: int = 50) -> np.ndarray:
    """kNN (Makadia et al. 2010): each tag's share among the k nearest training images."""
    nn = visual_neighbors(train_x, x, k, exclude_self=False)
    out = np.zeros((len(x), train_g.shape[1]), np.float32)
    for lo in range(0, len(x), 4096):
        out[lo : lo + 4096] = train_g[nn[lo : lo + 4096]].mean(1)
    return out


def refine_report(
    scores: dict[str, dict[str, np.ndarray]], train: SplitArrays, test: SplitArrays, tags: int, seed: int = 0,
    with_baselines: bool = True,
) -> dict:
    """`scores[method][split]` are (N, tags) scores of each model ("model", "multi_cnn") on the
    train and test splits; baselines are computed here."""
    from tagray.data.tag_similarity import cooccurrence

    g_train = multi_hot(train.tag_ids, tags).numpy()
    report: dict = {"tags": tags}
    for task, part in (("refinement", train), ("annotation", test)):
        rows, cols, truth, kind = truth_of(part, tags)
        methods = {name: s[part.split] for name, s in scores.items()}
        if with_baselines:
            rng = np.random.default_rng(seed)
            methods["random_guess"] = rng.random((len(part), tags)).astype(np.float32)
            if task == "refinement":
                counts, co = cooccurrence(train.tag_ids, tags)
                methods["user_tags"] = g_train
                methods["tag_cooccur"] = tag_cooccur_scores(g_train, counts, co)
                methods["tag_vote"] = tag_vote_scores(train.x, g_train)
            else:
                methods["knn"] = knn_scores(train.x, g_train, test.x)
        report[task] = {"split": part.split, "images": int(len(rows)), "truth": kind,
                        **{name: ranking_metrics(s[rows][:, cols], truth) for name, s in methods.items()}}
    return report


def summary_lines(report: dict) -> list[str]:
    lines = []
    for task in ("refinement", "annotation"):
        r = report[task]
        lines.append(f"{task} ({r['split']} split, {r['images']} images, truth: {r['truth']})")
        for name, m in r.items():
            if isinstance(m, dict):
                lines.append(f"  {name:<13} miAP {fmt(m['map_image'])}  mAP {fmt(m['map_label'])}  "
                             f"AUC micro {fmt(m['micro_auc'])}  macro {fmt(m['macro_auc'])}")
    return lines
