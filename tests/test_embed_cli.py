"""`tagray train --head embed`, `index`, `search`, `evaluate` on a local Ray: 2 workers and
2 embedding shards, resume with both h and the word vectors, open-vocabulary search for a
word no image is tagged with, and clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tagray import cli
from tagray.data.normalize import TagNormalizer
from tagray.data.schema import read_manifest
from tagray.data.word_vectors import (
    read_word_vectors,
    word_table_init,
    write_synthetic_word_vectors,
)
from tagray.heads.embed_artifact import load_embed_head
from tests.corpora import split_corpus

COMMON = ["hidden=[128]", "worker_cpus=0.5", "checkpoint_every=15", "batch_size=128", "oov_steps=400"]


@pytest.fixture(scope="module")
def corpus(ray_local, tmp_path_factory):
    corpus = split_corpus(tmp_path_factory.mktemp("embed"), 8000, seed=2, feature_dim=64)
    corpus["vectors"] = write_synthetic_word_vectors(corpus["truth"], str(corpus["dir"] / "vectors.txt"), dim=32)
    return corpus


def _train(corpus, name: str, *overrides: str, workers: int = 2) -> dict:
    out = corpus["dir"] / name
    argv = ["train", "--head", "embed", "--manifest", corpus["manifest"], "--features", corpus["features"],
            "--out", str(out), "--vectors", corpus["vectors"], "--workers", str(workers), *COMMON, *overrides]
    assert cli.main(argv) == 0
    return json.loads((out / "metrics.json").read_text())


def _train_features(corpus) -> np.ndarray:
    """φ of the images the embed head trains on (`training_inputs(…, tagged_only=True)`'s)."""
    from tagray.config import load_config
    from tagray.data.normalize import NormalizerConfig
    from tagray.features.store import read_features
    from tagray.heads.fit import align
    from tagray.train.run import training_inputs

    normalizer = TagNormalizer(load_config(NormalizerConfig, "normalize.yaml"))
    inputs = training_inputs(corpus["manifest"], corpus["features"], normalizer, 128, tagged_only=True)
    x, found = align(read_features(corpus["features"])[0], inputs.train.column("image_id"))
    assert len(found) == inputs.n_train
    return x.numpy()


def _search(corpus, model: str, capsys, *args: str) -> list[dict]:
    capsys.readouterr()
    assert cli.main(["search", "--model", str(corpus["dir"] / model), "--index", str(corpus["dir"] / f"{model}-index"),
                     "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def _label_share(corpus, results: list[dict], label: str) -> float:
    m = read_manifest(corpus["manifest"])
    labels = dict(zip(m.column("image_id").to_pylist(), m.column("labels").to_pylist(), strict=True))
    return float(np.mean([label in (labels[r["image_id"]] or []) for r in results]))


@pytest.mark.integration
def test_embed_head_trains_on_shards_resumes_and_searches_any_word(corpus, capsys):
    first = _train(corpus, "embed", "shards=2", "epochs=6")
    model = corpus["dir"] / "embed"
    for name in ("weights.safetensors", "word_vectors.safetensors", "words.parquet", "model.json", "vocabulary.json",
                 "metrics.json", "training.png"):
        assert (model / name).exists(), name
    assert first["shards"] == 2 and len(first["shard_server"]) == 2 and first["pretrained_words"] > 0
    assert all(s["rows_pushed"] > 0 for s in first["shard_server"])
    assert first["oov_snapping"]["words"] > 0 and first["oov_snapping"]["loss_after"] < first["oov_snapping"]["loss_before"]
    # user-tag scores Platt-scaled per tag on the tagged val images (tagray.heads.calibrate.fit_platt)
    assert first["user_tags"]["method"] == "platt" and first["user_tags"]["images"] > 100
    assert (model / "user_tags.safetensors").exists()

    # Re-running with more epochs resumes: h from the checkpoint, word vectors from the
    # shard snapshot it names (not the pretrained file).
    head_before = load_embed_head(str(model))
    # h z-scores φ with the training images' moments (the driver's sample: every one at this size)
    x = _train_features(corpus)
    assert head_before.config.standardize is True
    torch.testing.assert_close(head_before.mlp.feature_shift, torch.from_numpy(x.mean(0, dtype=np.float64)).float(),
                               rtol=1e-4, atol=1e-5)
    capsys.readouterr()
    resumed = _train(corpus, "embed", "shards=2", "epochs=8")
    assert f"resuming after epoch 6 at step {first['steps']}" in capsys.readouterr().out
    assert resumed["steps"] == first["steps"] * 8 // 6
    assert [h["epoch"] for h in resumed["history"]] == list(range(1, 9))
    # h continued from its trained state: the first resumed epoch's loss is near where the first
    # run ended, not back near its first epoch's (as a restart of h on the trained words would be).
    start, end = first["history"][0]["loss"], first["history"][-1]["loss"]
    assert start - end > 0.05 * start, first["history"]
    assert resumed["history"][6]["loss"] < end + 0.25 * (start - end), (start, end, resumed["history"][6])
    head = load_embed_head(str(model))
    tags = len(head.vocab)
    moved_since_first = (head.vectors[:tags] - head_before.vectors[:tags]).norm(dim=1).mean()
    moved_in_total = (head.vectors[:tags] - _initial(corpus, head)).norm(dim=1).mean()
    assert moved_since_first < moved_in_total  # continued from the trained vectors, not from scratch

    # evaluate: the report keys of the linear heads; beats the random baseline.
    report_path = corpus["dir"] / "embed-report" / "report.json"
    assert cli.main(["evaluate", "--model", str(model), "--manifest", corpus["manifest"], "--features",
                     corpus["features"], "--out", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["head"] == "embed"
    assert {"precision@5", "recall@5", "f1@5"} <= set(report["tag_prediction"])
    assert report["tag_prediction"]["f1@5"] > 2 * report["baselines"]["random"]["tag_prediction"]["f1@5"]
    assert report["tag_prediction"]["f1@5"] > report["baselines"]["prior"]["tag_prediction"]["f1@5"]
    assert report["annotation"]["map_label"] > report["baselines"]["random"]["annotation"]["map_label"] + 0.2

    # index + search: "seashore" is in the pretrained file only — no image is tagged with it.
    assert "seashore" in head.words[tags:]
    assert cli.main(["index", "--model", str(model), "--features", corpus["features"], "--manifest", corpus["manifest"],
                     "--out", str(corpus["dir"] / "embed-index")]) == 0
    beach = _search(corpus, "embed", capsys, "--q", "beach", "-k", "20")
    seashore = _search(corpus, "embed", capsys, "--q", "seashore", "-k", "20")
    base_rate = _base_rate(corpus, "beach")
    assert _label_share(corpus, beach, "beach") > 3 * base_rate
    assert _label_share(corpus, seashore, "beach") > 3 * base_rate
    both = _search(corpus, "embed", capsys, "--q", "beach,Sunsets", "-k", "5")  # normalised like tags
    assert len(both) == 5 and both[0]["score"] >= both[-1]["score"]
    top = _search(corpus, "embed", capsys, "--image-id", beach[0]["image_id"], "-k", "5")
    assert len(top) == 5

    # The trained model's own bad-input path: an unknown query word.
    assert cli.main(["search", "--model", str(model), "--index", str(corpus["dir"] / "embed-index"),
                     "--q", "beach,flurbish"]) == 2
    assert "unknown word 'flurbish'" in capsys.readouterr().err

    # `tagray calibrate` refits the user-tag scaling on a split's tagged images (here 200 of test's),
    # the rest of the model unchanged; β from feedback is a linear head's, and is refused.
    cal = corpus["dir"] / "embed-cal"
    assert cli.main(["calibrate", "--model", str(model), "--manifest", corpus["manifest"], "--features",
                     corpus["features"], "--out", str(cal), "--split", "test", "--max-images", "200"]) == 0
    refit = load_embed_head(str(cal))
    assert refit.user_tags_fit["split"] == "test" and refit.user_tags_fit["images"] == 200
    assert refit.metrics["calibrated_from"] == str(model)
    assert torch.equal(refit.vectors, head.vectors) and refit.mlp_digest == head.mlp_digest
    assert not torch.equal(refit.user_tags[1], head.user_tags[1])  # fitted again, on other images
    assert cli.main(["calibrate", "--model", str(model), "--features", corpus["features"], "--out",
                     str(corpus["dir"] / "fb"), "--feedback", "sqlite:///" + str(corpus["dir"] / "fb.db")]) == 2
    assert "fitted on a split: --manifest, no --feedback" in capsys.readouterr().err
    assert cli.main(["calibrate", "--model", str(model), "--manifest", corpus["manifest"], "--features",
                     corpus["features"], "--out", str(corpus["dir"] / "none"), "--split", "holdout"]) == 2
    assert "split 'holdout'" in capsys.readouterr().err and not (corpus["dir"] / "none").exists()
    assert cli.main(["calibrate", "--model", str(model), "--manifest", corpus["manifest"], "--features",
                     str(corpus["dir"] / "no-features"), "--out", str(corpus["dir"] / "none")]) == 2
    assert "no feature files" in capsys.readouterr().err and not (corpus["dir"] / "none").exists()


def _initial(corpus, head) -> torch.Tensor:
    """The training tags' vectors before training (pretrained file, or random where missing)."""
    normalizer = TagNormalizer.from_identity(head.vocab.normalizer)
    _, init, _ = word_table_init(head.vocab.tags, read_word_vectors(corpus["vectors"], normalizer), 32, 0.1)
    return torch.from_numpy(init[: len(head.vocab)])


def _base_rate(corpus, label: str) -> float:
    labels = read_manifest(corpus["manifest"]).column("labels").to_pylist()
    return float(np.mean([label in (row or []) for row in labels]))


@pytest.mark.integration
def test_embed_errors_are_clear(corpus, capsys, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("beach 0.1 0.2 0.3\nsunset 0.1 0.2\n")
    argv = ["train", "--head", "embed", "--manifest", corpus["manifest"], "--features", corpus["features"],
            "--out", str(tmp_path / "m"), "--vectors", str(bad), *COMMON]
    assert cli.main(argv) == 2
    assert "bad.txt:2: 2 values, but the file's vectors have 3" in capsys.readouterr().err
    assert cli.main([*argv[:-len(COMMON) - 2], "--vectors", str(tmp_path / "none.txt"), *COMMON]) == 2
    assert "none.txt: no such word-vector file" in capsys.readouterr().err
    assert cli.main([*argv[:-len(COMMON) - 2], "sampler=nearest"]) == 2
    assert "sampler must be one of frequency, adjacent, pool" in capsys.readouterr().err
