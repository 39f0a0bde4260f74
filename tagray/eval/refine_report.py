"""Evaluation of a refinement network (seed 002) in the one report shape (`tagray.eval.shape`):
seed 001's three tasks on new images (annotation, `split`, default test) with the baselines of
every report and ϕ0 (`phi0`, the multi-label logistic model it starts from), plus, under
`extras.seed002`, the paper's Tables 2–5: miAP (per image), mAP (per tag), micro and macro AUC for

- refinement: scores of the training images themselves (the refined user tags), against
  UserTags (the user tags as they are), TagCooccur, TagVote, RandomGuess and ϕ0 (Multi-CNN);
- annotation: scores of new images, against RandomGuess, kNN and ϕ0.

Truth is the ground-truth labels over the label tags where a split has labelled images, else
the user tags (then refinement of the user tags against themselves is meaningless and only
annotation is informative). Keys: extras.seed002.<refinement|annotation>.{split, images, truth,
methods.<method>.<map_image|map_label|micro_auc|macro_auc>}. No Ray here.
"""

from __future__ import annotations

import numpy as np
import torch

from tagray.eval.report import EvalConfig, array_baselines, split_truth, tagger_scores
from tagray.eval.shape import build_report
from tagray.heads.refine import RefineNet, refine_scores
from tagray.heads.split_arrays import SplitArrays, SplitsData
from tagray.heads.targets import multi_hot
from tagray.metrics import mean_average_precision, roc_auc, with_nulls


def ranking_metrics(scores: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Seed 002's columns: mAP per label and per image, micro and macro ROC-AUC."""
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


def tag_vote_scores(x: np.ndarray, g: np.ndarray, k: int) -> np.ndarray:
    """TagVote (Li, Snoek & Worring 2009): votes of the k visual neighbours (image features, the
    image itself excluded) for each tag, minus the votes expected by chance, k · f(t) / N."""
    nn = visual_neighbors(x, x, k, exclude_self=True)
    votes = np.zeros_like(g)
    for lo in range(0, len(x), 4096):
        votes[lo : lo + 4096] = g[nn[lo : lo + 4096]].sum(1)
    return votes - nn.shape[1] * g.mean(0, keepdims=True)


def seed002_tables(
    scores: dict[str, dict[str, np.ndarray]], parts: dict[str, SplitArrays], split: str, tags: int, cfg: EvalConfig,
    knn: np.ndarray | None, with_baselines: bool = True,
) -> dict:
    """Seed 002 Tables 2–5. `scores[method][split]` are (N, tags) scores of each model ("model",
    "multi_cnn" = ϕ0) on the train split and on `split`; `knn`: the kNN votes on `split`."""
    from tagray.data.tag_similarity import cooccurrence

    train = parts["train"]
    g_train = multi_hot(train.tag_ids, tags).numpy()
    out: dict = {}
    for task, name in (("refinement", "train"), ("annotation", split)):
        truth = split_truth(parts, name, tags)
        methods = {method: s[name] for method, s in scores.items()}
        if with_baselines:
            rng = np.random.default_rng(cfg.seed)
            methods["random_guess"] = rng.random((len(parts[name]), tags)).astype(np.float32)
            if task == "refinement":
                counts, co = cooccurrence(train.tag_ids, tags)
                methods["user_tags"] = g_train
                methods["tag_cooccur"] = tag_cooccur_scores(g_train, counts, co)
                methods["tag_vote"] = tag_vote_scores(train.x, g_train, cfg.tag_vote_k)
            elif knn is not None:
                methods["knn"] = knn
        out[task] = {"split": name, "images": int(len(truth.rows)), "truth": truth.kind,
                     "methods": {m: ranking_metrics(s[truth.rows][:, truth.cols], truth.labels)
                                 for m, s in methods.items()}}
    return out


def evaluate_refine_model(
    model: RefineNet, phi0: RefineNet | None, data: SplitsData, with_baselines: bool = True, split: str = "test",
    eval_cfg: EvalConfig | None = None,
) -> dict:
    """The report of a refinement network on `split` of `data` (annotation of new images), with ϕ0
    (None when not at hand, e.g. a saved model) as the `phi0` baseline, and seed 002's tables."""
    cfg = eval_cfg or EvalConfig()
    if split not in data.parts or "train" not in data.parts:
        raise ValueError(f"the data has splits {sorted(data.parts)}; evaluation needs train and {split}")
    models = {"model": model, **({"multi_cnn": phi0} if phi0 is not None else {})}
    names = ("train", split)
    scores = {name: {s: refine_scores(m, torch.from_numpy(data.parts[s].x)).numpy() for s in names}
              for name, m in models.items()}
    truth = split_truth(data.parts, split, data.tags)
    baselines = array_baselines(data.parts, split, truth, data.tags, cfg) if with_baselines else {}
    if phi0 is not None and with_baselines:
        baselines["phi0"] = tagger_scores(phi0.eval(), data.parts[split].x, truth, cfg.batch_size)
    knn = baselines["knn"].tag if "knn" in baselines else None
    extras = {"seed002": seed002_tables(scores, data.parts, split, data.tags, cfg, knn, with_baselines)}
    mine = tagger_scores(model.eval(), data.parts[split].x, truth, cfg.batch_size)  # as `evaluate_head` scores it
    return build_report("refine", split, truth, mine, baselines, cfg, int(data.parts[split].labelled.sum()), extras)


def evaluate_saved_refine(
    model_dir: str, manifest_uri: str, features_uri: str, split: str = "test", with_baselines: bool = True,
    endpoint_url: str | None = None, eval_cfg: EvalConfig | None = None,
) -> dict:
    """`tagray evaluate` of a saved refinement network: its normaliser and vocabulary, the train
    split and `split` of this manifest as arrays, the report (no ϕ0: a saved model has only ϕ)."""
    from tagray.data.normalize import TagNormalizer
    from tagray.features import store
    from tagray.heads.models import load_model

    head = load_model(model_dir, endpoint_url)
    normalizer = TagNormalizer.from_identity(head.vocab.normalizer)
    data = SplitsData(manifest_uri, features_uri, normalizer, endpoint_url, splits=tuple(dict.fromkeys(("train", split))),
                      vocab=head.vocab)
    store.require_same(data.identity, head.backbone, features_uri, model_dir)
    report = evaluate_refine_model(head.model, None, data, with_baselines, split, eval_cfg)
    report["model_dir"] = model_dir
    return report
