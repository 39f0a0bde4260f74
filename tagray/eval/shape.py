"""The one report shape of `tagray evaluate` for every head (lr, rlr, embed, refine, neighbors).

A report is built here and nowhere else (`build_report`), printed by `summary_lines`, and
judged in words by `verdict`. Top-level keys (REPORT_KEYS; README documents them):

    report_version                  2
    head, split, images, labelled_images, tags, label_tags
    truth                           "labels": annotation / retrieval against the split's labelled
                                    images over the label tags; "tags": against the user tags
                                    (the weak setting, when the split has no labels)
    tag_prediction.{precision@k, recall@k, f1@k, images}      seed 001 Table 2 (user tags as truth)
    annotation.{precision@k, recall@k, f1@k, tags, map_label, map_image, micro_auc, macro_auc}
                                    seed 001 Table 3 at k; mAP_L / mAP_I, ROC-AUC (seeds 002, 003)
    retrieval.{p@k_1, p@k_2, p@k_3, queries_1, …}             seed 001 Table 4
    baselines.<name>.<tag_prediction|annotation|retrieval>.<same keys>
                                    every head: random, prior, knn, user_tags (the last without
                                    tag_prediction, whose truth it is, and left out when the truth
                                    is the user tags); neighbors adds visual_only and
                                    neighborhood_voting; refine adds phi0 (its ϕ0)
    verdict.{metric, model, learned, beats, below, message}   the model's annotation mAP_L
                                    against each baseline's, in words
    extras.<seed001|seed002|seed003>                          head-specific tables beside the above:
                                    seed001.pi (RLR's π), seed002.{refinement, annotation} (Tables 2–5),
                                    seed003.{k, model, baselines} (Table 2's @3 columns)

A metric undefined on a split is null with its reason under that block's `undefined`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from tagray.metrics import (
    annotation_at_k,
    fmt,
    mean_average_precision,
    retrieval_precision_at_k,
    roc_auc,
    tag_prediction_at_k,
    with_nulls,
)

if TYPE_CHECKING:
    from tagray.eval.report import EvalConfig

REPORT_VERSION = 2
REPORT_KEYS = ("report_version", "head", "split", "images", "labelled_images", "tags", "label_tags", "truth",
               "tag_prediction", "annotation", "retrieval", "baselines", "verdict", "extras")
TASKS = ("tag_prediction", "annotation", "retrieval")
MAIN_METRIC = ("annotation", "map_label")  # what the verdict compares (mAP_L of the report's annotation task)
SHOWN = {"map_label": "mAP_L", "map_image": "mAP_I", "micro_auc": "AUC", "macro_auc": "macro AUC"}


@dataclass(frozen=True)
class Truth:
    """What one split is scored against.

    tags:   (N, T) 0/1 user tags of the split's images (the truth of tag prediction);
    rows:   (R,) the images of annotation and retrieval; cols: (C,) their tag columns;
    labels: (R, C) 0/1 truth of annotation and retrieval; kind: "labels" or "tags"."""

    tags: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    labels: np.ndarray
    kind: str


def make_truth(tags: np.ndarray, labels: np.ndarray | None, labelled: np.ndarray, label_cols: np.ndarray) -> Truth:
    """Labels (`labels`: (len(labelled), len(label_cols)) 0/1) where the split has labelled images
    and the corpus label tags, else the user tags of every image over every tag (seed 003's weak
    setting). The label columns are the whole corpus's label vocabulary, so a model that predicts a
    label absent from this split pays for it in annotation precision, as in seed 001 §5.2."""
    tags = np.asarray(tags, dtype=np.float32)
    if labels is not None and len(labelled) and len(label_cols):
        return Truth(tags, np.asarray(labelled, np.int64), np.asarray(label_cols, np.int64),
                     np.asarray(labels, np.float32), "labels")
    return Truth(tags, np.arange(len(tags)), np.arange(tags.shape[1]), tags, "tags")


@dataclass(frozen=True)
class Scores:
    """One method's scores on a split: `tag` (N, T), higher = more likely tagged (None: no tag
    prediction); `label_log` (R, C) log-probabilities of the truth's rows × columns (retrieval
    ranks by their sum, the product of probabilities, seed 001 §5.3; None: no annotation)."""

    tag: np.ndarray | None
    label_log: np.ndarray | None


def log_probabilities(p: np.ndarray) -> np.ndarray:
    """log p with p clipped to float32's smallest normal number (a 0 vote stays finite and last)."""
    return np.log(np.clip(np.asarray(p, np.float32), np.finfo(np.float32).tiny, None))


def scores_of_probabilities(p: np.ndarray, truth: Truth) -> Scores:
    """Scores of a method that gives one probability-like matrix (N, T) for both tasks."""
    p = np.asarray(p, np.float32)
    return Scores(p, log_probabilities(p[truth.rows][:, truth.cols]))


def task_block(scores: Scores, truth: Truth, cfg: EvalConfig) -> dict:
    """The three tasks for one method (a task is left out when its scores are None)."""
    out: dict = {}
    if scores.tag is not None:
        out["tag_prediction"] = tag_prediction_at_k(scores.tag, truth.tags, cfg.k)
    if scores.label_log is not None and len(truth.rows):
        ann = annotation_at_k(scores.label_log, truth.labels, cfg.k)
        ann.update(mean_average_precision(scores.label_log, truth.labels))
        ann.update(roc_auc(scores.label_log, truth.labels))
        out["annotation"] = with_nulls(ann)
        terms = cfg.max_query_terms if len(truth.cols) <= cfg.retrieval_max_columns else 1
        retrieval = retrieval_precision_at_k(scores.label_log, truth.labels, terms, cfg.k)
        reasons = {f"p@{cfg.k}_{n}": f"no {n}-tag query has a relevant image" for n in range(1, terms + 1)}
        for n in range(terms + 1, cfg.max_query_terms + 1):  # multi-tag queries over thousands of columns
            retrieval[f"p@{cfg.k}_{n}"] = float("nan")
            reasons[f"p@{cfg.k}_{n}"] = (f"{n}-tag queries skipped: {len(truth.cols)} truth columns > "
                                         f"retrieval_max_columns={cfg.retrieval_max_columns}")
        out["retrieval"] = with_nulls(retrieval, reasons)
    return out


def main_metric(block: dict) -> float | None:
    """A task block's (or a report's) mAP_L, None where undefined or absent."""
    task, key = MAIN_METRIC
    value = (block.get(task) or {}).get(key)
    return None if value is None else float(value)


def _name(baseline: str) -> str:
    return baseline.replace("_", "-")


def verdict(
    model_metric: float | None, baselines: dict[str, float | None], metric: str = "map_label",
    must_beat: tuple[str, ...] = ("random", "prior", "visual_only", "phi0"),
) -> dict:
    """The model's `metric` against each baseline's, in words (issue 14: a model that ends below its
    own visual-only / prior baseline is reported as such). `learned` is False when the model does
    not beat (>) every baseline of `must_beat` present in `baselines` (None: nothing to judge by);
    baselines with an undefined metric (None) are left out. Returns {metric, model, learned,
    beats, below, message}; `beats` / `below` list baseline names, strongest first."""
    shown = SHOWN.get(metric, metric)
    known = {k: float(v) for k, v in baselines.items() if v is not None}
    if model_metric is None:
        return {"metric": metric, "model": None, "learned": None, "beats": [], "below": sorted(known),
                "message": f"the model's {shown} is undefined on this split: nothing to judge it by"}
    model_metric = float(model_metric)
    order = sorted(known, key=lambda k: -known[k])
    beats = [k for k in order if model_metric > known[k]]
    below = [k for k in order if model_metric <= known[k]]
    floor = [k for k in must_beat if k in known]

    def listed(names: list[str]) -> str:
        return ", ".join(f"{_name(k)} {known[k]:.3f}" for k in names)

    if not floor:
        learned = None
        head = (f"the model's {shown} is {model_metric:.3f}; this report has none of the baselines that decide "
                f"whether it learned ({', '.join(_name(k) for k in must_beat)})")
    elif any(k in below for k in floor):
        learned = False
        worst = [k for k in below if k in floor]
        which = " and ".join(f"{_name(k)}" for k in worst)
        head = (f"the model is below its {which} baseline{'s' if len(worst) > 1 else ''} "
                f"({shown} {model_metric:.3f} vs {listed(worst)}): it did not learn")
    else:
        learned = True
        head = f"the model learned ({shown} {model_metric:.3f} beats {listed([k for k in beats if k in floor])})"
    rest = [k for k in below if k not in floor]
    tail = []
    if beats and learned is not True:
        tail.append(f"it beats {listed(beats)}")
    elif learned is True and [k for k in beats if k not in floor]:
        tail.append(f"it also beats {listed([k for k in beats if k not in floor])}")
    if rest:
        tail.append(f"it is below {listed(rest)}")
    return {"metric": metric, "model": model_metric, "learned": learned, "beats": beats, "below": below,
            "message": "; ".join([head, *tail])}


def build_report(
    head: str, split: str | None, truth: Truth, model: Scores, baselines: dict[str, Scores], cfg: EvalConfig,
    labelled_images: int, extras: dict | None = None,
) -> dict:
    """The report (module docstring) of a model's scores and its baselines' on one split."""
    report: dict = {"report_version": REPORT_VERSION, "head": head, "split": split, "images": int(len(truth.tags)),
                    "labelled_images": int(labelled_images), "tags": int(truth.tags.shape[1]),
                    "label_tags": int(len(truth.cols)) if truth.kind == "labels" else 0, "truth": truth.kind}
    block = task_block(model, truth, cfg)
    for task in TASKS:
        report[task] = block.get(task)
    report["baselines"] = {name: task_block(s, truth, cfg) for name, s in baselines.items()}
    task, metric = MAIN_METRIC
    report["verdict"] = verdict(main_metric(block), {k: main_metric(b) for k, b in report["baselines"].items()},
                                metric, cfg.must_beat)
    report["verdict"]["metric"] = f"{task}.{metric}"
    report["extras"] = extras or {}
    return report


def _tasks_line(name: str, block: dict, k: int) -> str:
    parts = []
    tp, an, rt = block.get("tag_prediction"), block.get("annotation"), block.get("retrieval")
    if tp:
        parts.append(f"tag F1@{k} {fmt(tp.get(f'f1@{k}'))}")
    if an:
        parts.append(f"annotation F1@{k} {fmt(an.get(f'f1@{k}'))}  mAP_L {fmt(an.get('map_label'))}  "
                     f"mAP_I {fmt(an.get('map_image'))}  AUC {fmt(an.get('micro_auc'))}")
    if rt:
        shown = "/".join(fmt(rt.get(f"p@{k}_{n}")) for n in (1, 2, 3) if f"p@{k}_{n}" in rt)
        parts.append(f"retrieval P@{k} {shown}")
    return f"{name:<22} " + "  ".join(parts)


def _k_of(report: dict) -> int:
    tp = report.get("tag_prediction") or report.get("annotation") or {}
    for key in tp:
        if key.startswith("f1@"):
            return int(key[3:])
    return 5


def summary_lines(report: dict) -> list[str]:
    """Any head's report printed the same way: the model's three tasks in full, one line per
    baseline, the extras' headline figures, and the verdict in words."""
    k = _k_of(report)
    lines = [f"{report['head']} head, {report['split']} split: {report['images']} images, "
             f"{report['labelled_images']} labelled, truth: {report['truth']}"]
    tp, an, rt = report.get("tag_prediction"), report.get("annotation"), report.get("retrieval")
    if tp:
        lines.append(f"tag prediction   P@{k} {fmt(tp[f'precision@{k}'])}  R@{k} {fmt(tp[f'recall@{k}'])}  "
                     f"F1@{k} {fmt(tp[f'f1@{k}'])}")
    if an:
        lines.append(f"annotation       P@{k} {fmt(an[f'precision@{k}'])}  R@{k} {fmt(an[f'recall@{k}'])}  "
                     f"F1@{k} {fmt(an[f'f1@{k}'])}  mAP_L {fmt(an['map_label'])}  mAP_I {fmt(an['map_image'])}  "
                     f"AUC micro {fmt(an['micro_auc'])}  macro {fmt(an['macro_auc'])}")
    if rt:
        lines.append("retrieval        " + "  ".join(f"P@{k} {n}-tag {fmt(rt[f'p@{k}_{n}'])}"
                                                     for n in (1, 2, 3) if f"p@{k}_{n}" in rt))
    for name, block in report.get("baselines", {}).items():
        lines.append(_tasks_line(f"  baseline {name}", block, k))
    extras = report.get("extras", {})
    if "seed003" in extras:
        s3 = extras["seed003"]
        n = s3["k"]

        def t2(name: str, m: dict) -> str:
            return (f"  {name:<20} mAP_L {fmt(m['map_label'])}  mAP_I {fmt(m['map_image'])}  P_L@{n} "
                    f"{fmt(m[f'precision_label@{n}'])}  R_L@{n} {fmt(m[f'recall_label@{n}'])}  "
                    f"P_I@{n} {fmt(m[f'precision_image@{n}'])}  R_I@{n} {fmt(m[f'recall_image@{n}'])}")

        lines.append(f"seed 003 Table 2 (@{n})")
        lines += [t2("model", s3["model"])] + [t2(name, m) for name, m in s3.get("baselines", {}).items()]
    if "seed002" in extras:
        for task in ("refinement", "annotation"):
            r = extras["seed002"].get(task)
            if not r:
                continue
            lines.append(f"seed 002 {task} ({r['split']} split, {r['images']} images, truth: {r['truth']})")
            for name, m in r["methods"].items():
                lines.append(f"  {name:<13} miAP {fmt(m['map_image'])}  mAP {fmt(m['map_label'])}  "
                             f"AUC micro {fmt(m['micro_auc'])}  macro {fmt(m['macro_auc'])}")
    if "seed001" in extras and "pi" in extras["seed001"]:
        pi = extras["seed001"]["pi"]
        lines.append(f"tagging likelihoods π vs measured over {pi['tags']} tags: Spearman {fmt(pi['spearman'])}  "
                     f"median |error| {fmt(pi['median_abs_error'])}")
    lines.append("verdict: " + report["verdict"]["message"])
    return lines
