"""Seed 003 Table 2 for a neighbourhood model: mAP per label and per image, per-label and
per-image precision / recall at n = 3, micro and macro AUC, on one split, beside the
baselines of the paper (visual-only logistic, kNN voting, image neighbourhoods + voting).

Truth is the split's ground-truth labels over the label tags where the split has labelled
images, else its user tags (the weak setting). Keys:
    model.{map_label, map_image, precision_label@3, recall_label@3, precision_image@3,
           recall_image@3, micro_auc, macro_auc}
    baselines.<visual_only|knn_voting|neighborhood_voting>.<same keys>
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from tagray.eval.metrics import (
    annotation_at_k,
    fmt,
    mean_average_precision,
    roc_auc,
    tag_prediction_at_k,
    with_nulls,
)
from tagray.heads.split_arrays import SplitArrays, truth_of
from tagray.heads.targets import multi_hot

K = 3  # labels per image (seed 003 §4.2)


def table2_metrics(scores: np.ndarray, truth: np.ndarray, k: int = K) -> dict[str, float]:
    """The columns of seed 003 Table 2 for (images × labels) scores."""
    out = dict(mean_average_precision(scores, truth))
    per_label = annotation_at_k(scores, truth, k)
    per_image = tag_prediction_at_k(scores, truth, k)
    out.update({f"precision_label@{k}": per_label[f"precision@{k}"], f"recall_label@{k}": per_label[f"recall@{k}"],
                f"precision_image@{k}": per_image[f"precision@{k}"], f"recall_image@{k}": per_image[f"recall@{k}"]})
    out.update(roc_auc(scores, truth))
    return with_nulls(out)


def visual_only_scores(train: SplitArrays, target: str, tags: int, x: np.ndarray, epochs: int = 30) -> np.ndarray:
    """Baseline "CNN + logistic (visual-only)": one-vs-all logistic regression on φ(x)."""
    from tagray.heads.fit import HeadConfig, fit

    y = multi_hot(train.targets(target), tags)
    model = fit(torch.from_numpy(train.x), y, HeadConfig(head="lr", epochs=epochs, lr=0.01, batch_size=256))
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def knn_voting_scores(train: SplitArrays, target: str, tags: int, x: np.ndarray, k: int = 50) -> np.ndarray:
    """Baseline "CNN + kNN voting": share of the k nearest training images (features) with each label."""
    from tagray.eval.report import knn_votes

    ids = train.targets(target)
    valid = ids >= 0
    offsets = np.r_[0, np.cumsum(valid.sum(1))].astype(np.int32)
    lists = pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids[valid]))
    return knn_votes(torch.from_numpy(train.x), lists, torch.from_numpy(x), tags, k)


def neighborhood_voting_scores(visual: np.ndarray, neighbors: np.ndarray, weight: float = 0.5) -> np.ndarray:
    """Baseline "image neighbourhoods + CNN voting": weight · v(x) + (1 − weight) · mean of v over
    x's metadata neighbours (its own score where it has none); v = visual-only scores."""
    valid = neighbors >= 0
    summed = np.where(valid[..., None], visual[np.maximum(neighbors, 0)], 0.0).sum(1)
    count = valid.sum(1, keepdims=True)
    mean = np.where(count > 0, summed / np.maximum(count, 1), visual)
    return weight * visual + (1 - weight) * mean


def neighbors_report(
    model_scores: np.ndarray, part: SplitArrays, neighbors: np.ndarray, train: SplitArrays | None, target: str,
    tags: int, with_baselines: bool = True,
) -> dict:
    """The report (module docstring) for a model's (N, tags) scores on `part`."""
    rows, cols, truth, kind = truth_of(part, tags)
    report = {"split": part.split, "images": len(part), "evaluated_images": int(len(rows)), "truth": kind,
              "labels": int(len(cols)), "model": table2_metrics(model_scores[rows][:, cols], truth)}
    if with_baselines and train is not None:
        visual = visual_only_scores(train, target, tags, part.x)
        knn = knn_voting_scores(train, target, tags, part.x)
        voting = neighborhood_voting_scores(visual, neighbors)
        report["baselines"] = {name: table2_metrics(s[rows][:, cols], truth)
                               for name, s in (("visual_only", visual), ("knn_voting", knn), ("neighborhood_voting", voting))}
    return report


def summary_lines(report: dict) -> list[str]:
    def line(name: str, m: dict) -> str:
        return (f"{name:<22} mAP_L {fmt(m['map_label'])}  mAP_I {fmt(m['map_image'])}  "
                f"P_L@3 {fmt(m['precision_label@3'])}  R_L@3 {fmt(m['recall_label@3'])}  AUC {fmt(m['macro_auc'])}")

    lines = [f"{report['split']} split, {report['evaluated_images']} images, truth: {report['truth']}",
             line("neighbourhood model", report["model"])]
    lines += [line(f"  {name}", m) for name, m in report.get("baselines", {}).items()]
    return lines
