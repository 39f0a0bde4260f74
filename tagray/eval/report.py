"""`tagray evaluate`: the papers' three tasks for a linear head, with baselines, in one report.

Keys of the report (stable; README documents them):
    tag_prediction.{precision@5, recall@5, f1@5}                      P(y=1|x), user tags as truth
    annotation.{precision@5, recall@5, f1@5, map_label, map_image, micro_auc, macro_auc}
                                                                     P(z=1|x) (+β), labels as truth
    retrieval.{p@5_1, p@5_2, p@5_3}                                  product of P(z=1|x) over query tags
    baselines.<random|prior|user_tags|knn>.<task>.<metric>
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from tagray.data import storage
from tagray.eval.metrics import (
    annotation_at_k,
    mean_average_precision,
    retrieval_precision_at_k,
    roc_auc,
    tag_prediction_at_k,
    with_nulls,
)


class Tagger(Protocol):
    """What evaluation needs of a head (LinearTagger, EmbedTagger); `pi` only when robust."""

    tags: int
    robust: bool

    def probabilities(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def pi(self) -> torch.Tensor: ...


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    k: int = 5  # predictions per image (seed 001: 5; seed 003: 3)
    max_query_terms: int = 3  # retrieval: queries of 1 … this many tags
    knn: int = 50  # kNN-voting baseline: neighbours per image
    knn_max_train: int = 100_000  # kNN-voting baseline: training images searched (sampled)
    seed: int = 0  # random baseline and kNN sampling
    batch_size: int = 65_536  # images scored at a time

    def __post_init__(self) -> None:
        if min(self.k, self.knn, self.knn_max_train, self.batch_size) < 1 or not 1 <= self.max_query_terms <= 3:
            from tagray.config import ConfigError

            raise ConfigError("EvalConfig: need k, knn, knn_max_train, batch_size ≥ 1 and max_query_terms in 1…3")


@dataclass
class EvalData:
    """One split's features and targets, aligned."""

    x: torch.Tensor  # (N, D)
    tags: np.ndarray  # (N, T) 0/1 user tags
    labels: np.ndarray | None  # (N_l, T_l) 0/1 ground truth of the labelled images, label columns
    labelled: np.ndarray  # (N_l,) row indices of labelled images
    label_tags: np.ndarray  # (T_l,) tag indices that are annotation labels


def scores_of(model: Tagger, x: torch.Tensor, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(P(y=1|x), log P(z=1|x)) for every image, in batches (`model.probabilities`)."""
    p_tag, log_content = [], []
    with torch.inference_mode():
        for lo in range(0, len(x), batch_size):
            p, lc = model.probabilities(x[lo : lo + batch_size])
            p_tag.append(p)
            log_content.append(lc)
    return torch.cat(p_tag).numpy(), torch.cat(log_content).numpy()


def task_metrics(
    tag_scores: np.ndarray | None, label_log_scores: np.ndarray | None, data: EvalData, cfg: EvalConfig
) -> dict:
    """The three tasks for one set of scores; a task is left out when its scores are None.
    `label_log_scores` are log-probabilities of the labelled images over the label columns."""
    out: dict = {}
    if tag_scores is not None:
        out["tag_prediction"] = tag_prediction_at_k(tag_scores, data.tags, cfg.k)
    if label_log_scores is not None and data.labels is not None and len(data.labelled):
        ann = annotation_at_k(label_log_scores, data.labels, cfg.k)
        ann.update(mean_average_precision(label_log_scores, data.labels))
        ann.update(roc_auc(label_log_scores, data.labels))
        out["annotation"] = with_nulls(ann)
        retrieval = retrieval_precision_at_k(label_log_scores, data.labels, cfg.max_query_terms, cfg.k)
        out["retrieval"] = with_nulls(retrieval, {f"p@{cfg.k}_{n}": f"no {n}-tag query has a relevant image"
                                                  for n in range(1, cfg.max_query_terms + 1)})
    return out


def knn_votes(
    train_x: torch.Tensor, train_tags: pa.Array, query_x: torch.Tensor, tags: int, k: int
) -> np.ndarray:
    """kNN voting (a baseline of seeds 002/003): share of the k nearest training images (cosine
    similarity, exact faiss search) that carry each tag."""
    import faiss

    from tagray.heads.targets import dense

    base = torch.nn.functional.normalize(train_x, dim=1).numpy()
    query = torch.nn.functional.normalize(query_x, dim=1).numpy()
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    _, nn = index.search(query, min(k, len(base)))
    votes = np.zeros((len(query), tags), dtype=np.float32)
    train_dense = dense(train_tags, tags).numpy()
    for lo in range(0, len(query), 4096):
        votes[lo : lo + 4096] = train_dense[nn[lo : lo + 4096]].mean(1)
    return votes


def baselines(
    data: EvalData,
    prior: np.ndarray,
    knn_scores: np.ndarray | None,
    cfg: EvalConfig,
) -> dict:
    """random guess, tag prior (most frequent training tags), user tags as predictions
    (annotation and retrieval only: they are the truth of tag prediction), kNN voting."""
    rng = np.random.default_rng(cfg.seed)
    n, t = data.tags.shape
    cols = data.label_tags
    eps = 1e-6
    out: dict = {}
    random = rng.random((n, t)).astype(np.float32)
    out["random"] = task_metrics(random, np.log(random[data.labelled][:, cols]), data, cfg)
    tiled = np.broadcast_to(prior.astype(np.float32), (n, t))
    out["prior"] = task_metrics(tiled, np.log(tiled[data.labelled][:, cols] + eps), data, cfg)
    # A user tag first, then (to rank the rest) the prior; P(z) ≈ tagged ? high : prior.
    user = data.tags[data.labelled][:, cols] + 1e-3 * prior[cols]
    out["user_tags"] = task_metrics(None, np.log(user + eps), data, cfg)
    if knn_scores is not None:
        out["knn"] = task_metrics(knn_scores, np.log(knn_scores[data.labelled][:, cols] + eps), data, cfg)
    return out


def measured_pi(train_tags: np.ndarray, train_labels: np.ndarray) -> np.ndarray:
    """P(tag | label) measured on labelled training images, per label column (seed 001 Fig. 4)."""
    present = train_labels.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(present > 0, (train_tags * train_labels).sum(0) / present, np.nan)


def split_rows(targets: pa.Table, split: str | None) -> pa.Table:
    if split is None:
        return targets
    return targets.filter(pc.equal(targets.column("split"), split))


def load_split(
    targets: pa.Table, features: pa.Table, tags: int, split: str | None, label_tags: np.ndarray
) -> EvalData:
    """Features, user tags and (for labelled images) labels of one split, aligned by image_id."""
    from tagray.heads.fit import align
    from tagray.heads.targets import dense

    part = split_rows(targets, split)
    if part.num_rows == 0:
        raise ValueError(f"split '{split}' has no images in the manifest")
    x, found = align(features, part.column("image_id"))
    if len(found) == 0:
        raise ValueError(f"none of the {part.num_rows} images of split '{split}' has features")
    part = part.take(pa.array(found))
    y = dense(part.column("tag_ids"), tags).numpy()
    labelled = np.nonzero(part.column("labelled").to_numpy(zero_copy_only=False))[0]
    labels = None
    if len(labelled) and len(label_tags):
        labels = dense(part.column("label_ids"), tags).numpy()[labelled][:, label_tags]
    return EvalData(x=x, tags=y, labels=labels, labelled=labelled, label_tags=label_tags)


def evaluate_head(
    model: Tagger,
    targets: pa.Table,
    features: pa.Table,
    cfg: EvalConfig,
    split: str | None = "test",
    with_baselines: bool = True,
) -> tuple[dict, dict]:
    """The report (see module docstring) and the arrays its plots need."""
    from tagray.heads.fit import align
    from tagray.heads.targets import dense, label_vocabulary

    tags = model.tags
    label_tags = label_vocabulary(targets, tags)
    data = load_split(targets, features, tags, split, label_tags)
    p_tag, log_content = scores_of(model, data.x, cfg.batch_size)
    label_scores = log_content[data.labelled][:, label_tags] if data.labels is not None else None
    report: dict = {"split": split, "images": len(data.x), "labelled_images": int(len(data.labelled)),
                    "tags": tags, "label_tags": int(len(label_tags))}
    report.update(task_metrics(p_tag, label_scores, data, cfg))
    arrays: dict = {"label_scores": label_scores, "labels": data.labels, "label_tags": label_tags}
    train = split_rows(targets, "train")
    train_y = dense(train.column("tag_ids"), tags).numpy() if train.num_rows else np.zeros((0, tags), np.float32)
    prior = train_y.mean(0) if len(train_y) else data.tags.mean(0)
    if with_baselines:
        knn = None
        if train.num_rows:
            rng = np.random.default_rng(cfg.seed)
            take = np.sort(rng.permutation(train.num_rows)[: cfg.knn_max_train])
            sample = train.take(pa.array(take))
            train_x, found = align(features, sample.column("image_id"))
            if len(found):
                knn = knn_votes(train_x, sample.column("tag_ids").take(pa.array(found)), data.x, tags, cfg.knn)
        report["baselines"] = baselines(data, prior, knn, cfg)
    # Tagging likelihoods: the model's π against P(tag | label) measured on labelled training images.
    labelled_train = train.filter(train.column("labelled")) if train.num_rows else train
    if labelled_train.num_rows and len(label_tags) and model.robust:
        t_tags = dense(labelled_train.column("tag_ids"), tags).numpy()[:, label_tags]
        t_labels = dense(labelled_train.column("label_ids"), tags).numpy()[:, label_tags]
        measured = measured_pi(t_tags, t_labels)
        estimated = model.pi().numpy()[label_tags]
        ok = ~np.isnan(measured)
        from scipy.stats import pearsonr, spearmanr

        report["pi"] = {
            "tags": int(ok.sum()),
            "spearman": float(spearmanr(estimated[ok], measured[ok]).statistic) if ok.sum() > 2 else None,
            "pearson": float(pearsonr(estimated[ok], measured[ok]).statistic) if ok.sum() > 2 else None,
            "median_abs_error": float(np.median(np.abs(estimated[ok] - measured[ok]))) if ok.any() else None,
        }
        arrays["pi_measured"], arrays["pi_estimated"] = measured, estimated
    return report, arrays


def plot_report(arrays: dict, tag_names: list[str], out_dir: str, curves: int = 4) -> list[str]:
    """PNGs: estimated π against measured P(tag|label) (seed 001 Fig. 4), and precision–recall
    curves of the most frequent label tags (annotation scores). Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tagray.eval.metrics import precision_recall_curve

    files = []
    if "pi_measured" in arrays:
        m, e = arrays["pi_measured"], arrays["pi_estimated"]
        fig, ax = plt.subplots(figsize=(4.2, 4))
        ax.scatter(m, e, s=14)
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set(xlabel="measured P(tag | label), training images", ylabel="RLR estimate π",
               title="tagging likelihood (seed 001 Fig. 4)", xlim=(0, 1), ylim=(0, 1))
        fig.tight_layout()
        files.append(storage.join(out_dir, "pi_vs_measured.png"))
        fig.savefig(files[-1], dpi=100)
        plt.close(fig)
    if arrays.get("labels") is not None:
        labels, scores, cols = arrays["labels"], arrays["label_scores"], arrays["label_tags"]
        fig, ax = plt.subplots(figsize=(4.6, 4))
        for j in np.argsort(-labels.sum(0))[:curves]:
            precision, recall = precision_recall_curve(scores[:, j], labels[:, j])
            ax.plot(recall, precision, label=tag_names[cols[j]])
        ax.set(xlabel="recall", ylabel="precision", title="annotation: P(z=1|x)", xlim=(0, 1), ylim=(0, 1.02))
        ax.legend(fontsize=8)
        fig.tight_layout()
        files.append(storage.join(out_dir, "precision_recall.png"))
        fig.savefig(files[-1], dpi=100)
        plt.close(fig)
    return files
