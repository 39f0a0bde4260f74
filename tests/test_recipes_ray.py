"""Every head through the one Ray Train worker with 1 worker (the linear heads' with 1 and 2 in
test_train_cli; embed, neighbors and refine with 2 in test_embed_cli and test_neighbors_cli;
the same steps per epoch at any world size in process: test_recipes.py), a Tune trial through
the same loop, and the non-finite-loss guard under Ray Train — on a small corpus, a few epochs each."""

from __future__ import annotations

import json
import re

import pytest

from tagray import cli
from tests.corpora import split_corpus

pytestmark = pytest.mark.integration

QUICK = {
    "lr": ["epochs=2", "batch_size=200"],
    "embed": ["epochs=2", "batch_size=200", "word_dim=16", "oov_steps=0"],
    "neighbors": ["epochs=2", "batch_size=50", "hidden=32", "lr=0.003", "tau=200", "min_steps=0", "m=2"],
    "refine": ["epochs=2", "batch_size=64", "m=4", "max_rank=16", "hidden=32", "init_epochs=2", "init_batch_size=200",
               "min_init_steps=0"],
}


@pytest.fixture(scope="module")
def corpus(ray_local, tmp_path_factory):
    return split_corpus(tmp_path_factory.mktemp("recipes"), 2000, seed=4, feature_dim=32)


def _train(corpus, name: str, head: str, workers: int, *extra: str) -> dict:
    out = corpus["dir"] / name
    argv = ["train", "--head", head, "--manifest", corpus["manifest"], "--features", corpus["features"],
            "--out", str(out), "--workers", str(workers), "worker_cpus=0.5", *QUICK[head], *extra]
    assert cli.main(argv) == 0
    return json.loads((out / "metrics.json").read_text())


# The linear recipe (lr, and rlr: lr plus the EM step whose all-reduced statistics keep the
# replicas' π identical) with 1 and 2 workers, the same steps per epoch and the same figures:
# tests/test_train_cli.py::test_two_workers_match_one_and_share_pi. lr alone is the same code
# without the EM step, trained on Ray Train by the demo and test_train_cli's calibrate test.
# The other heads with 2 workers (DDP, the word shard server, refine's broadcast candidates):
# test_embed_cli, test_neighbors_cli; with 1 worker here.
@pytest.mark.parametrize("head", ["neighbors", "refine"])  # embed: the best-epoch test below
def test_every_head_trains_on_ray_train_with_one_worker(corpus, head):
    one = _train(corpus, f"{head}-1", head, 1)
    first = 0 if head == "refine" else 1
    assert [h["epoch"] for h in one["history"]] == list(range(first, 3))
    assert all(h["loss"] == h["loss"] for h in one["history"])  # finite, not NaN
    assert one["workers"] == 1
    if head in ("neighbors", "refine"):
        assert one["best_val_map"] > 0.05


def test_a_batch_that_does_not_split_over_the_workers_is_refused_before_ray(corpus, capsys):
    argv = ["train", "--head", "lr", "--manifest", corpus["manifest"], "--features", corpus["features"],
            "--out", str(corpus["dir"] / "uneven"), "--workers", "3", "epochs=1", "batch_size=200"]
    assert cli.main(argv) == 2
    assert "batch_size=200 does not split over 3 workers" in capsys.readouterr().err
    assert not (corpus["dir"] / "uneven").exists()


def test_a_diverging_ray_train_run_stops_naming_epoch_and_step_and_writes_no_model(corpus, capsys):
    out = corpus["dir"] / "diverged"
    argv = ["train", "--head", "lr", "--manifest", corpus["manifest"], "--features", corpus["features"],
            "--out", str(out), "--workers", "1", "epochs=2", "batch_size=200", "lr=1e37"]
    assert cli.main(argv) != 0
    err = capsys.readouterr().err
    assert re.search(r"training diverged: loss (nan|inf|-inf) at epoch 1, step \d+; lower lr", err), err
    assert not (out / "model.json").exists() and not (out / "metrics.json").exists()


def test_a_tune_trial_is_the_same_computation_as_tagray_train(corpus, tmp_path):
    """The sweep's best settings retrained with `tagray train` reach the trial's validation mAP (1e-6)."""
    settings = {"epochs": 2, "batch_size": 50, "hidden": 32, "lr": 0.003, "tau": 200, "metadata": "tags", "min_steps": 0}
    sweep = tmp_path / "sweep.yaml"
    fixed = ", ".join(f"{k}: {v}" for k, v in settings.items())
    sweep.write_text(f"head: neighbors\nfixed: {{{fixed}}}\nsearch_space:\n  m: {{grid: [2]}}\n"
                     "grace_period: 2\nreduction_factor: 2\ntrial_cpus: 1\n")
    out = tmp_path / "sweep"
    assert cli.main(["tune", "--config", str(sweep), "--manifest", corpus["manifest"], "--features", corpus["features"],
                     "--out", str(out)]) == 0
    trial = json.loads((out / "sweep.json").read_text())
    # QUICK["neighbors"] (with m=2) are the sweep's settings: the 1-worker run of the test above,
    # or the same command now when this test runs alone
    done = corpus["dir"] / "neighbors-1" / "metrics.json"
    trained = json.loads(done.read_text()) if done.exists() else _train(corpus, "neighbors-1", "neighbors", 1)
    assert trained["best_val_map"] == pytest.approx(trial["best_val_map"], abs=1e-6)
    sweep_history = json.loads((out / "best_model" / "metrics.json").read_text())
    assert sweep_history["best_epoch"] == trained["best_epoch"]


def test_the_embed_head_on_ray_keeps_its_best_epochs_h_and_words_from_the_shard_server(corpus):
    """The embed head on Ray Train with 1 worker and 2 word shards, validating: the model written
    is the best epoch's h with the word shards' snapshot of that epoch, which pruning kept while
    newer snapshots came and went. The val images' labels are each one's next concept, which
    training contradicts, so the best epoch is an early one."""
    import numpy as np
    import pyarrow as pa

    from tagray.config import load_config
    from tagray.data.normalize import NormalizerConfig, TagNormalizer
    from tagray.data.schema import read_manifest, write_manifest
    from tagray.heads.embed_artifact import load_embed_head
    from tagray.heads.recipes.embed import SNAPSHOTS_KEPT, validation_map
    from tagray.heads.word_table import WordTable
    from tagray.train.embed_run import validation_sample
    from tagray.train.run import training_inputs

    m = read_manifest(corpus["manifest"])
    names = sorted({n for ls in m.column("labels").to_pylist() if ls for n in ls})
    following = {n: names[(i + 1) % len(names)] for i, n in enumerate(names)}
    labels = [[following[n] for n in ls] if ls and split == "val" else ls
              for ls, split in zip(m.column("labels").to_pylist(), m.column("split").to_pylist(), strict=True)]
    manifest = str(corpus["dir"] / "manifest_val_contradicts.parquet")
    write_manifest(m.set_column(m.column_names.index("labels"), "labels", pa.array(labels, pa.list_(pa.string()))),
                   manifest)
    out = corpus["dir"] / "embed-best"
    argv = ["train", "--head", "embed", "--manifest", manifest, "--features", corpus["features"], "--out", str(out),
            "--workers", "1", "shards=2", "worker_cpus=0.5", *QUICK["embed"], "epochs=5", "checkpoint_every=3"]
    assert cli.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3, 4, 5] and metrics["workers"] == 1
    assert all(h["loss"] == h["loss"] for h in metrics["history"])  # finite, not NaN
    values = [h["val_map"] for h in metrics["history"]]
    assert metrics["validation"]["truth"] == "labels"
    assert metrics["best_epoch"] == int(np.argmax(values)) + 1 < 5, values
    assert metrics["best_val_map"] == max(values)
    head = load_embed_head(str(out))
    normalizer = TagNormalizer(load_config(NormalizerConfig, "normalize.yaml"))
    inputs = training_inputs(manifest, corpus["features"], normalizer, 200, tagged_only=True)
    val, _ = validation_sample(inputs, corpus["features"], head.config, normalizer.cfg.max_tags)
    assert validation_map(head.mlp, WordTable(head.vectors.numpy()), val) == pytest.approx(max(values), abs=1e-5)
    snapshots = sorted(p.name for p in (out / "_ray").glob("*/word_shards/step-*"))
    assert len(snapshots) == SNAPSHOTS_KEPT + 1, snapshots  # the newest, and the best epoch's
