"""`tagray evaluate` of a head that tags an image from its features (lr, rlr, embed, refine):
seed 001's three tasks with the baselines, in the one report shape of `tagray.eval.shape`.

Also what every head's evaluation shares: `EvalConfig` (the evaluation's and the baselines'
settings, their only defaults), the baselines every report carries (random, prior, user tags,
kNN voting: `common_baselines`) and the truth of a split held as arrays (`split_truth`).
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
from tagray.eval.shape import Scores, Truth, build_report, make_truth, task_block
from tagray.heads.split_arrays import SplitArrays
from tagray.heads.targets import multi_hot, padded_ids


class Tagger(Protocol):
    """What evaluation needs of a head (LinearTagger, EmbedTagger, RefineNet); `pi` only when robust."""

    tags: int
    robust: bool

    def probabilities(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def pi(self) -> torch.Tensor: ...


log = logging.getLogger(__name__)

EPS = 1e-6  # added to a baseline's 0 votes before the log (retrieval multiplies probabilities)


@dataclass(frozen=True)
class EvalConfig:
    k: int = 5  # predictions per image (seed 001: 5)
    max_query_terms: int = 3  # retrieval: queries of 1 … this many tags (seed 001 Table 4)
    retrieval_max_columns: int = 128  # more truth columns than this (e.g. user tags as truth): 1-tag queries only (2-, 3-tag: null)
    batch_size: int = 65_536  # images scored at a time
    seed: int = 0  # random baseline, kNN sampling, the visual-only baseline's training
    knn: int = 50  # kNN voting baseline (seeds 002, 003): neighbours per image
    knn_max_train: int = 100_000  # kNN voting baseline: training images searched (sampled)
    visual_only_epochs: int = 30  # neighbors' "CNN + logistic (visual-only)" baseline (seed 003 Table 2): LR epochs
    visual_only_lr: float = 0.01  # … its learning rate
    visual_only_batch_size: int = 256  # … its minibatch
    neighborhood_voting_weight: float = 0.5  # "image neighbourhoods + voting": weight of the image's own scores
    table2_k: int = 3  # seed 003 Table 2: labels per image of the @k columns (seed 003 §4.2)
    tag_vote_k: int = 50  # seed 002's TagVote baseline: visual neighbours (Li, Snoek & Worring 2009)
    # the baselines a model must beat for the verdict to say it learned (others are reported, not decisive)
    must_beat: tuple[str, ...] = ("random", "prior", "visual_only", "phi0")

    def __post_init__(self) -> None:
        from tagray.config import ConfigError

        ints = {"k": self.k, "retrieval_max_columns": self.retrieval_max_columns, "batch_size": self.batch_size,
                "knn": self.knn, "knn_max_train": self.knn_max_train, "visual_only_epochs": self.visual_only_epochs,
                "visual_only_batch_size": self.visual_only_batch_size, "table2_k": self.table2_k,
                "tag_vote_k": self.tag_vote_k}
        low = [name for name, v in ints.items() if not v >= 1]
        if low:
            raise ConfigError(f"EvalConfig: {', '.join(low)} must be ≥ 1")
        if not 1 <= self.max_query_terms <= 3:
            raise ConfigError(f"EvalConfig: max_query_terms must be in 1…3, got {self.max_query_terms}")
        if not self.visual_only_lr > 0:
            raise ConfigError(f"EvalConfig: visual_only_lr must be > 0, got {self.visual_only_lr}")
        if not 0 <= self.neighborhood_voting_weight <= 1:
            raise ConfigError(f"EvalConfig: neighborhood_voting_weight must be in [0, 1], got {self.neighborhood_voting_weight}")


@dataclass
class EvalData:
    """One split's features and targets, aligned."""

    x: torch.Tensor  # (N, D)
    tags: np.ndarray  # (N, T) 0/1 user tags
    labels: np.ndarray | None  # (N_l, T_l) 0/1 ground truth of the labelled images, label columns
    labelled: np.ndarray  # (N_l,) row indices of labelled images
    label_tags: np.ndarray  # (T_l,) tag indices that are annotation labels

    def truth(self) -> Truth:
        return make_truth(self.tags, self.labels, self.labelled, self.label_tags)


def scores_of(model: Tagger, x: torch.Tensor, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(P(y=1|x), log P(z=1|x)) for every image, in batches (`model.probabilities`)."""
    p_tag, log_content = [], []
    with torch.inference_mode():
        for lo in range(0, len(x), batch_size):
            p, lc = model.probabilities(x[lo : lo + batch_size])
            p_tag.append(p)
            log_content.append(lc)
    return torch.cat(p_tag).numpy(), torch.cat(log_content).numpy()


def tagger_scores(model: Tagger, x: torch.Tensor | np.ndarray, truth: Truth, batch_size: int) -> Scores:
    """A Tagger's scores: P(y=1|x) for tag prediction, log P(z=1|x) for annotation and retrieval."""
    p_tag, log_content = scores_of(model, torch.as_tensor(x), batch_size)
    return Scores(p_tag, log_content[truth.rows][:, truth.cols])


def task_metrics(
    tag_scores: np.ndarray | None, label_log_scores: np.ndarray | None, data: EvalData, cfg: EvalConfig
) -> dict:
    """The three tasks for one set of scores (`shape.task_block`); a task is left out when its
    scores are None. `label_log_scores` are log-probabilities of the labelled images over the
    label columns (ignored when `data` has no labels)."""
    truth = data.truth()
    return task_block(Scores(tag_scores, label_log_scores if truth.kind == "labels" else None), truth, cfg)


def knn_votes(
    train_x: torch.Tensor | np.ndarray, train_tags: pa.Array | pa.ChunkedArray | np.ndarray,
    query_x: torch.Tensor | np.ndarray, tags: int, k: int, chunk: int = 1024,
) -> np.ndarray:
    """kNN voting (a baseline of seeds 002/003): share of the k nearest training images (cosine
    similarity, exact faiss search) that carry each tag. `train_tags`: lists of tag ids (Arrow)
    or an (N, W) array of ids padded with −1."""
    import faiss

    if not isinstance(train_tags, np.ndarray):
        lists = train_tags.combine_chunks() if isinstance(train_tags, pa.ChunkedArray) else train_tags
        width = int(pc.max(pc.list_value_length(lists)).as_py() or 1) if len(lists) else 1
        train_tags = padded_ids(lists, max(width, 1))
    base = torch.nn.functional.normalize(torch.as_tensor(train_x, dtype=torch.float32), dim=1).numpy()
    query = torch.nn.functional.normalize(torch.as_tensor(query_x, dtype=torch.float32), dim=1).numpy()
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    kk = min(k, len(base))
    _, nn = index.search(query, kk)
    ids = torch.from_numpy(np.ascontiguousarray(train_tags, dtype=np.int64))
    votes = np.zeros((len(query), tags), dtype=np.float32)
    for lo in range(0, len(query), chunk):
        got = ids[torch.from_numpy(nn[lo : lo + chunk])].reshape(len(nn[lo : lo + chunk]), -1)  # (c, k·W)
        counts = torch.zeros(len(got), tags + 1).scatter_add_(1, torch.where(got >= 0, got, tags), torch.ones(got.shape))
        votes[lo : lo + chunk] = (counts[:, :tags] / kk).numpy()
    return votes


def common_baselines(truth: Truth, prior: np.ndarray, knn: np.ndarray | None, cfg: EvalConfig) -> dict[str, Scores]:
    """The baselines of every report (SPEC §6): random guess; the tag prior (the training images'
    tag frequencies, the same for every image); user tags as predictions (annotation and retrieval
    only, ranked by the prior after the user's tags; left out when the truth is the user tags);
    kNN voting (`knn`: (N, T) votes, None to leave it out)."""
    rng = np.random.default_rng(cfg.seed)
    n, t = truth.tags.shape
    rows, cols = truth.rows, truth.cols
    random = rng.random((n, t)).astype(np.float32)
    out = {"random": Scores(random, np.log(random[rows][:, cols] + EPS))}
    tiled = np.broadcast_to(np.asarray(prior, np.float32), (n, t))
    out["prior"] = Scores(tiled, np.log(tiled[rows][:, cols] + EPS))
    if truth.kind == "labels":
        user = truth.tags[rows][:, cols] + 1e-3 * np.asarray(prior, np.float32)[cols]
        out["user_tags"] = Scores(None, np.log(user + EPS))
    if knn is not None:
        out["knn"] = Scores(knn, np.log(knn[rows][:, cols] + EPS))
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


def head_name(model: object) -> str:
    """The `head` a report names for an in-process model (lr, rlr, embed, refine)."""
    kind = type(model).__name__
    if kind == "LinearTagger":
        return "rlr" if model.robust else "lr"  # type: ignore[attr-defined]
    return {"EmbedTagger": "embed", "RefineNet": "refine", "NeighborhoodNet": "neighbors"}.get(kind, kind)


def pi_extras(model: Tagger, train: pa.Table, label_tags: np.ndarray, tags: int) -> tuple[dict | None, dict]:
    """Seed 001 Fig. 4: RLR's π against P(tag | label) measured on the labelled training images
    (None when the model is not robust or nothing is labelled), and the arrays of its plot."""
    from tagray.heads.targets import dense

    labelled_train = train.filter(train.column("labelled")) if train.num_rows else train
    if not (labelled_train.num_rows and len(label_tags) and model.robust):
        return None, {}
    t_tags = dense(labelled_train.column("tag_ids"), tags).numpy()[:, label_tags]
    t_labels = dense(labelled_train.column("label_ids"), tags).numpy()[:, label_tags]
    measured = measured_pi(t_tags, t_labels)
    estimated = model.pi().numpy()[label_tags]
    ok = ~np.isnan(measured)
    from scipy.stats import pearsonr, spearmanr

    from tagray.metrics import with_nulls

    varies = ok.sum() > 2 and np.ptp(estimated[ok]) > 0 and np.ptp(measured[ok]) > 0
    pi = with_nulls({
        "tags": int(ok.sum()),
        "spearman": float(spearmanr(estimated[ok], measured[ok]).statistic) if varies else float("nan"),
        "pearson": float(pearsonr(estimated[ok], measured[ok]).statistic) if varies else float("nan"),
        "median_abs_error": float(np.median(np.abs(estimated[ok] - measured[ok]))) if ok.any() else float("nan"),
    }, {"spearman": "fewer than 3 tags, or π or the measured rates all equal",
        "pearson": "fewer than 3 tags, or π or the measured rates all equal",
        "median_abs_error": "no label tag is present on a labelled training image"})
    return pi, {"pi_measured": measured, "pi_estimated": estimated}


def evaluate_head(
    model: Tagger,
    targets: pa.Table,
    features: pa.Table,
    cfg: EvalConfig,
    split: str | None = "test",
    with_baselines: bool = True,
    head: str | None = None,
) -> tuple[dict, dict]:
    """The report (`tagray.eval.shape`) of a head that tags from features alone, on `split` of
    `targets` (build_targets of the whole manifest), and the arrays its plots need."""
    from tagray.heads.fit import align
    from tagray.heads.targets import dense, label_vocabulary

    tags = model.tags
    label_tags = label_vocabulary(targets, tags)
    data = load_split(targets, features, tags, split, label_tags)
    truth = data.truth()
    scores = tagger_scores(model, data.x, truth, cfg.batch_size)
    train = split_rows(targets, "train")
    baselines: dict[str, Scores] = {}
    if with_baselines:
        train_y = dense(train.column("tag_ids"), tags).numpy() if train.num_rows else data.tags
        knn = None
        if train.num_rows:
            rng = np.random.default_rng(cfg.seed)
            take = np.sort(rng.permutation(train.num_rows)[: cfg.knn_max_train])
            sample = train.take(pa.array(take))
            train_x, found = align(features, sample.column("image_id"))
            if len(found):
                knn = knn_votes(train_x, sample.column("tag_ids").take(pa.array(found)), data.x, tags, cfg.knn)
        baselines = common_baselines(truth, train_y.mean(0), knn, cfg)
    pi, pi_arrays = pi_extras(model, train, label_tags, tags)
    extras = {"seed001": {"pi": pi}} if pi is not None else {}
    report = build_report(head or head_name(model), split, truth, scores, baselines, cfg, len(data.labelled), extras)
    arrays: dict = {"label_scores": scores.label_log, "labels": truth.labels, "label_tags": truth.cols, **pi_arrays}
    return report, arrays


def split_truth(parts: dict[str, SplitArrays], split: str, tags: int) -> Truth:
    """`shape.make_truth` of one split held as arrays (SplitsData.parts): the label columns are
    the tags that are a label of some labelled image of the train split or of `split` (so the
    report does not depend on which other splits were read)."""
    part = parts[split]
    seen = [p.label_ids[p.labelled] for p in (parts["train"], part) if p.labelled.any()]
    flat = np.concatenate([s.ravel() for s in seen]) if seen else np.zeros(0, np.int32)
    label_cols = np.unique(flat[flat >= 0]).astype(np.int64)
    labelled = np.nonzero(part.labelled)[0]
    labels = multi_hot(part.label_ids[labelled], tags).numpy()[:, label_cols] if len(labelled) else None
    return make_truth(multi_hot(part.tag_ids, tags).numpy(), labels, labelled, label_cols)


def array_baselines(
    parts: dict[str, SplitArrays], split: str, truth: Truth, tags: int, cfg: EvalConfig, target: str = "tags"
) -> dict[str, Scores]:
    """`common_baselines` for a split held as arrays: prior and kNN votes from the train split's
    `target` ids (user tags, or labels for a head trained on labels)."""
    train, part = parts["train"], parts[split]
    ids = train.targets(target)
    rng = np.random.default_rng(cfg.seed)
    take = np.sort(rng.permutation(len(train))[: cfg.knn_max_train])
    knn = knn_votes(train.x[take], ids[take], part.x, tags, cfg.knn) if len(take) else None
    prior = multi_hot(ids, tags).numpy().mean(0) if len(train) else truth.tags.mean(0)
    return common_baselines(truth, prior, knn, cfg)


def plot_report(arrays: dict, tag_names: list[str], out_dir: str, curves: int = 4) -> list[str]:
    """PNGs: estimated π against measured P(tag|label) (seed 001 Fig. 4), and precision–recall
    curves of the most frequent label tags (annotation scores). Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tagray.metrics import precision_recall_curve

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
    if arrays.get("labels") is not None and arrays.get("label_scores") is not None:
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
