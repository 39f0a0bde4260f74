"""Issue 17 items 5–7 at the command line: each bad input's exit status and one-line error.

Settings, manifests and models are checked before Ray starts (no Ray in the fast cases);
training that diverges on Ray Train stops with the epoch, step and loss and writes no model;
a request the cluster cannot hold fails at once, naming what was asked and what there is;
errors raised inside Ray workers reach the user as their own one line.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tagray import cli
from tests.test_hardening import poison, saved_model  # noqa: F401  (a fixture)


def _run(capsys, *argv: str) -> tuple[int, list[str]]:
    """(exit status, stderr lines) of `tagray ARGV`."""
    code = cli.main(list(argv))
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _ray_up() -> bool:
    import ray

    return ray.is_initialized()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from tests.corpora import split_corpus

    return split_corpus(tmp_path_factory.mktemp("hard"), 300, seed=0, feature_dim=16)


def _train_argv(corpus, out, *extra: str) -> list[str]:
    return ["train", "--manifest", corpus["manifest"], "--features", corpus["features"], "--out", str(out), *extra]


# --- before Ray: settings, manifests, models ----------------------------------------------------

@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_lr_fails_in_one_line_before_ray(corpus, tmp_path, capsys, value):
    ray_before = _ray_up()
    code, err = _run(capsys, *_train_argv(corpus, tmp_path / "m", "--head", "lr", f"lr={value}"))
    assert code == 2
    assert err == [f"tagray train: error: defaults + command-line overrides: lr: expected a finite number, got {value}"]
    assert ray_before or not _ray_up()  # nothing started Ray
    assert not (tmp_path / "m").exists()


def test_empty_vocabulary_fails_in_one_line_before_ray(corpus, tmp_path, capsys):
    norm = tmp_path / "norm.yaml"
    norm.write_text("# a normaliser no tag of 300 images can satisfy\nmin_images: 100000\n")
    ray_before = _ray_up()
    code, err = _run(capsys, *_train_argv(corpus, tmp_path / "m", "--head", "lr", f"normalizer={norm}"))
    assert code == 2 and len(err) == 1
    assert err[0].startswith("tagray train: error: empty vocabulary: no tag is on at least min_images=100000 images")
    code, err = _run(capsys, "tune", "--config", "tune_configs/neighbors.yaml", "--manifest", corpus["manifest"],
                     "--features", corpus["features"], "--out", str(tmp_path / "sweep"), f"normalizer={norm}")
    assert code == 2 and len(err) == 1 and "empty vocabulary" in err[0]
    assert ray_before or not _ray_up()


@pytest.mark.parametrize("command", ["evaluate", "index", "calibrate"])
def test_a_model_with_non_finite_weights_is_refused_naming_file_and_tensor(saved_model, tmp_path, capsys, command):  # noqa: F811
    bad = tmp_path / "bad"
    shutil.copytree(saved_model["dir"], bad)
    poison(bad)
    argv = [command, "--model", str(bad), "--features", saved_model["features"], "--out", str(tmp_path / "out")]
    if command != "index":
        argv += ["--manifest", saved_model["manifest"]]
    code, err = _run(capsys, *argv)
    assert code == 2
    assert err == [f"tagray {command}: error: {bad}/weights.safetensors: tensor 'linear.weight' has 1 non-finite "
                   "value(s) (NaN or ±inf) of " + f"{saved_model['head'].model.linear.weight.numel()}; "
                   "the model diverged: retrain it (lower lr)"]


def test_evaluate_writes_strict_json(saved_model, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "report.json"
    code, _ = _run(capsys, "evaluate", "--model", str(saved_model["dir"]), "--manifest", saved_model["manifest"],
                   "--features", saved_model["features"], "--out", str(out), "--no-baselines")
    assert code == 0

    def refuse(literal: str):
        raise AssertionError(f"{out} holds the non-JSON literal {literal}")

    report = json.loads(out.read_text(), parse_constant=refuse)
    assert 0 <= report["tag_prediction"]["f1@5"] <= 1


# --- on Ray -------------------------------------------------------------------------------------

@pytest.mark.integration
def test_diverged_training_on_ray_train_stops_and_writes_no_model(ray_local, corpus, tmp_path, capsys):
    out = tmp_path / "m"
    # Adam at lr=1e37 overflows float32 weights at the second step: a real divergence, not a patch.
    code, err = _run(capsys, *_train_argv(corpus, out, "--head", "lr", "lr=1e37", "epochs=2", "batch_size=50",
                                          "checkpoint_every=1", "worker_cpus=0.5"))
    assert code == 2
    ours = [line for line in err if line.startswith("tagray train: error:")]
    assert ours == ["tagray train: error: training diverged: loss inf at epoch 1, step 2; lower lr"]
    assert not (out / "model.json").exists() and not (out / "weights.safetensors").exists()
    states = sorted(out.glob("_ray/train-*/checkpoint_*/state.pt"))
    assert len(states) == 1  # the step-1 checkpoint: the last good one, kept
    state = torch.load(states[0], weights_only=True)["recipe"]  # the recipe's state in the run's checkpoint
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


@pytest.mark.integration
def test_more_workers_than_the_cluster_holds_fails_at_once(ray_local, corpus, tmp_path, capsys):
    code, err = _run(capsys, *_train_argv(corpus, tmp_path / "m", "--head", "lr", "batch_size=100", "workers=100"))
    assert code == 2
    assert err == ["tagray train: error: training (100 worker(s) × 1 CPU) asks for 100 CPU(s) and 0 GPU(s), but the "
                   "Ray cluster has 2 CPU(s) and 0 GPU(s): lower workers / worker_cpus (or trial_cpus), or set "
                   "resources_wait_s to wait for an autoscaling cluster to grow"]
    code, err = _run(capsys, *_train_argv(corpus, tmp_path / "m", "--head", "lr", "batch_size=100", "workers=100",
                                          "resources_wait_s=0.3"))
    assert code == 2 and "has 2 CPU(s) and 0 GPU(s) after waiting 0.3s for it to grow" in err[-1]
    assert not (tmp_path / "m" / "model.json").exists()


@pytest.mark.integration
def test_errors_inside_ray_workers_reach_the_user_as_their_own_line(ray_local, capsys):
    import ray

    from tagray.commands.common import command
    from tagray.config import ConfigError

    @ray.remote
    def fails(kind: str) -> None:
        if kind == "user":
            raise ConfigError("worker.yaml: lr: expected a finite number, got nan")
        raise RuntimeError("shard 3 lost its rows")

    def probe(kind: str) -> int:
        ray.get(fails.remote(kind))
        return 0

    wrapped = command("probe")(probe)
    assert wrapped("user") == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "tagray probe: error: worker.yaml: lr: expected a finite number, got nan")
    assert wrapped("bug") == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == "tagray probe: error: RuntimeError: shard 3 lost its rows"
