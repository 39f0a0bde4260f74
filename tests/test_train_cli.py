"""`tagray train` / `calibrate` / `evaluate` on a local Ray: data-parallel equivalence,
resume, the model directory, the report's keys, and clear errors."""

from __future__ import annotations

import contextlib
import json
import re
import time
from pathlib import Path

import pyarrow.compute as pc
import pytest

from tagray import cli
from tagray.data.schema import read_manifest, write_manifest
from tests.corpora import split_corpus

COMMON = ["epochs=4", "lr=0.01", "worker_cpus=0.5", "checkpoint_every=10"]


@pytest.fixture(scope="module")
def small(ray_local, tmp_path_factory):
    return split_corpus(tmp_path_factory.mktemp("train"), 8000, seed=2, feature_dim=64)


def _train(small, name: str, *extra: str) -> dict:
    out = small["dir"] / name
    argv = ["train", "--manifest", small["manifest"], "--features", small["features"], "--out", str(out), *extra, *COMMON]
    assert cli.main(argv) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def rlr_one(small) -> dict:
    """The 1-worker RLR run (`rlr1`) and its report, once per module: the data-parallel test
    compares against it and the resume test continues it (the report is taken first)."""
    return {"metrics": _train(small, "rlr1", "--head", "rlr", "--workers", "1"), "report": _evaluate(small, "rlr1")}


def _evaluate(small, model: str) -> dict:
    report = small["dir"] / f"{model}-report" / "report.json"
    argv = ["evaluate", "--model", str(small["dir"] / model), "--manifest", small["manifest"],
            "--features", small["features"], "--out", str(report)]
    assert cli.main(argv) == 0
    return json.loads(report.read_text())


@pytest.mark.integration
def test_two_workers_match_one_and_share_pi(small, rlr_one):
    one = rlr_one["metrics"]
    two = _train(small, "rlr2", "--head", "rlr", "--workers", "2")
    assert two["replica_pi_max_diff"] == 0.0  # the all-reduced EM statistics keep replicas identical
    assert one["steps"] == two["steps"]  # the same global batch
    assert two["mean_pi"] == pytest.approx(one["mean_pi"], abs=0.02)
    r1, r2 = rlr_one["report"], _evaluate(small, "rlr2")
    assert r2["tag_prediction"]["f1@5"] == pytest.approx(r1["tag_prediction"]["f1@5"], abs=0.02)
    assert r2["annotation"]["map_label"] == pytest.approx(r1["annotation"]["map_label"], abs=0.03)
    # Stable report keys (README) and the model beats the random baseline.
    for key in ("precision@5", "recall@5", "f1@5"):
        assert key in r1["tag_prediction"]
    for key in ("precision@5", "recall@5", "f1@5", "map_label", "map_image", "micro_auc", "macro_auc"):
        assert key in r1["annotation"]
    assert {"p@5_1", "p@5_2", "p@5_3"} <= set(r1["retrieval"])
    assert r1["annotation"]["map_label"] > r1["baselines"]["random"]["annotation"]["map_label"] + 0.2
    assert (small["dir"] / "rlr1-report" / "pi_vs_measured.png").stat().st_size > 0


@pytest.mark.integration
def test_model_directory_and_resume(small, rlr_one, capsys):
    first = rlr_one["metrics"]  # `--head rlr` with COMMON, 1 worker (the default): this test's first run
    model = small["dir"] / "rlr1"
    for name in ("weights.safetensors", "tags.parquet", "model.json", "normalizer.json", "vocabulary.json",
                 "metrics.json", "training.png"):
        assert (model / name).exists(), name
    # Re-running with more epochs continues from the last checkpoint: the step count goes on
    # and only the new epochs are trained.
    argv = ["train", "--manifest", small["manifest"], "--features", small["features"], "--out", str(model),
            "--head", "rlr", *COMMON[1:], "epochs=6"]
    capsys.readouterr()
    assert cli.main(argv) == 0
    second = json.loads((model / "metrics.json").read_text())
    per_epoch = first["steps"] // 4
    import ray

    out, err = capsys.readouterr()
    assert f"resuming after epoch 4 at step {4 * per_epoch}" in out
    # A worker's progress line is written once, to its stdout: Ray Train's print patch (off in
    # tagray.runtime) also logged every print to the worker's stderr, so the terminal showed it twice.
    pid = re.search(r"\(RayTrainWorker pid=(\d+)\)[^\n]*resuming after epoch 4", out).group(1)
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    (stdout,), (stderr,) = logs.glob(f"worker-*-{pid}.out"), logs.glob(f"worker-*-{pid}.err")
    assert stdout.read_text().count("epoch 6/6") == 1 and "epoch 6/6" not in stderr.read_text()
    # Ray Train's two lines per checkpoint stay in its log file, off the console (tagray/train/worker.py).
    assert "(RayTrainWorker pid" in err + out  # what Ray forwards from the workers is in what was captured
    assert "Checkpoint successfully created" not in err + out and "Reporting training result" not in err + out
    # on the one-machine cluster tagray started, Ray Train's preemption watcher (and its error-level line) is off
    assert "PreemptionWatcher" not in err + out
    worker_id = stdout.name.split("-")[1]
    sys_log = logs / "train" / f"ray-train-sys-worker-{worker_id}.log"
    assert sys_log.read_text().count("Checkpoint successfully created") >= 2
    assert second["steps"] == 6 * per_epoch
    assert [h["epoch"] for h in second["history"]] == [1, 2, 3, 4, 5, 6]
    assert [h["step"] for h in second["history"]] == [per_epoch * e for e in range(1, 7)]
    assert second["history"][:4] == first["history"]  # epochs 1-4 carried over from the checkpoint, not re-run


@pytest.mark.integration
def test_calibrate_writes_a_new_model_with_beta(small):
    _train(small, "lr", "--head", "lr")
    out = small["dir"] / "lr-cal"
    argv = ["calibrate", "--model", str(small["dir"] / "lr"), "--manifest", small["manifest"],
            "--features", small["features"], "--out", str(out), "--max-images", "300"]
    assert cli.main(argv) == 0
    import pyarrow.parquet as pq

    tags = pq.read_table(out / "tags.parquet")
    calibrated = tags.filter(tags.column("calibrated"))
    assert calibrated.num_rows == 40  # every concept of the corpus is a label tag
    assert pc.max(pc.abs(calibrated.column("beta"))).as_py() > 0
    assert json.loads((out / "metrics.json").read_text())["calibration"]["images"] == 300
    report = _evaluate(small, "lr-cal")
    assert report["calibrated"] is True and "seed001" not in report["extras"]  # LR has no π


@pytest.mark.integration
def test_errors_are_clear(small, tmp_path, capsys):
    base = ["--manifest", small["manifest"], "--features", small["features"]]
    # `tagray train` takes five heads: an unknown one is named against all of them (not the
    # linear heads' own "one of lr, rlr", which would send the user away from embed/neighbors/refine).
    assert cli.main(["train", *base, "--out", str(tmp_path / "m"), "head=svm"]) == 2
    err = capsys.readouterr().err
    assert "unknown head 'svm': tagray train trains one of lr, rlr, embed, neighbors, refine" in err, err
    assert cli.main(["train", *base, "--out", str(tmp_path / "m"), "learning_rate=1"]) == 2
    assert "unknown key(s) learning_rate" in capsys.readouterr().err
    no_train = read_manifest(small["manifest"])
    no_train = no_train.filter(pc.not_equal(no_train.column("split"), "train"))
    write_manifest(no_train, str(tmp_path / "no_train.parquet"))
    argv = ["train", "--manifest", str(tmp_path / "no_train.parquet"), "--features", small["features"], "--out", str(tmp_path / "m")]
    assert cli.main(argv) == 2
    assert "train split is empty" in capsys.readouterr().err
    assert cli.main(["evaluate", "--model", str(tmp_path / "nothing"), *base, "--out", str(tmp_path / "r.json")]) == 2
    assert "not a tagray model" in capsys.readouterr().err


@pytest.mark.integration
def test_a_killed_run_resumes_from_its_last_checkpoint(small, capsys):
    """`tagray train` in its own process (its own local Ray), killed once a checkpoint is on
    disk; the same command then continues from that checkpoint's step (run here, on the session's
    cluster: what it resumes from is the run's directory, not the cluster that wrote it)."""
    import os
    import signal
    import subprocess
    import sys

    out = small["dir"] / "killed"
    argv = [sys.executable, "-m", "tagray.cli", "train", "--manifest", small["manifest"], "--features",
            small["features"], "--out", str(out), "--head", "rlr", "lr=0.01", "worker_cpus=0.5",
            "checkpoint_every=5"]
    log = small["dir"] / "killed.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([*argv, "epochs=500"], stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Wait (bounded) for one complete checkpoint: Ray keeps only the newest few, so a file
        # seen by glob may be gone when read, and one being written is not yet a zip archive.
        saved = _wait_for_checkpoint(out, proc, log, deadline=time.monotonic() + 600)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    step = _checkpoint_steps(saved)
    assert step >= 5 and not (out / "metrics.json").exists()
    finished = _finished_epochs(saved)
    capsys.readouterr()
    assert cli.main([*argv[3:], f"epochs={finished + 1}"]) == 0
    printed, deadline = "", time.monotonic() + 60  # the worker's line reaches this driver through Ray's log stream
    while not (resumed := re.search(r"resuming after epoch (\d+) at step (\d+)", printed)):
        assert time.monotonic() < deadline, printed[-2000:]
        printed += "".join(capsys.readouterr())
        time.sleep(0.1)
    # From the checkpoint seen before the kill or a later one (a worker may still persist one
    # while the killed driver's cluster goes down), never from step 0 …
    assert int(resumed[2]) >= step, (resumed[0], step)
    # … and on to epoch finished + 1, unless the checkpoint it resumed from had already passed it
    # (then no epoch is left to train and its history is the run's).
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["history"][-1]["epoch"] == max(finished + 1, int(resumed[1])), resumed[0]


def _registered_state(out) -> dict | None:
    """The state of the checkpoint Ray Train has registered as the run's latest (the one a
    re-run resumes from: its checkpoint manager snapshot), or None while there is none or it
    is being written or rotated. A checkpoint directory on disk that the controller has not
    yet registered is not resumed from, so the test must not wait for one of those."""
    import io

    import torch

    for snapshot in sorted(out.glob("_ray/train-*/checkpoint_manager_snapshot.json")):
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
            if not latest:
                continue
            path = snapshot.parent / latest["checkpoint_dir_name"] / "state.pt"
            return torch.load(io.BytesIO(path.read_bytes()), map_location="cpu", weights_only=True)
        except (FileNotFoundError, json.JSONDecodeError, RuntimeError, EOFError):  # mid-write or rotated
            continue
    return None


def _wait_for_checkpoint(out, proc, log, deadline: float) -> dict:
    import subprocess

    while True:
        state = _registered_state(out)
        if state is not None:
            return state
        assert proc.poll() is None, f"training exited before its first checkpoint: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no registered checkpoint under {out} in time: {log.read_text()[-3000:]}"
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.5)


def _checkpoint_steps(state: dict) -> int:
    """Optimiser steps in a checkpoint state (the recipe's model buffer `steps`)."""
    return int(state.get("recipe", state)["model"]["steps"])


def _finished_epochs(state: dict) -> int:
    return int(state["next_epoch"]) - 1 if "next_epoch" in state else int(state["epoch"])
