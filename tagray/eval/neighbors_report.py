"""Evaluation of a metadata-neighbourhood model (seed 003) in the one report shape
(`tagray.eval.shape`): seed 001's three tasks, mAP_L / mAP_I / AUC and the baselines of every
report, plus the paper's own baselines (visual-only logistic, image neighbourhoods + voting) and,
under `extras.seed003`, Table 2's columns at n = 3 (per-label and per-image precision / recall).

The model scores an image with its metadata neighbours, which come from the same split (seed 003
§3.1): `evaluate_neighbors_model` takes them from the split arrays' neighbours
(`heads.split_arrays.metadata_neighbors`); `evaluate_saved_neighbors` recomputes them for a saved
model on a manifest (`tagray evaluate`). No Ray here.
"""

from __future__ import annotations

import numpy as np
import torch

from tagray.eval.report import EPS, EvalConfig, array_baselines, split_truth, tagger_scores
from tagray.eval.shape import Scores, Truth, build_report
from tagray.heads.neighborhood import NeighborhoodNet, NeighborsConfig, neighborhood_scores
from tagray.heads.split_arrays import SplitArrays, SplitsData
from tagray.heads.targets import multi_hot
from tagray.metrics import (
    annotation_at_k,
    mean_average_precision,
    roc_auc,
    tag_prediction_at_k,
    with_nulls,
)


def table2_metrics(scores: np.ndarray, truth: np.ndarray, k: int) -> dict[str, float]:
    """The columns of seed 003 Table 2 for (images × labels) scores: mAP_L, mAP_I, per-label and
    per-image precision / recall at k (labels per image, §4.2), micro and macro AUC."""
    out = dict(mean_average_precision(scores, truth))
    per_label = annotation_at_k(scores, truth, k)
    per_image = tag_prediction_at_k(scores, truth, k)
    out.update({f"precision_label@{k}": per_label[f"precision@{k}"], f"recall_label@{k}": per_label[f"recall@{k}"],
                f"precision_image@{k}": per_image[f"precision@{k}"], f"recall_image@{k}": per_image[f"recall@{k}"]})
    out.update(roc_auc(scores, truth))
    return with_nulls(out)


def visual_only_model(train: SplitArrays, target: str, tags: int, cfg: EvalConfig):
    """Baseline "CNN + logistic (visual-only)" (seed 003 Table 2): one-vs-all logistic regression
    on φ(x) alone, trained on the train split's `target` ids with EvalConfig's settings."""
    from tagray.heads.fit import HeadConfig
    from tagray.heads.recipes.linear import fit

    y = multi_hot(train.targets(target), tags)
    head = HeadConfig(head="lr", epochs=cfg.visual_only_epochs, lr=cfg.visual_only_lr,
                      batch_size=min(cfg.visual_only_batch_size, len(train)), seed=cfg.seed)
    return fit(torch.from_numpy(train.x), y, head, progress=False)  # a baseline: no epoch lines in the report


def neighborhood_voting_scores(visual: np.ndarray, neighbors: np.ndarray, weight: float) -> np.ndarray:
    """Baseline "image neighbourhoods + CNN voting": weight · v(x) + (1 − weight) · mean of v over
    x's metadata neighbours (its own score where it has none); v = visual-only scores."""
    valid = neighbors >= 0
    summed = np.where(valid[..., None], visual[np.maximum(neighbors, 0)], 0.0).sum(1)
    count = valid.sum(1, keepdims=True)
    mean = np.where(count > 0, summed / np.maximum(count, 1), visual)
    return weight * visual + (1 - weight) * mean


def logit_scores(logits: np.ndarray, truth: Truth) -> Scores:
    """Scores of a model whose outputs are logits: ranks by the logit, log σ for retrieval."""
    log_p = torch.nn.functional.logsigmoid(torch.from_numpy(np.asarray(logits, np.float32)))
    return Scores(np.asarray(logits, np.float32), log_p.numpy()[truth.rows][:, truth.cols])


def neighbors_scores_report(
    logits: np.ndarray, parts: dict[str, SplitArrays], split: str, neighbors: np.ndarray, target: str, tags: int,
    cfg: EvalConfig, with_baselines: bool = True,
) -> dict:
    """The report of a neighbourhood model's (N, tags) test-time scores s(x) (eq. 1, logits) on
    `split` of `parts`, with `neighbors` that split's metadata neighbours (rows into it)."""
    part = parts[split]
    truth = split_truth(parts, split, tags)
    rows, cols = truth.rows, truth.cols
    table2 = {"k": cfg.table2_k, "target": target,
              "model": table2_metrics(np.asarray(logits)[rows][:, cols], truth.labels, cfg.table2_k)}
    baselines: dict[str, Scores] = {}
    if with_baselines:
        baselines = array_baselines(parts, split, truth, tags, cfg, target)
        visual_model = visual_only_model(parts["train"], target, tags, cfg)
        visual = tagger_scores(visual_model, part.x, truth, cfg.batch_size)
        baselines["visual_only"] = visual
        voted = neighborhood_voting_scores(visual.tag, neighbors, cfg.neighborhood_voting_weight)
        baselines["neighborhood_voting"] = Scores(voted, np.log(voted[rows][:, cols] + EPS))
        table2["baselines"] = {
            name: table2_metrics(baselines[key].tag[rows][:, cols], truth.labels, cfg.table2_k)
            for name, key in (("visual_only", "visual_only"), ("knn_voting", "knn"),
                              ("neighborhood_voting", "neighborhood_voting"))}
    return build_report("neighbors", split, truth, logit_scores(logits, truth), baselines, cfg,
                        int(part.labelled.sum()), {"seed003": table2})


def evaluate_neighbors_model(
    model: NeighborhoodNet, data: SplitsData, cfg: NeighborsConfig, split: str = "test", with_baselines: bool = True,
    neighbors: dict[str, np.ndarray] | None = None, eval_cfg: EvalConfig | None = None,
) -> dict:
    """The report of a neighbourhood model on `split` of `data` (a SplitsData with the train
    split): scores are the mean over `cfg.test_samples` sampled neighbourhoods (seed 003 §3.2).
    `neighbors`: {split: (N, M) metadata neighbours}; default `data.neighbors` (NeighborsData)."""
    neighbors = neighbors if neighbors is not None else getattr(data, "neighbors", None)
    if neighbors is None or split not in neighbors:
        raise ValueError(f"no metadata neighbours for the {split} split: pass neighbors= (heads.split_arrays."
                         "metadata_neighbors)")
    if split not in data.parts or "train" not in data.parts:
        raise ValueError(f"the data has splits {sorted(data.parts)}; evaluation needs train and {split}")
    part = data.parts[split]
    logits = neighborhood_scores(model, torch.from_numpy(part.x), neighbors[split], cfg.m, cfg.test_samples, cfg.seed)
    return neighbors_scores_report(logits.numpy(), data.parts, split, neighbors[split], cfg.target, data.tags,
                                   eval_cfg or EvalConfig(), with_baselines)


def evaluate_saved_neighbors(
    model_dir: str, manifest_uri: str, features_uri: str, split: str = "test", with_baselines: bool = True,
    endpoint_url: str | None = None, eval_cfg: EvalConfig | None = None,
) -> dict:
    """`tagray evaluate` of a saved neighbourhood model: its normaliser and vocabulary, the
    metadata neighbours recomputed within each split of this manifest (seed 003 §3.1), the report."""
    from tagray.data.normalize import TagNormalizer
    from tagray.features import store
    from tagray.heads.models import load_model
    from tagray.heads.split_arrays import metadata_lists, metadata_neighbors

    head = load_model(model_dir, endpoint_url)
    normalizer = TagNormalizer.from_identity(head.vocab.normalizer)
    data = SplitsData(manifest_uri, features_uri, normalizer, endpoint_url, splits=tuple(dict.fromkeys(("train", split))),
                      vocab=head.vocab)
    store.require_same(data.identity, head.backbone, features_uri, model_dir)
    lists = metadata_lists(data.manifest, head.config.metadata, normalizer)
    neighbors = metadata_neighbors(lists, data.manifest.column("split"), list(data.parts.values()), head.config)
    report = evaluate_neighbors_model(head.model, data, head.config, split, with_baselines, neighbors, eval_cfg)
    report["model_dir"] = model_dir
    return report
