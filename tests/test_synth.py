"""The synthetic corpus: deterministic, and `stats` recovers the rates it was made with."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tagray.data import schema, storage
from tagray.data.normalize import TagNormalizer
from tagray.data.stats import tag_statistics
from tagray.data.synth import SynthConfig, generate, synthesize


@pytest.fixture(scope="module")
def corpus():
    return generate(SynthConfig(images=20_000, seed=3), "/nowhere")


@pytest.fixture(scope="module")
def stats(corpus):
    return tag_statistics(corpus.manifest, TagNormalizer())


def test_same_seed_same_corpus_other_seed_differs():
    a = generate(SynthConfig(images=500, seed=5), "/x")
    b = generate(SynthConfig(images=500, seed=5), "/x")
    c = generate(SynthConfig(images=500, seed=6), "/x")
    assert a.manifest.equals(b.manifest) and a.truth == b.truth
    assert not a.manifest.column("tags").equals(c.manifest.column("tags"))


def test_corpus_shape_matches_its_settings(corpus):
    t = corpus.truth
    assert 2.3 <= t["concepts_per_image"] <= 2.5  # NUS-WIDE's 2.4
    pis = np.array([c["pi"] for c in t["concepts"]])
    assert pis.min() >= 0.02 and pis.max() <= 0.9 and 0.12 <= np.median(pis) <= 0.28
    m = corpus.manifest
    assert all(len(x) >= 1 for x in m.column("labels").to_pylist())
    assert sum(bool(x) for x in m.column("sets").to_pylist()) > 0.6 * m.num_rows
    assert sum(bool(x) for x in m.column("groups").to_pylist()) > 0.3 * m.num_rows
    # Non-image tags, plurals and synonyms occur in the raw tags.
    flat = {t for tags in m.column("tags").to_pylist() for t in tags}
    assert {"2010", "explore", "cars", "puppy"} & flat == {"2010", "explore", "cars", "puppy"}


def test_stats_recover_tagging_likelihoods(corpus, stats):
    truth = {c["tag"]: c for c in corpus.truth["concepts"]}
    rows = stats["labels"]["per_label"]
    measured = np.array([r["tagging_likelihood"] for r in rows])
    true_pi = np.array([truth[r["label"]]["pi"] for r in rows])
    assert abs(np.median(measured) - np.median(true_pi)) <= 0.05
    frequent = np.array([r["images_with_label"] >= 300 for r in rows])
    assert np.abs(measured - true_pi)[frequent].max() < 0.08


def test_stats_recover_false_tag_rates(corpus, stats):
    truth = {c["tag"]: c for c in corpus.truth["concepts"]}
    rows = stats["labels"]["per_label"]
    measured = np.array([r["false_tag_rate"] for r in rows])
    true_rate = np.array([truth[r["label"]]["false_rate"] for r in rows])
    assert abs(np.median(measured) / np.median(true_rate) - 1) < 0.15
    assert np.corrcoef(measured, true_rate)[0, 1] > 0.8


def test_tag_accuracy_falls_with_position(stats):
    pos = stats["labels"]["accuracy_by_position"]
    acc = {p["position"]: p for p in pos}
    early = (acc["1"]["accuracy"] + acc["2"]["accuracy"]) / 2
    late = [p for p in pos if p["position"] not in {str(i) for i in range(1, 10)}]
    late_acc = sum(p["accuracy"] * p["tags"] for p in late) / sum(p["tags"] for p in late)
    assert early > 0.65 and late_acc < 0.45 and early - late_acc > 0.3
    assert 0.6 < stats["labels"]["overall_precision"] < 0.8  # MIRFlickr 78 %, NUS-WIDE 62 %


def test_features_only_are_informative(tmp_path):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    cfg = SynthConfig(images=3000, feature_dim=64, seed=1)
    out = synthesize(cfg, str(tmp_path), features_only=True)
    table = pq.read_table(out["features"])
    assert schema.validate_features(table.schema, out["features"]) == 64
    assert schema.backbone_identity(table.schema)["name"] == "synthetic-latent"
    manifest = schema.read_manifest(out["manifest"])
    assert table.column("image_id").equals(manifest.column("image_id"))
    x = np.stack(table.column("feature").to_numpy(zero_copy_only=False))
    top = json.loads(storage.read_text(out["truth"]))["concepts"]
    label = max(top, key=lambda c: c["prior"])["tag"]
    y = np.array([label in ls for ls in manifest.column("labels").to_pylist()])
    shuffled = np.random.default_rng(0).permutation(len(x))
    aucs = []
    for feats in (x, x[shuffled]):  # the real features against a shuffled-row baseline
        clf = LogisticRegression(max_iter=500).fit(feats[:2000], y[:2000])
        aucs.append(roc_auc_score(y[2000:], clf.decision_function(feats[2000:])))
    assert aucs[0] > 0.95 and aucs[1] < 0.65


@pytest.mark.integration
def test_rendered_jpegs_deterministic_across_chunkings(ray_local, tmp_path):
    a = synthesize(SynthConfig(images=40, render_batch=15, seed=2), str(tmp_path / "a"))
    b = synthesize(SynthConfig(images=40, render_batch=40, seed=2), str(tmp_path / "b"))
    files = sorted((tmp_path / "a" / "images").glob("*.jpg"))
    assert len(files) == 40
    for f in files[:5]:
        img = Image.open(f)
        assert img.format == "JPEG" and img.size == (128, 128) and img.mode == "RGB"
        assert f.read_bytes() == (tmp_path / "b" / "images" / f.name).read_bytes()
    assert a["num_images"] == b["num_images"] == 40


@pytest.mark.integration
def test_synth_writes_to_s3(ray_local, s3_bucket):
    endpoint, bucket = s3_bucket
    prefix = f"s3://{bucket}/corpus"
    out = synthesize(SynthConfig(images=30, render_batch=10), prefix, endpoint_url=endpoint)
    manifest = schema.read_manifest(out["manifest"], endpoint_url=endpoint)
    uris = manifest.column("uri").to_pylist()
    assert all(u.startswith(f"{prefix}/images/") for u in uris)
    img = Image.open(io.BytesIO(storage.read_bytes(uris[7], endpoint)))
    assert img.size == (128, 128)
    truth = json.loads(storage.read_text(out["truth"], endpoint))
    assert truth["images"] == 30 and truth["rendered"] is True
