"""`tagray train` on Ray Train: builds the targets, runs the TorchTrainer, writes the model.

Checkpoints live in MODEL/_ray/<run name>; re-running the same command after a crash or
a kill resumes from the last one (Ray Train restores a run from its storage path and name).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc

from tagray.config import ConfigError, to_dict
from tagray.data import schema, storage
from tagray.data.normalize import TagNormalizer, Vocabulary
from tagray.features import store
from tagray.heads.artifact import SavedHead, save_head
from tagray.heads.fit import HeadConfig
from tagray.heads.linear import LinearTagger
from tagray.heads.targets import build_targets
from tagray.train.data import count_with_features, training_dataset
from tagray.train.loop import load_state, train_loop

log = logging.getLogger(__name__)

RUN_NAME = "train"


@dataclass(frozen=True)
class TrainRunConfig:
    workers: int = 1  # Ray Train data-parallel workers
    worker_cpus: float = 1.0  # CPUs per worker (leave some for the data pipeline)
    gpu: bool = False  # one GPU per worker
    data_cpus: float = 0.25  # CPUs per feature-reading actor
    readers: int = 1  # feature-reading actors (raise on clusters where reading is the bottleneck)
    materialize: bool = True  # read once into the object store; false when the set exceeds it (re-read per epoch)
    torch_threads: int = 1  # intra-op threads per worker (CPU)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers must be ≥ 1, got {self.workers}")


def prepare_vocabulary(manifest, normalizer: TagNormalizer) -> Vocabulary:
    """The vocabulary of the training split's normalised tags."""
    train = manifest.filter(pc.equal(manifest.column("split"), "train"))
    if train.num_rows == 0:
        raise schema.SchemaError("the manifest's train split is empty: run `tagray split` first, or check its split column")
    return Vocabulary.build(normalizer.normalize_lists(train.column("tags")), normalizer)


def train_head(
    manifest_uri: str,
    features_uri: str,
    out: str,
    cfg: HeadConfig,
    run: TrainRunConfig,
    normalizer: TagNormalizer,
    endpoint_url: str | None = None,
) -> dict:
    """Trains a LR or RLR head on the train split; returns the metrics also saved in `out`."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()
    manifest = schema.read_manifest(manifest_uri, need=("split",), endpoint_url=endpoint_url)
    vocab = prepare_vocabulary(manifest, normalizer)
    targets = build_targets(manifest, normalizer, vocab)
    train_targets = targets.filter(pc.equal(targets.column("split"), "train"))
    identity = store.features_identity(features_uri, endpoint_url)
    if identity is None:
        raise FileNotFoundError(f"{features_uri}: no features")
    dim = int(identity.get("dim") or 0)
    if not dim:
        raise schema.SchemaError(f"{features_uri}: the backbone identity has no feature dimension")
    feature_ids = store.featurized_ids(features_uri, endpoint_url)
    n_train = count_with_features(train_targets, feature_ids)
    if n_train < cfg.batch_size:
        raise schema.SchemaError(
            f"only {n_train} training images have features in {features_uri} (manifest {manifest_uri}); "
            f"need at least batch_size={cfg.batch_size}: featurize them, or lower batch_size"
        )
    counts = np.bincount(pc.list_flatten(train_targets.column("tag_ids")).to_numpy(), minlength=len(vocab))
    tag_rate = counts / max(1, train_targets.num_rows)
    log.info("train: %s head, %d tags, %d training images with features, %d worker(s)", cfg.head, len(vocab), n_train, run.workers)

    # One Ray run per (settings that shape the model, vocabulary, features): re-running the same
    # command resumes it, even with more epochs; changing the head or data starts a new one.
    shaping = {k: v for k, v in to_dict(cfg).items() if k not in ("epochs", "checkpoint_every")}
    key = json.dumps([shaping, vocab.version, store.comparable(identity), run.workers], sort_keys=True)
    run_name = f"{RUN_NAME}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    dataset = training_dataset(features_uri, train_targets, normalizer.cfg.max_tags, run.data_cpus, run.readers, endpoint_url)
    if run.materialize:
        dataset = dataset.materialize()
    fs, base = storage.filesystem_for(storage.join(out, "_ray"), endpoint_url)
    if not storage.is_remote(out):
        storage.makedirs(storage.join(out, "_ray"))
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "head": to_dict(cfg), "tags": len(vocab), "dim": dim, "tag_rate": tag_rate.tolist(),
            "torch_threads": run.torch_threads, "train_images": n_train,
        },
        scaling_config=ScalingConfig(num_workers=run.workers, use_gpu=run.gpu,
                                     resources_per_worker={"CPU": run.worker_cpus, **({"GPU": 1} if run.gpu else {})}),
        run_config=RunConfig(
            name=run_name,
            storage_path=base,
            storage_filesystem=fs,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint (see {out}/_ray)")
    with result.checkpoint.as_directory() as d:
        state = load_state(d)
    model = LinearTagger(dim, len(vocab), cfg.em() if cfg.robust else None)
    model.load_state_dict(state["model"])
    history = state.get("history", [])
    metrics = {
        "head": cfg.head,
        "train_images": n_train,
        "tags": len(vocab),
        "workers": run.workers,
        "steps": int(model.steps),
        "final_loss": history[-1]["loss"] if history else None,
        "mean_pi": float(model.pi().mean()),
        "replica_pi_max_diff": history[-1].get("replica_pi_max_diff") if history else None,
        "history": history,
        "seconds": time.perf_counter() - t0,
        "run": to_dict(run),
        "checkpoints": storage.join(out, "_ray", run_name),
    }
    save_head(
        SavedHead(model, vocab, cfg, identity, counts, np.zeros(len(vocab), bool), metrics), out, endpoint_url
    )
    plot_history(history, out)
    return metrics


def plot_history(history: list[dict], out: str) -> str | None:
    """loss and mean π against training step (PNG in the model directory)."""
    if storage.is_remote(out) or not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(steps, [h["loss"] for h in history], marker="o")
    ax[0].set(xlabel="step", ylabel="training NLL per image", title="loss")
    ax[1].plot(steps, [h["mean_pi"] for h in history], marker="o", color="C1")
    ax[1].set(xlabel="step", ylabel="mean π over tags", title="tagging likelihood π")
    fig.tight_layout()
    path = storage.join(out, "training.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

