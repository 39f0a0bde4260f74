"""The sampled loss approaches the full loss's ranking quality on a small vocabulary
(seed 004 §2.2, Fig. 2 / Table 2), in-process on a synthetic corpus with fixed seeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from tagray.data.word_vectors import synthetic_word_vectors, word_table_init
from tagray.eval.report import EvalConfig, evaluate_head
from tagray.heads.embedding import EmbedConfig, EmbedTagger, tag_log_prior
from tagray.heads.fit import align
from tagray.heads.recipes.embed import fit_embed
from tagray.heads.targets import padded_ids
from tagray.heads.word_table import WordTable
from tests.corpora import load_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    c = load_corpus(tmp_path_factory.mktemp("embed_quality"), 20_000)
    train = c.train.filter(pc.greater(pc.list_value_length(c.train.column("tag_ids")), 0))
    x, found = align(c.features, train.column("image_id"))
    ids = padded_ids(train.column("tag_ids").take(found), 16)
    words, vectors = synthetic_word_vectors(json.loads(Path(c.truth).read_text()), 32)
    pretrained = ([c.normalizer.normalize_tag(w) for w in words], vectors)
    return {"vocab": c.vocab, "targets": c.targets, "features": c.features, "x": x, "ids": ids, "pretrained": pretrained}


def train_and_evaluate(corpus, **settings) -> dict:
    cfg = EmbedConfig(hidden=(256,), epochs=30, **settings)
    vocab = corpus["vocab"]
    words, init, _ = word_table_init(vocab.tags, corpus["pretrained"], cfg.word_dim, cfg.init_scale)
    counts = np.zeros(len(words))
    ids = corpus["ids"]
    counts[: len(vocab)] = np.bincount(ids[ids >= 0], minlength=len(vocab))
    table = WordTable(init, cfg.word_optimizer, cfg.word_lr)
    mlp = fit_embed(corpus["x"], ids, table, counts, cfg)
    tagger = EmbedTagger(mlp, table.vectors[: len(vocab)].clone(), tag_log_prior(cfg, counts[: len(vocab)]))
    report, _ = evaluate_head(tagger, corpus["targets"], corpus["features"], EvalConfig(), "test", with_baselines=True)
    return report


@pytest.mark.integration
def test_sampled_loss_approaches_full_loss(corpus):
    sampled = train_and_evaluate(corpus)
    full = train_and_evaluate(corpus, sampled=False)
    fixed = train_and_evaluate(corpus, fixed_vectors=True)
    # Ranking of user tags per image (tag prediction F1@5) and of images per label (mAP).
    assert sampled["tag_prediction"]["f1@5"] >= 0.9 * full["tag_prediction"]["f1@5"]
    assert sampled["annotation"]["map_label"] >= 0.95 * full["annotation"]["map_label"]
    # Both learn: far above the tag prior, and training the word vectors beats fixing them.
    prior = sampled["baselines"]["prior"]["tag_prediction"]["f1@5"]
    assert min(sampled["tag_prediction"]["f1@5"], full["tag_prediction"]["f1@5"]) > 1.1 * prior
    assert sampled["annotation"]["map_label"] > fixed["annotation"]["map_label"] + 0.05
