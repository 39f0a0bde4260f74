"""Issue 14, "defaults that learn": every head trained with its shipped defaults — the config
dataclass's field defaults (`HeadConfig(head="lr")`, `HeadConfig()`, `EmbedConfig()`,
`NeighborsConfig()`, `RefineConfig()`), nothing overridden — on the default synthetic corpus
(`tagray synth --features-only --images N`: SynthConfig's defaults but `images`; split by
SplitConfig's defaults) beats every baseline its own report prints, on the test split.

The metric is the one report shape's (tagray.eval.shape): annotation mAP per label (the labelled
test images over the label tags), which is also what the report's verdict judges; heads that
predict user tags must also beat each baseline's tag-prediction F1@k. Training runs in-process
through each head's recipe (`run_recipe` under a LocalSession: the loop Ray Train and Ray Tune
run), seeded, one torch thread.

Tiers: lr, rlr and embed at 3,000 images are the fast tier (seconds each on one free core:
80–160 steps); neighbors at 3,000 (min_steps 4,000: ~40 s), refine (90 ϕ0 steps, then 9,000
Algorithm 1 steps each forwarding 8 × 512 candidates: about 10 minutes on one free core at
3,000 images) and every 20,000-image case are the slow tier (`make test-slow`). Cases marked
`xfail(strict=True)` fail today with the figures in their reasons (open defects of issue 14,
diagnosed in BENCHMARKS.md, *Shipped defaults against their baselines*): when a change to the
defaults makes one pass, its strict mark fails, which is the signal to remove it. refine-20k
was not measured (CPU time), so it carries no mark.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from tagray.config import load_config
from tagray.data.normalize import NormalizerConfig, TagNormalizer
from tagray.data.synth import SynthConfig
from tagray.eval.report import EvalConfig, evaluate_head
from tagray.features.store import read_features
from tagray.heads.split_arrays import SplitsData, metadata_lists, metadata_neighbors
from tagray.heads.targets import build_targets, multi_hot
from tests.corpora import split_corpus

NEIGHBORS_OPEN = pytest.mark.xfail(
    strict=True,
    reason="open (issue 14): NeighborsConfig's shipped defaults (standardised φ, lr 3e-4, min_steps 4,000, early "
           "stopping) end at annotation mAP_L 0.777, below visual-only 0.858 and neighbourhood voting 0.785; the same "
           "model with its neighbourhoods emptied reaches 0.845: on this corpus labels are a function of the features "
           "and the neighbours only add noise (2026-12-07); BENCHMARKS.md, *Shipped defaults against their "
           "baselines*")
NEIGHBORS_20K_OPEN = pytest.mark.xfail(
    strict=True,
    reason="open (issue 14): at 20,000 images the shipped neighbours defaults end at annotation mAP_L 0.929, below "
           "visual-only 0.950 (emptied neighbourhoods: 0.974) (2026-12-07); BENCHMARKS.md, *Shipped defaults*")
REFINE_OPEN = pytest.mark.xfail(
    strict=True,
    reason="open (issue 14): RefineConfig's shipped defaults (ϕ0 for min_init_steps 800 Adam steps, then 30 epochs "
           "of Algorithm 1) end at 3,000 images at annotation mAP_L 0.722, above kNN 0.650 but below their own ϕ0's "
           "0.728: the refinement does not improve on ϕ0 there (lr 0.01: 0.713, 0.1: 0.702) (2026-12-07); "
           "BENCHMARKS.md, *Shipped defaults against their baselines*")


@dataclasses.dataclass
class Corpus:
    data: SplitsData
    targets: object  # build_targets of the whole manifest (evaluate_head's input)
    features: object
    normalizer: TagNormalizer
    features_uri: str


_CORPORA: dict[int, Corpus] = {}


def default_corpus(images: int, tmp_path_factory) -> Corpus:
    """`synth --features-only --images N` with SynthConfig's other defaults, split by SplitConfig's;
    built once per size per session."""
    if images not in _CORPORA:
        out: Path = tmp_path_factory.mktemp(f"defaults_{images}")
        c = split_corpus(out, images, SynthConfig.seed, SynthConfig.feature_dim)
        normalizer = TagNormalizer(load_config(NormalizerConfig, "normalize.yaml"))
        data = SplitsData(c["manifest"], c["features"], normalizer)
        features, _ = read_features(c["features"])
        _CORPORA[images] = Corpus(data, build_targets(data.manifest, normalizer, data.vocab), features, normalizer,
                                  c["features"])
    return _CORPORA[images]


def train_and_report(head: str, corpus: Corpus) -> dict:
    """`head` trained with its config dataclass's defaults on the train split; its report on test."""
    torch.set_num_threads(1)
    data = corpus.data
    train = data.parts["train"]
    x = torch.from_numpy(train.x)
    if head in ("lr", "rlr"):
        from tagray.heads.fit import HeadConfig
        from tagray.heads.recipes.linear import fit

        cfg = HeadConfig(head=head)  # the lr head is HeadConfig with head=lr: its only difference from rlr
        model = fit(x, multi_hot(train.tag_ids, data.tags), cfg)
        return evaluate_head(model, corpus.targets, corpus.features, EvalConfig(), "test")[0]
    if head == "embed":
        from tagray.data.word_vectors import word_table_init
        from tagray.heads.embedding import EmbedConfig, EmbedTagger
        from tagray.heads.recipes.embed import fit_embed
        from tagray.heads.user_tags import fit_on_split
        from tagray.heads.word_table import WordTable

        cfg = EmbedConfig()  # no pretrained vectors (vectors=None): random word_dim-d words, as `tagray train` without --vectors
        _, init, _ = word_table_init(data.vocab.tags, None, cfg.word_dim, cfg.init_scale, cfg.seed)
        table = WordTable(init, cfg.word_optimizer, cfg.word_lr)
        counts = data.counts.astype(np.float64)
        tagged = (train.tag_ids >= 0).any(1)  # the embed head trains on tagged images (tagray train: tagged_only)
        # as `tagray train`: validation mAP after every epoch on the val images (all of them: fewer than
        # cfg.val_images here), ending on the best epoch's h and words
        val = data.validation("val") if cfg.val_images else None
        mlp = fit_embed(x[torch.from_numpy(tagged)], train.tag_ids[tagged], table, counts, cfg, val=val)
        # as `tagray train` ends: per-tag Platt scaling of the user-tag scores on the tagged val images
        vectors = table.vectors[: data.tags].clone()
        (scale, offset), fit = fit_on_split(mlp, vectors, corpus.targets, corpus.features_uri, "val",
                                            cfg.calibration_images, cfg.seed, corpus.normalizer.cfg.max_tags)
        assert fit["images"] == int((data.parts["val"].tag_ids >= 0).any(1).sum())  # every tagged val image
        tagger = EmbedTagger(mlp, vectors, offset, scale)
        return evaluate_head(tagger, corpus.targets, corpus.features, EvalConfig(), "test")[0]
    if head == "neighbors":
        from tagray.eval.neighbors_report import evaluate_neighbors_model
        from tagray.heads.neighborhood import NeighborsConfig
        from tagray.heads.recipes.neighbors import fit_neighbors

        cfg = NeighborsConfig()
        parts = [data.parts[s] for s in ("train", "val", "test")]
        nn = metadata_neighbors(metadata_lists(data.manifest, cfg.metadata, corpus.normalizer),
                                data.manifest.column("split"), parts, cfg, progress=False)
        val = {**data.validation("val"), "neighbors": nn["val"]}
        model = fit_neighbors(x, multi_hot(train.targets(cfg.target), data.tags), nn["train"], cfg, val)
        return evaluate_neighbors_model(model, data, cfg, "test", neighbors=nn)
    from tagray.data.tag_similarity import (
        cooccurrence,
        google_distance,
        tag_similarity,
        wordnet_distance,
    )
    from tagray.eval.refine_report import evaluate_refine_model
    from tagray.heads.recipes.refine import fit_refine
    from tagray.heads.refine import RefineConfig

    cfg = RefineConfig()
    counts, co = cooccurrence(train.tag_ids, data.tags)
    xi = tag_similarity(google_distance(counts, co, len(train)), wordnet_distance(list(data.vocab.tags), counts),
                        cfg.alpha)
    model, phi0 = fit_refine(x, multi_hot(train.tag_ids, data.tags), torch.from_numpy(xi).float(), cfg,
                             data.validation("val"))
    return evaluate_refine_model(model, phi0, data)


def below_baselines(report: dict, task: str = "annotation") -> list[str]:
    """Every baseline the report prints that the model does not beat (>) on `task`'s headline
    metric: annotation mAP_L (the verdict's metric), or tag prediction F1@k."""
    block = report.get(task) or {}
    key = "map_label" if task == "annotation" else next((k for k in block if k.startswith("f1@")), None)
    mine = block.get(key)
    assert mine is not None and report["baselines"], f"the report has no {task} {key} or no baselines"
    problems = []
    for name, base in report["baselines"].items():
        theirs = (base.get(task) or {}).get(key)
        if theirs is not None and not mine > theirs:
            problems.append(f"{task} {key} {mine:.3f} ≤ {name} {theirs:.3f}")
    return problems


_REPORTS: dict[tuple[str, int], dict] = {}


def report_of(head: str, images: int, tmp_path_factory) -> dict:
    """`train_and_report`, once per (head, size) per session (both tests read the same run)."""
    if (head, images) not in _REPORTS:
        _REPORTS[head, images] = train_and_report(head, default_corpus(images, tmp_path_factory))
    return _REPORTS[head, images]


SLOW = [pytest.mark.integration, pytest.mark.slow]  # minutes to hours of training: `make test-slow`
CASES = [
    pytest.param("lr", 3000, id="lr-3k"),
    pytest.param("rlr", 3000, id="rlr-3k"),
    pytest.param("embed", 3000, id="embed-3k"),
    pytest.param("neighbors", 3000, id="neighbors-3k", marks=[*SLOW, NEIGHBORS_OPEN]),  # ~84 epochs: 42 s of CI
    pytest.param("refine", 3000, id="refine-3k", marks=[*SLOW, REFINE_OPEN]),
    pytest.param("lr", 20_000, id="lr-20k", marks=SLOW),
    pytest.param("rlr", 20_000, id="rlr-20k", marks=SLOW),
    pytest.param("embed", 20_000, id="embed-20k", marks=SLOW),
    pytest.param("neighbors", 20_000, id="neighbors-20k", marks=[*SLOW, NEIGHBORS_20K_OPEN]),
    pytest.param("refine", 20_000, id="refine-20k", marks=SLOW),  # not measured: 60,000 Algorithm 1 steps
]


@pytest.mark.parametrize(("head", "images"), CASES)
def test_shipped_defaults_beat_every_baseline_of_their_report(head, images, tmp_path_factory):
    report = report_of(head, images, tmp_path_factory)
    assert report["head"] == head and report["truth"] == "labels" and report["labelled_images"] > 0
    # the baselines every report prints are there (a report without them would pass vacuously)
    assert {"random", "prior", "knn"} <= set(report["baselines"])
    problems = below_baselines(report)
    assert problems == [], f"{head} with its shipped defaults at {images} images: " + "; ".join(problems)
    assert report["verdict"]["learned"] is True, report["verdict"]["message"]


@pytest.mark.parametrize(("head", "images"), [
    pytest.param("lr", 3000, id="lr-3k"),
    pytest.param("rlr", 3000, id="rlr-3k"),
    pytest.param("embed", 3000, id="embed-3k"),
    pytest.param("lr", 20_000, id="lr-20k", marks=SLOW),
    pytest.param("rlr", 20_000, id="rlr-20k", marks=SLOW),
    pytest.param("embed", 20_000, id="embed-20k", marks=SLOW),
])
def test_shipped_defaults_tag_prediction_beats_every_baseline(head, images, tmp_path_factory):
    """Heads that predict user tags from features alone: F1@k of tag prediction too (seed 001 Table 2)."""
    problems = below_baselines(report_of(head, images, tmp_path_factory), "tag_prediction")
    assert problems == [], f"{head} with its shipped defaults at {images} images: " + "; ".join(problems)


def test_below_baselines_names_each_baseline_the_model_does_not_beat():
    """The check itself, on a hand-made report: equal is not better; each task on its own metric."""
    report = {"annotation": {"map_label": 0.5}, "tag_prediction": {"f1@5": 0.3},
              "baselines": {"prior": {"annotation": {"map_label": 0.1}, "tag_prediction": {"f1@5": 0.3}},
                            "knn": {"annotation": {"map_label": 0.5}},
                            "random": {"annotation": {"map_label": 0.05}, "tag_prediction": {"f1@5": 0.01}}}}
    assert below_baselines(report) == ["annotation map_label 0.500 ≤ knn 0.500"]
    assert below_baselines(report, "tag_prediction") == ["tag_prediction f1@5 0.300 ≤ prior 0.300"]
    report["annotation"]["map_label"] = 0.51
    report["tag_prediction"]["f1@5"] = 0.31
    assert below_baselines(report) == [] and below_baselines(report, "tag_prediction") == []
