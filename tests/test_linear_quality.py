"""The figures issue 4 asks of LR / RLR on a synthetic corpus with informative features
(fixed seeds; in-process training, the same em_step Ray Train runs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from scipy.stats import spearmanr

from tagray.eval.report import EvalConfig, evaluate_head
from tagray.heads.calibrate import fit_intercepts
from tagray.heads.fit import HeadConfig, align
from tagray.heads.recipes.linear import fit
from tagray.heads.targets import dense, label_vocabulary
from tests.corpora import load_corpus

TRAIN = {"epochs": 60, "lr": 0.01, "weight_decay": 1e-4}


@pytest.fixture(scope="session")
def corpus(ray_local, tmp_path_factory):
    c = load_corpus(tmp_path_factory.mktemp("quality"), 60_000)
    vocab, targets, features, train = c.vocab, c.targets, c.features, c.train
    x, found = align(features, train.column("image_id"))
    y = dense(train.column("tag_ids").take(found), len(vocab))
    truth = json.loads(Path(c.truth).read_text())
    return {"vocab": vocab, "targets": targets, "features": features, "x": x, "y": y, "truth": truth}


@pytest.fixture(scope="session")
def heads(corpus):
    lr = fit(corpus["x"], corpus["y"], HeadConfig(head="lr", **TRAIN))
    rlr = fit(corpus["x"], corpus["y"], HeadConfig(head="rlr", **TRAIN))
    cfg = EvalConfig()
    return {
        "lr": (lr, evaluate_head(lr, corpus["targets"], corpus["features"], cfg, "test", with_baselines=False)[0]),
        "rlr": (rlr, evaluate_head(rlr, corpus["targets"], corpus["features"], cfg, "test", with_baselines=True)[0]),
    }


@pytest.mark.integration
def test_rlr_recovers_tagging_likelihoods(corpus, heads):
    vocab, truth = corpus["vocab"], corpus["truth"]
    concepts = [c for c in truth["concepts"] if c["tag"] in vocab.index]
    assert len(concepts) == len(truth["concepts"])
    estimated = heads["rlr"][0].pi().numpy()[[vocab.index[c["tag"]] for c in concepts]]
    true_pi = np.array([c["pi"] for c in concepts])
    assert spearmanr(estimated, true_pi).statistic >= 0.7
    assert np.median(np.abs(estimated - true_pi)) <= 0.1
    # The same comparison inside the report, against P(tag | label) measured on training images.
    assert heads["rlr"][1]["extras"]["seed001"]["pi"]["spearman"] >= 0.7


@pytest.mark.integration
def test_rlr_beats_lr_and_baselines(heads):
    lr, rlr = heads["lr"][1], heads["rlr"][1]
    assert rlr["tag_prediction"]["recall@5"] > lr["tag_prediction"]["recall@5"]
    assert rlr["annotation"]["f1@5"] > lr["annotation"]["f1@5"]
    base = rlr["baselines"]
    assert rlr["annotation"]["f1@5"] > base["user_tags"]["annotation"]["f1@5"]
    assert rlr["tag_prediction"]["f1@5"] > base["prior"]["tag_prediction"]["f1@5"]
    assert base["random"]["annotation"]["micro_auc"] == pytest.approx(0.5, abs=0.02)
    assert rlr["retrieval"]["p@5_3"] > base["user_tags"]["retrieval"]["p@5_3"]


@pytest.mark.integration
def test_calibration_on_five_percent_labels_beats_uncalibrated(corpus, heads):
    model, before = heads["rlr"]
    targets, features = corpus["targets"], corpus["features"]
    val = targets.filter(pc.equal(targets.column("split"), "val"))
    val = val.slice(0, int(0.05 * targets.num_rows))
    x, found = align(features, val.column("image_id"))
    cols = label_vocabulary(targets, model.tags)
    z = dense(val.column("label_ids").take(found), model.tags)[:, cols]
    with torch.no_grad():
        beta = fit_intercepts(model(x)[:, cols], z)
    calibrated = type(model)(model.dim, model.tags, model.em)
    calibrated.load_state_dict(model.state_dict())
    calibrated.beta[torch.from_numpy(cols)] = beta
    after = evaluate_head(calibrated, targets, features, EvalConfig(), "test", with_baselines=False)[0]
    assert after["annotation"]["f1@5"] > before["annotation"]["f1@5"] + 0.02
    # β moves only the annotation scores; tag prediction uses P(y) and is unchanged.
    assert after["tag_prediction"] == before["tag_prediction"]


@pytest.mark.integration
def test_lr_map_matches_scikit_learn(corpus):
    from sklearn.linear_model import LogisticRegression

    x, y = corpus["x"][:8000], corpus["y"][:8000]
    cols = torch.argsort(y.sum(0), descending=True)[:20]
    y = y[:, cols]
    targets, features = corpus["targets"], corpus["features"]
    test = targets.filter(pc.equal(targets.column("split"), "test"))
    xt, found = align(features, test.column("image_id"))
    yt = dense(test.column("tag_ids").take(found), corpus["y"].shape[1])[:, cols].numpy()
    ours = fit(x, y, HeadConfig(head="lr", epochs=30, lr=0.01, weight_decay=1e-4))
    with torch.no_grad():
        s_ours = ours(xt).numpy()
    s_sk = np.stack(
        [LogisticRegression(max_iter=500).fit(x.numpy(), y[:, j].numpy()).decision_function(xt.numpy()) for j in range(len(cols))],
        axis=1,
    )
    from tagray.metrics import mean_average_precision

    map_ours = mean_average_precision(s_ours, yt)["map_label"]
    map_sk = mean_average_precision(s_sk, yt)["map_label"]
    assert abs(map_ours - map_sk) <= 0.02 * map_sk
