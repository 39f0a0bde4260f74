"""Issue 14: one report shape for every head (lr, rlr, embed, neighbors, refine), its metrics
against an independent computation (scikit-learn), the verdict in words, and an evaluation
layer that imports neither tagray.train nor Ray.

Tiny models trained in-process by a plain logistic loop here (not the heads' trainers), on a
small synthetic corpus with fixed seeds; no Ray."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from tagray import cli
from tagray.config import load_config
from tagray.data.normalize import NormalizerConfig, TagNormalizer
from tagray.data.schema import read_manifest
from tagray.eval.neighbors_report import evaluate_neighbors_model
from tagray.eval.refine_report import evaluate_refine_model
from tagray.eval.report import EvalConfig, evaluate_head
from tagray.eval.shape import REPORT_KEYS, TASKS, summary_lines, verdict
from tagray.features.store import read_features
from tagray.heads.embedding import EmbedTagger, TagMLP
from tagray.heads.fit import HeadConfig, align
from tagray.heads.linear import EMConfig, LinearTagger
from tagray.heads.neighborhood import (
    NeighborhoodNet,
    NeighborsConfig,
    gather_neighborhood,
    sample_neighborhoods,
)
from tagray.heads.refine import RefineNet
from tagray.heads.split_arrays import SplitsData, metadata_lists, metadata_neighbors
from tagray.heads.targets import (
    build_targets,
    dense,
    label_vocabulary,
    multi_hot,
    prepare_vocabulary,
)
from tests.corpora import split_corpus

ROOT = Path(__file__).resolve().parents[1]
CFG = EvalConfig(knn=10, visual_only_epochs=10)
NEIGHBORS = NeighborsConfig(m=2, max_rank=4, hidden=32, dropout=0.0, test_samples=3, batch_size=50)


def _fit(forward, params, x: torch.Tensor, y: torch.Tensor, steps: int = 80, lr: float = 0.01, seed: int = 0) -> None:
    """Plain one-vs-all logistic training of `forward(rows)` on rows of x (full-batch Adam, cosine)."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(forward(torch.arange(len(x))), y).backward()
        opt.step()
        schedule.step()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    c = split_corpus(tmp_path_factory.mktemp("shape"), 800, seed=3, feature_dim=16, concepts=10)
    normalizer = TagNormalizer(load_config(NormalizerConfig, "normalize.yaml"))
    manifest = read_manifest(c["manifest"])
    vocab = prepare_vocabulary(manifest, normalizer)
    targets = build_targets(manifest, normalizer, vocab)
    features, identity = read_features(c["features"])
    data = SplitsData(c["manifest"], c["features"], normalizer, vocab=vocab)
    lists = metadata_lists(data.manifest, NEIGHBORS.metadata, normalizer)
    nn = metadata_neighbors(lists, data.manifest.column("split"), list(data.parts.values()), NEIGHBORS, progress=False)
    train = data.parts["train"]
    x, y = torch.from_numpy(train.x), multi_hot(train.tag_ids, data.tags)
    return {**c, "features_uri": c["features"], "normalizer": normalizer, "vocab": vocab, "targets": targets, "features": features,
            "identity": identity, "data": data, "neighbors": nn, "x": x, "y": y, "tags": data.tags}


def _linear(corpus, robust: bool, trained: bool) -> LinearTagger:
    model = LinearTagger(corpus["x"].shape[1], corpus["tags"], EMConfig() if robust else None)
    if trained:
        _fit(lambda i: model(corpus["x"][i]), model.parameters(), corpus["x"], corpus["y"])
    return model.eval()


def _embed(corpus, trained: bool) -> EmbedTagger:
    torch.manual_seed(0)
    mlp = TagMLP(corpus["x"].shape[1], (32,), 16)
    vectors = torch.nn.Parameter(torch.zeros(corpus["tags"], 16))
    if trained:
        vectors.data.normal_(0, 0.1)
        _fit(lambda i: mlp(corpus["x"][i]) @ vectors.T, [*mlp.parameters(), vectors], corpus["x"], corpus["y"],
             steps=200)
    return EmbedTagger(mlp, vectors.detach().clone()).eval()


def _refine(corpus, trained: bool, seed: int = 0) -> RefineNet:
    torch.manual_seed(seed)
    model = RefineNet(corpus["x"].shape[1], corpus["tags"], hidden=32)
    if trained:
        _fit(lambda i: model(corpus["x"][i]), model.parameters(), corpus["x"], corpus["y"])
    return model.eval()


def _neighbors(corpus, trained: bool) -> NeighborhoodNet:
    torch.manual_seed(0)
    model = NeighborhoodNet(corpus["x"].shape[1], corpus["tags"], NEIGHBORS.hidden, NEIGHBORS.dropout)
    if trained:
        model.standardize_features(corpus["x"])  # as the recipe does: the saved model must carry the moments
        rng = np.random.default_rng(0)
        nn = corpus["neighbors"]["train"]

        def forward(i):
            z, mask = gather_neighborhood(corpus["x"], sample_neighborhoods(nn[i.numpy()], NEIGHBORS.m, rng))
            return model(corpus["x"][i], z, mask)

        _fit(forward, model.parameters(), corpus["x"], corpus["y"])
    return model.eval()


def _report(corpus, head: str, trained: bool = True, with_baselines: bool = True) -> dict:
    if head in ("lr", "rlr"):
        return evaluate_head(_linear(corpus, head == "rlr", trained), corpus["targets"], corpus["features"], CFG,
                             "test", with_baselines)[0]
    if head == "embed":
        return evaluate_head(_embed(corpus, trained), corpus["targets"], corpus["features"], CFG, "test",
                             with_baselines)[0]
    if head == "refine":
        return evaluate_refine_model(_refine(corpus, trained), None, corpus["data"], with_baselines, "test", CFG)
    return evaluate_neighbors_model(_neighbors(corpus, trained), corpus["data"], NEIGHBORS, "test", with_baselines,
                                    corpus["neighbors"], CFG)


HEADS = ("lr", "rlr", "embed", "neighbors", "refine")


@pytest.fixture(scope="module")
def reports(corpus) -> dict[str, dict]:
    return {head: _report(corpus, head) for head in HEADS}


def test_every_head_reports_the_same_keys(reports):
    for head, report in reports.items():
        assert tuple(report) == REPORT_KEYS, head
        assert report["head"] == head and report["truth"] == "labels"
        assert {"random", "prior", "knn", "user_tags"} <= set(report["baselines"]), head
        for task in TASKS:
            keys = set(report[task])
            for name, block in report["baselines"].items():
                if task in block:
                    assert set(block[task]) == keys, (head, name, task)
            assert all(task in b for n, b in report["baselines"].items() if n != "user_tags" or task != "tag_prediction")
        assert {"map_label", "map_image", "micro_auc", "macro_auc", "f1@5"} <= set(report["annotation"])
        assert {"p@5_1", "p@5_2", "p@5_3"} <= set(report["retrieval"])
        assert set(report["verdict"]) == {"metric", "model", "learned", "beats", "below", "message"}
        json.dumps(report, allow_nan=False)  # strict JSON
    assert {"visual_only", "neighborhood_voting"} <= set(reports["neighbors"]["baselines"])
    assert set(reports["neighbors"]["extras"]) == {"seed003"}
    assert set(reports["neighbors"]["extras"]["seed003"]["model"]) >= {
        "map_label", "map_image", "precision_label@3", "recall_label@3", "precision_image@3", "recall_image@3",
        "micro_auc", "macro_auc"}
    assert set(reports["refine"]["extras"]["seed002"]) == {"refinement", "annotation"}
    assert set(reports["rlr"]["extras"]) == {"seed001"} and reports["lr"]["extras"] == {}
    # the same images and truth for every head on one split
    assert len({(r["images"], r["labelled_images"], r["label_tags"]) for r in reports.values()}) == 1


def _truth(corpus):
    """Test-split truth straight from the manifest's targets (independent of the report code)."""
    targets, tags = corpus["targets"], corpus["tags"]
    test = targets.filter(pc.equal(targets.column("split"), "test"))
    x, found = align(corpus["features"], test.column("image_id"))
    test = test.take(pa.array(found))
    labelled = test.column("labelled").to_numpy(zero_copy_only=False)
    cols = label_vocabulary(targets, tags)
    labels = dense(test.column("label_ids"), tags).numpy()[labelled][:, cols]
    return x, dense(test.column("tag_ids"), tags).numpy(), labelled, cols, labels


def test_metrics_match_an_independent_computation(corpus, reports):
    model = _linear(corpus, robust=False, trained=True)  # deterministic: the model of reports["lr"]
    report = reports["lr"]
    x, tags, labelled, cols, labels = _truth(corpus)
    with torch.no_grad():
        logits = model(x).numpy()
    s = logits[labelled][:, cols]
    pos = labels.sum(0) > 0
    both = pos & (labels.sum(0) < len(labels))
    ann = report["annotation"]
    assert report["labelled_images"] == labelled.sum() and report["label_tags"] == len(cols)
    assert ann["map_label"] == pytest.approx(average_precision_score(labels[:, pos], s[:, pos], average="macro"))
    rows = labels.sum(1) > 0
    assert ann["map_image"] == pytest.approx(average_precision_score(labels[rows].T, s[rows].T, average="macro"))
    assert ann["macro_auc"] == pytest.approx(roc_auc_score(labels[:, both], s[:, both], average="macro"))
    assert ann["micro_auc"] == pytest.approx(roc_auc_score(labels.ravel(), s.ravel()))
    # tag prediction (seed 001 Table 2): top-5 of P(y) per image against its user tags
    top = np.argsort(-logits, axis=1, kind="stable")[:, :5]
    keep = tags.sum(1) > 0
    hits = np.take_along_axis(tags, top, 1).sum(1)[keep]
    p, r = np.mean(hits / 5), np.mean(hits / tags[keep].sum(1))
    assert report["tag_prediction"]["precision@5"] == pytest.approx(p)
    assert report["tag_prediction"]["recall@5"] == pytest.approx(r)
    assert report["tag_prediction"]["f1@5"] == pytest.approx(2 * p * r / (p + r))


def test_neighbors_and_refine_scores_are_what_the_report_measures(corpus, reports):
    """The refine report's model mAP is the sklearn mAP of σ(ϕ(x)) on the labelled test images; the
    neighbours' seed 003 table measures the same scores as its annotation block."""
    torch.manual_seed(0)
    model = _refine(corpus, trained=True)
    x, _, labelled, cols, labels = _truth(corpus)
    with torch.no_grad():
        s = model(x).numpy()[labelled][:, cols]
    pos = labels.sum(0) > 0
    assert reports["refine"]["annotation"]["map_label"] == pytest.approx(
        average_precision_score(labels[:, pos], s[:, pos], average="macro"))
    nb = reports["neighbors"]
    assert nb["extras"]["seed003"]["model"]["map_label"] == pytest.approx(nb["annotation"]["map_label"])
    assert nb["extras"]["seed003"]["model"]["map_image"] == pytest.approx(nb["annotation"]["map_image"])


def test_the_verdict_beats_for_trained_and_below_for_untrained(corpus, reports):
    for head, report in reports.items():
        v = report["verdict"]
        assert {"random", "prior"} <= set(v["beats"]), (head, v["message"])
        assert v["model"] == report["annotation"]["map_label"]
        floor = [report["baselines"][k]["annotation"]["map_label"] for k in ("random", "prior", "visual_only", "phi0")
                 if k in report["baselines"]]
        assert v["learned"] is (v["model"] > max(floor)), head
        if head != "neighbors":  # the tiny neighbours model here need not beat the visual-only LR
            assert v["learned"] is True and v["message"].startswith("the model learned"), (head, v["message"])
    # an untrained linear head scores every image alike: its mAP_L is the prior's exactly, not above
    lr = _report(corpus, "lr", trained=False)
    assert lr["annotation"]["map_label"] == pytest.approx(lr["baselines"]["prior"]["annotation"]["map_label"])
    assert "prior" in lr["verdict"]["below"] and lr["verdict"]["learned"] is False
    message = lr["verdict"]["message"]
    assert message.startswith("the model is below its ") and "did not learn" in message
    assert f"prior {lr['baselines']['prior']['annotation']['map_label']:.3f}" in message.split(":")[0]
    nb = _report(corpus, "neighbors", trained=False)
    assert "visual_only" in nb["verdict"]["below"] and nb["verdict"]["learned"] is False
    assert "visual-only" in nb["verdict"]["message"] and "did not learn" in nb["verdict"]["message"]
    # refine below its own ϕ0: ϕ = an untrained net, ϕ0 the trained one
    below = evaluate_refine_model(_refine(corpus, False), _refine(corpus, True), corpus["data"], True, "test", CFG)
    assert "phi0" in below["verdict"]["below"] and below["verdict"]["learned"] is False
    assert set(below["extras"]["seed002"]["annotation"]["methods"]) >= {"model", "multi_cnn", "knn", "random_guess"}


def test_verdict_in_words():
    v = verdict(0.097, {"visual_only": 0.849, "random": 0.05, "prior": 0.06, "knn": 0.5})
    assert v["learned"] is False and v["below"] == ["visual_only", "knn"] and v["beats"] == ["prior", "random"]
    assert v["message"].startswith("the model is below its visual-only baseline (mAP_L 0.097 vs visual-only 0.849): "
                                   "it did not learn")
    assert "it beats prior 0.060, random 0.050" in v["message"] and "it is below knn 0.500" in v["message"]
    v = verdict(0.8, {"random": 0.05, "prior": 0.06, "knn": 0.9, "user_tags": None})
    assert v["learned"] is True and v["below"] == ["knn"] and "user_tags" not in v["beats"] + v["below"]
    assert v["message"] == "the model learned (mAP_L 0.800 beats prior 0.060, random 0.050); it is below knn 0.900"
    assert verdict(0.5, {"random": 0.5})["learned"] is False  # a tie is not a win
    assert verdict(0.5, {"knn": 0.1})["learned"] is None  # nothing that decides
    assert verdict(None, {"random": 0.1})["learned"] is None


def test_summary_lines_print_every_head_alike(reports):
    for head, report in reports.items():
        lines = summary_lines(report)
        assert lines[0].startswith(f"{head} head, test split")
        assert any(line.startswith("annotation ") and "mAP_L" in line for line in lines)
        assert lines[-1] == "verdict: " + report["verdict"]["message"]
        assert sum(line.startswith("  baseline ") for line in lines) == len(report["baselines"])
    assert any(line.startswith("seed 003 Table 2") for line in summary_lines(reports["neighbors"]))
    assert any(line.startswith("seed 002 refinement") for line in summary_lines(reports["refine"]))


def test_no_baselines_still_has_every_key(corpus):
    report = _report(corpus, "neighbors", with_baselines=False)
    assert tuple(report) == REPORT_KEYS and report["baselines"] == {} and report["verdict"]["learned"] is None


def test_evaluate_command_writes_the_one_shape_for_saved_heads(corpus, reports, tmp_path, capsys):
    from tagray.heads.artifact import SavedHead, save_head
    from tagray.heads.net_artifact import SavedNetHead, save_net_head

    counts = corpus["data"].counts
    save_head(SavedHead(_linear(corpus, False, True), corpus["vocab"], HeadConfig(head="lr"), corpus["identity"],
                        counts, np.zeros(corpus["tags"], bool)), str(tmp_path / "lr"))
    save_net_head(SavedNetHead(_neighbors(corpus, True), corpus["vocab"], NEIGHBORS, corpus["identity"], counts),
                  str(tmp_path / "neighbors"))
    from tagray.heads.refine import RefineConfig

    save_net_head(SavedNetHead(_refine(corpus, True), corpus["vocab"], RefineConfig(hidden=32), corpus["identity"],
                               counts), str(tmp_path / "refine"))
    out = {}
    for head in ("lr", "neighbors", "refine"):
        capsys.readouterr()
        argv = ["evaluate", "--model", str(tmp_path / head), "--manifest", corpus["manifest"], "--features",
                corpus["features_uri"], "--out", str(tmp_path / f"{head}.json"), "--no-baselines"]
        assert cli.main(argv) == 0
        printed = capsys.readouterr().out
        out[head] = json.loads((tmp_path / f"{head}.json").read_text())
        assert out[head]["model_dir"] == str(tmp_path / head) and out[head]["head"] == head
        assert printed.splitlines()[0].startswith(f"{head} head, test split")
        assert f"verdict: the model's mAP_L is {out[head]['annotation']['map_label']:.3f}" in printed
    assert all(tuple(k for k in r if k in REPORT_KEYS) == REPORT_KEYS for r in out.values())
    # the saved models score as the in-process ones did
    for head in ("lr", "neighbors", "refine"):
        assert out[head]["annotation"]["map_label"] == pytest.approx(reports[head]["annotation"]["map_label"], abs=1e-5)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_evaluation_imports_neither_train_nor_ray():
    files = sorted((ROOT / "tagray" / "eval").glob("*.py")) + [ROOT / "tagray" / "commands" / "evaluate.py"]
    assert len(files) > 5
    for f in files:
        bad = {m for m in _imports(f) if m == "ray" or m.startswith(("ray.", "tagray.train", "tagray.tune"))}
        assert not bad, f"{f.name} imports {bad}"
    code = ("import sys, pkgutil, importlib, tagray.eval as e\n"
            "for m in pkgutil.iter_modules(e.__path__): importlib.import_module('tagray.eval.' + m.name)\n"
            "import tagray.commands.evaluate\n"
            "bad = [m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'tagray.train', 'tagray.tune'))]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
