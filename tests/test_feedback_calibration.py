"""Recalibration from users' verdicts (`tagray calibrate --feedback`, issue 16 part 2): the β
fit (seed 001 eq. 13) from sparse, biased verdicts, its guards, and the command end to end
from a real SQLite store to a model directory. Fast tier: in-process training, no Ray."""

from __future__ import annotations

import copy
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from tagray import cli
from tagray.data.feedback import FeedbackStore, Verdict
from tagray.eval.report import EvalConfig, evaluate_head
from tagray.features import store as feature_store
from tagray.heads.artifact import SavedHead, save_head
from tagray.heads.calibrate import CalibrateConfig, fit_verdict_intercepts, recalibrate
from tagray.heads.fit import HeadConfig, align
from tagray.heads.linear import LinearTagger
from tagray.heads.models import load_model
from tagray.heads.recipes.linear import fit
from tagray.heads.targets import dense, label_vocabulary
from tests.corpora import split_corpus

UPLOAD = "sha256:" + "ab" * 32


def features_table(ids: list[str], x: np.ndarray) -> pa.Table:
    flat = pa.array(np.ascontiguousarray(x, np.float32).ravel())
    return pa.table({"image_id": pa.array(ids), "feature": pa.FixedSizeListArray.from_arrays(flat, x.shape[1])})


def verdict_table(rows: list[tuple[str, str, bool]]) -> pa.Table:
    """What FeedbackStore.resolved() returns, for the maths tests."""
    n = len(rows)
    return pa.table({"image_id": [r[0] for r in rows], "tag": [r[1] for r in rows], "present": [r[2] for r in rows],
                     "votes_present": [int(r[2]) for r in rows], "votes_absent": [int(not r[2]) for r in rows],
                     "last_at": [0.0] * n})


# --- the fit -----------------------------------------------------------------------------------

def test_fit_recovers_a_known_beta_from_verdicts_selected_on_x():
    """Data drawn from the model σ(s + β); verdicts only where s is high (the model's top
    suggestions: selection on x), each tag a different share: β is still recovered."""
    g = np.random.default_rng(0)
    beta_true = torch.tensor([-2.0, 0.5, 1.5], dtype=torch.float64)
    s = torch.from_numpy(g.normal(0, 2, 60_000))
    t = torch.from_numpy(g.integers(0, 3, 60_000))
    z = (torch.from_numpy(g.random(60_000)) < torch.sigmoid(s + beta_true[t])).double()
    shown = s > torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64)[t]  # suggested: high scores only
    beta = fit_verdict_intercepts(s[shown], t[shown], z[shown], torch.zeros(3, dtype=torch.float64), prior=1e-3)
    torch.testing.assert_close(beta, beta_true, atol=0.08, rtol=0)
    # No verdicts on a tag: it stays at the prior's centre (its current β), not at 0.
    centre = torch.tensor([0.7, -0.3, 0.0], dtype=torch.float64)
    only = t == 2
    beta = fit_verdict_intercepts(s[only], t[only], z[only], centre, prior=1.0)
    assert beta[:2].tolist() == centre[:2].tolist()
    assert abs(float(beta[2]) - 1.5) < 0.1


def test_tags_with_too_few_verdicts_of_a_kind_stay_as_they_were_and_are_reported():
    g = np.random.default_rng(1)
    model = LinearTagger(4, 4)
    with torch.no_grad():
        model.linear.weight.copy_(torch.from_numpy(g.normal(0, 1, (4, 4))))
        model.beta.copy_(torch.tensor([0.7, -0.4, 0.2, 0.0]))
    vocab = ["dog", "cat", "sky", "tree"]
    ids = [f"i{k}" for k in range(40)]
    features = features_table(ids, g.normal(0, 1, (40, 4)))
    rows = [(ids[k], "dog", k % 2 == 0) for k in range(20)]  # 10 present, 10 absent: refitted
    rows += [(ids[k], "cat", True) for k in range(20)]  # only present (confirm-only): left
    rows += [(ids[k], "sky", k < 2) for k in range(10)]  # 2 present, 8 absent: left
    rows += [(UPLOAD, "dog", False), ("not-featurized", "dog", True), (ids[0], "flurbish", True)]
    fit = recalibrate(model, vocab, features, verdict_table(rows), CalibrateConfig(min_present=5, min_absent=5))
    assert fit.refitted.tolist() == [True, False, False, False]
    assert fit.beta[1:].tolist() == model.beta[1:].tolist()  # exactly as they were
    assert float(fit.beta[0]) != pytest.approx(0.7, abs=1e-3)
    assert fit.skipped == {"upload": 1, "no_features": 1, "unknown_tag": 1}
    assert fit.verdicts == len(rows) and fit.used == 50
    report = {r["tag"]: r for r in fit.tags}
    assert set(report) == {"dog", "cat", "sky"}  # tree has no verdicts
    assert report["dog"]["present"] == 10 and report["dog"]["absent"] == 10 and report["dog"]["reason"] is None
    assert report["cat"]["reason"] == "too few verdicts: 0 absent < min_absent=5"
    assert report["sky"]["reason"] == "too few verdicts: 2 present < min_present=5"
    assert report["cat"]["beta_before"] == report["cat"]["beta_after"] == pytest.approx(-0.4)
    assert model.beta.tolist() == pytest.approx([0.7, -0.4, 0.2, 0.0])  # recalibrate leaves the model alone


# --- quality on a synthetic corpus (truth known) ------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small synthetic corpus, an RLR head trained in process, and its top-5 suggestions on
    val with the truth of each (image, tag) pair."""
    out = tmp_path_factory.mktemp("feedback")
    corpus = split_corpus(out, 8000, seed=3, feature_dim=128)
    from tagray.config import load_config
    from tagray.data.normalize import NormalizerConfig, TagNormalizer
    from tagray.data.schema import read_manifest
    from tagray.heads.targets import build_targets, prepare_vocabulary

    manifest = read_manifest(corpus["manifest"])
    normalizer = TagNormalizer(load_config(NormalizerConfig, "normalize.yaml"))
    vocab = prepare_vocabulary(manifest, normalizer)
    targets = build_targets(manifest, normalizer, vocab)
    features, identity = feature_store.read_features(corpus["features"])
    train = targets.filter(pc.equal(targets.column("split"), "train"))
    x, found = align(features, train.column("image_id"))
    y = dense(train.column("tag_ids").take(pa.array(found)), len(vocab))
    cfg = HeadConfig(head="rlr", epochs=20, lr=0.01, weight_decay=1e-4)
    model = fit(x, y, cfg)
    val = targets.filter(pc.and_(pc.equal(targets.column("split"), "val"), targets.column("labelled")))
    xv, fv = align(features, val.column("image_id"))
    val = val.take(pa.array(fv))
    cols = label_vocabulary(targets, model.tags)
    with torch.inference_mode():
        top = torch.topk(model.p_content(xv)[:, cols], 5, dim=1).indices.numpy()
    z = dense(val.column("label_ids"), model.tags)[:, cols].numpy()
    rows = np.repeat(np.arange(len(top)), 5)
    pairs = {"image_id": np.asarray(val.column("image_id").to_pylist(), object)[rows],
             "tag": [vocab.tags[j] for j in cols[top.ravel()]], "truth": z[rows, top.ravel()] > 0}
    head = SavedHead(model, vocab, cfg, identity, y.sum(0).numpy().astype(np.int64), np.zeros(len(vocab), bool))
    return {"dir": out, "corpus": corpus, "targets": targets, "features": features, "model": model,
            "vocab": list(vocab.tags), "pairs": pairs, "head": head}


def annotation(model: LinearTagger, trained: dict) -> dict:
    return evaluate_head(model, trained["targets"], trained["features"], EvalConfig(max_query_terms=1), "test",
                         with_baselines=False)[0]["annotation"]


def users(pairs: dict, kind: str, n: int, seed: int = 0) -> list[tuple[str, str, bool]]:
    """n verdicts on the suggestions: honest (a uniform sample, truthful) or confirm-only (correct
    suggestions confirmed, nothing ever rejected)."""
    g = np.random.default_rng(seed)
    pool = np.nonzero(pairs["truth"])[0] if kind == "confirm_only" else np.arange(len(pairs["truth"]))
    take = g.choice(pool, size=min(n, len(pool)), replace=False)
    return [(str(pairs["image_id"][i]), pairs["tag"][i], bool(pairs["truth"][i])) for i in take]


def refitted_model(trained: dict, rows: list, cfg: CalibrateConfig) -> LinearTagger:
    fit = recalibrate(trained["model"], trained["vocab"], trained["features"], verdict_table(rows), cfg)
    model = copy.deepcopy(trained["model"])
    with torch.no_grad():
        model.beta.copy_(fit.beta)
    return model


def test_confirm_only_verdicts_leave_annotation_no_worse_than_uncalibrated(trained):
    before = annotation(trained["model"], trained)
    rows = users(trained["pairs"], "confirm_only", 1000)
    assert all(present for _, _, present in rows) and len(rows) == 1000
    after = annotation(refitted_model(trained, rows, CalibrateConfig()), trained)
    assert after["f1@5"] >= before["f1@5"] and after["map_label"] >= before["map_label"]
    assert after["map_image"] >= before["map_image"]
    # What the per-kind minimum prevents: without it the same verdicts only ever push β up, the
    # further the weaker the prior (the maximum-likelihood β of present-only verdicts is +∞).
    loose = recalibrate(trained["model"], trained["vocab"], trained["features"], verdict_table(rows),
                        CalibrateConfig(min_absent=0, prior=1e-6))
    moved = torch.from_numpy(loose.refitted)
    assert int(moved.sum()) >= 10
    assert bool((loose.beta[moved] > trained["model"].beta[moved] + 8).all())


def test_honest_verdicts_at_1000_corrections_improve_f1_over_uncalibrated(trained):
    before = annotation(trained["model"], trained)
    after = annotation(refitted_model(trained, users(trained["pairs"], "honest", 1000), CalibrateConfig()), trained)
    assert after["f1@5"] > before["f1@5"] + 0.02


# --- the command -------------------------------------------------------------------------------

def _run(capsys, *argv: str) -> tuple[int, list[str], list[str]]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out.splitlines(), [line for line in captured.err.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def saved(trained):
    model_dir = str(trained["dir"] / "model")
    save_head(trained["head"], model_dir)
    db = trained["dir"] / "feedback.db"
    store = FeedbackStore.open(f"sqlite:///{db}")
    rows = users(trained["pairs"], "honest", 800, seed=1)
    for k in range(0, len(rows), 5):  # one request per image's suggestions, several users
        store.add(f"req-{k}", [Verdict(i, t, p, user=f"user{k % 7}", model="model") for i, t, p in rows[k:k + 5]])
    store.add("uploads", [Verdict(UPLOAD, rows[0][1], True), Verdict(UPLOAD, rows[1][1], False)])
    store.close()
    return {"model": model_dir, "db": str(db), "features": trained["corpus"]["features"], "rows": rows}


def test_cli_refits_from_a_sqlite_store_into_a_loadable_model_with_a_per_tag_report(saved, trained, tmp_path, capsys):
    out = str(tmp_path / "recalibrated")
    code, lines, err = _run(capsys, "calibrate", "--model", saved["model"], "--features", saved["features"],
                            "--feedback", f"sqlite:///{saved['db']}", "--policy", "majority", "--out", out)
    assert code == 0, err
    assert any("skipped 2 verdicts on uploads" in line for line in lines)
    head = load_model(out)
    report = json.loads((tmp_path / "recalibrated" / "calibration.json").read_text())
    assert report["source"] == "feedback" and report["policy"] == "majority"
    assert report["skipped"] == {"upload": 2, "no_features": 0, "unknown_tag": 0}
    assert report["verdicts"] == len(saved["rows"]) + 2 and report["used"] == len(saved["rows"])
    index = {t: i for i, t in enumerate(head.vocab.tags)}
    refitted = [r for r in report["tags"] if r["refitted"]]
    left = [r for r in report["tags"] if not r["refitted"]]
    assert refitted and report["tags_refitted"] == len(refitted)
    for r in refitted:  # the model directory holds the β the report says, and marks the tag calibrated
        assert float(head.model.beta[index[r["tag"]]]) == pytest.approx(r["beta_after"], abs=1e-6)
        assert r["present"] >= 5 and r["absent"] >= 5 and head.calibrated[index[r["tag"]]]
    for r in left:
        assert r["beta_after"] == r["beta_before"] == 0.0 and r["reason"].startswith("too few verdicts")
        assert not head.calibrated[index[r["tag"]]]
    counts = {}
    for _, tag, present in saved["rows"]:
        counts.setdefault(tag, [0, 0])[0 if present else 1] += 1
    assert {r["tag"]: [r["present"], r["absent"]] for r in report["tags"]} == counts
    assert json.loads((tmp_path / "recalibrated" / "metrics.json").read_text())["calibration"]["tags_refitted"] == len(refitted)
    # W is frozen: only β moved.
    assert torch.equal(head.model.linear.weight, trained["model"].linear.weight)
    assert annotation(head.model, trained)["f1@5"] > annotation(trained["model"], trained)["f1@5"]


@pytest.mark.parametrize("case", ["missing_store", "bad_url", "unknown_policy", "no_matching_verdict",
                                  "manifest_and_feedback", "neither"])
def test_cli_bad_inputs_exit_2_with_one_line(saved, trained, tmp_path, capsys, case):
    argv = ["calibrate", "--model", saved["model"], "--features", saved["features"], "--out", str(tmp_path / "o")]
    expect = {
        "missing_store": f"no feedback store at {tmp_path / 'none.db'}",
        "bad_url": "expected sqlite:///relative/path.db",
        "unknown_policy": "policy must be one of latest, majority, got 'newest'",
        "no_matching_verdict": (f"none of the 3 verdicts matches the model and {saved['features']}: 1 on uploads "
                                "(sha256:…, no features), 1 on images without features there, 1 on tags outside "
                                "the model's vocabulary"),
        "manifest_and_feedback": "drop --manifest",
        "neither": "--manifest is required",
    }[case]
    if case == "missing_store":
        argv += ["--feedback", f"sqlite:///{tmp_path / 'none.db'}"]
    elif case == "bad_url":
        argv += ["--feedback", "postgres://db/feedback"]
    elif case == "unknown_policy":
        argv += ["--feedback", f"sqlite:///{saved['db']}", "--policy", "newest"]
    elif case == "no_matching_verdict":
        db = tmp_path / "other.db"
        store = FeedbackStore.open(f"sqlite:///{db}")
        store.add("r", [Verdict(UPLOAD, "dog", True), Verdict("elsewhere-1", trained["vocab"][0], True),
                        Verdict(saved["rows"][0][0], "flurbish", False)])
        store.close()
        argv += ["--feedback", f"sqlite:///{db}"]
    elif case == "manifest_and_feedback":
        argv += ["--feedback", f"sqlite:///{saved['db']}", "--manifest", trained["corpus"]["manifest"]]
    code, _, err = _run(capsys, *argv)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("tagray calibrate: error: ") and expect in err[0]
    assert not (tmp_path / "o").exists()
    if case == "missing_store":
        assert not (tmp_path / "none.db").exists()  # not created empty by looking
