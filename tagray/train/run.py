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
import pyarrow as pa
import pyarrow.compute as pc

from tagray.config import ConfigError, to_dict
from tagray.data import schema, storage
from tagray.data.normalize import TagNormalizer, Vocabulary
from tagray.features import store
from tagray.heads.artifact import SavedHead, save_head
from tagray.heads.fit import HeadConfig
from tagray.heads.linear import LinearTagger
from tagray.heads.targets import build_targets, prepare_vocabulary
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
    shards: int = 2  # embed head: embedding shard actors holding the word vectors (CPU memory)
    shard_cpus: float = 0.1  # embed head: CPUs reserved per shard actor
    resources_wait_s: float | None = None  # wait this long for the cluster to hold the request (None: 600 s if it autoscales, else fail at once)

    def __post_init__(self) -> None:
        if self.workers < 1 or self.shards < 1:
            raise ConfigError(f"workers and shards must be ≥ 1, got {self.workers} and {self.shards}")
        if not (self.worker_cpus > 0 and self.data_cpus > 0 and self.shard_cpus > 0):  # NaN fails too
            raise ConfigError(f"worker_cpus, data_cpus and shard_cpus must be > 0, got {self.worker_cpus}, "
                              f"{self.data_cpus}, {self.shard_cpus}")
        if self.readers < 1 or self.torch_threads < 1:
            raise ConfigError(f"readers and torch_threads must be ≥ 1, got {self.readers} and {self.torch_threads}")
        if self.resources_wait_s is not None and not self.resources_wait_s >= 0:
            raise ConfigError(f"resources_wait_s must be ≥ 0 (or null), got {self.resources_wait_s}")

    def request(self, head: str) -> tuple[float, float]:
        """(CPUs, GPUs) a run of `head` holds at once: the workers, the embed head's shard actors,
        and a feature reader when the data streams beside training (materialize: false)."""
        cpus = self.workers * self.worker_cpus
        if head == "embed":
            cpus += self.shards * self.shard_cpus
        if head in ("lr", "rlr", "embed") and not self.materialize:
            cpus += self.data_cpus
        return cpus, float(self.workers if self.gpu else 0)


AUTOSCALING_WAIT_S = 600.0  # how long an autoscaling cluster gets to grow to a request by default


def cluster_autoscales() -> bool:
    """Whether the connected cluster can add nodes: launched by the cluster launcher (the bootstrap
    config Ray Tune looks for), KubeRay (RAY_CLUSTER_NAME in the pod), or the v2 autoscaler."""
    import os
    from pathlib import Path

    if Path("~/ray_bootstrap_config.yaml").expanduser().exists() or os.environ.get("RAY_CLUSTER_NAME"):
        return True
    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        return bool(is_autoscaler_v2())
    except Exception:  # an older Ray without the v2 autoscaler, or no GCS answer: assume a fixed cluster
        return False


def require_resources(cpus: float, gpus: float, what: str, wait_s: float | None = None, poll_s: float = 5.0) -> None:
    """Returns once the Ray cluster (ray.cluster_resources(): all nodes, busy or not) holds `cpus`
    CPUs and `gpus` GPUs; otherwise ConfigError naming what was asked and what there is — at once
    on a fixed cluster (Ray would wait for ever), after `wait_s` seconds (default
    AUTOSCALING_WAIT_S) on one that autoscales."""
    import ray

    def have() -> tuple[float, float]:
        r = ray.cluster_resources()
        return float(r.get("CPU", 0)), float(r.get("GPU", 0))

    def fits() -> bool:
        return cpus <= have()[0] + 1e-9 and gpus <= have()[1] + 1e-9

    if fits():
        return
    deadline_s = wait_s if wait_s is not None else (AUTOSCALING_WAIT_S if cluster_autoscales() else 0.0)
    if deadline_s > 0:
        log.warning("%s asks for %g CPUs, %g GPUs; the cluster has %g CPUs, %g GPUs: waiting up to %gs for it to grow",
                    what, cpus, gpus, *have(), deadline_s)
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline and not fits():
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        if fits():
            return
    c, g = have()
    waited = f" after waiting {deadline_s:g}s for it to grow" if deadline_s > 0 else ""
    raise ConfigError(f"{what} asks for {cpus:g} CPU(s) and {gpus:g} GPU(s), but the Ray cluster has {c:g} CPU(s) and "
                      f"{g:g} GPU(s){waited}: lower workers / worker_cpus (or trial_cpus), or set resources_wait_s "
                      "to wait for an autoscaling cluster to grow")


@dataclass
class TrainingInputs:
    """What every head's trainer reads: vocabulary, targets, the features' identity."""

    vocab: Vocabulary
    targets: pa.Table  # the whole manifest's targets
    train: pa.Table  # the train split's
    identity: dict
    dim: int
    n_train: int  # training images that have features
    counts: np.ndarray  # (T,) training images carrying each tag


def training_inputs(
    manifest_uri: str, features_uri: str, normalizer: TagNormalizer, batch_size: int, endpoint_url: str | None = None,
    tagged_only: bool = False,
) -> TrainingInputs:
    """Reads and checks the inputs; `tagged_only` keeps training images with ≥ 1 vocabulary tag."""
    manifest = schema.read_manifest(manifest_uri, need=("split",), endpoint_url=endpoint_url)
    vocab = prepare_vocabulary(manifest, normalizer)
    targets = build_targets(manifest, normalizer, vocab)
    train = targets.filter(pc.equal(targets.column("split"), "train"))
    if tagged_only:
        train = train.filter(pc.greater(pc.list_value_length(train.column("tag_ids")), 0))
    identity = store.features_identity(features_uri, endpoint_url)
    if identity is None:  # no files at all (a file without an identity is refused by features_identity)
        raise FileNotFoundError(store.missing_message(features_uri))
    dim = int(identity.get("dim") or 0)
    if not dim:
        raise schema.SchemaError(f"{features_uri}: the backbone identity has no feature dimension")
    n_train = count_with_features(train, store.featurized_ids(features_uri, endpoint_url))
    if n_train < batch_size:
        raise schema.SchemaError(
            f"only {n_train} training images{' with tags' if tagged_only else ''} have features in {features_uri} "
            f"(manifest {manifest_uri}); need at least batch_size={batch_size}: featurize them, or lower batch_size"
        )
    counts = np.bincount(pc.list_flatten(train.column("tag_ids")).to_numpy(), minlength=len(vocab))
    return TrainingInputs(vocab, targets, train, identity, dim, n_train, counts)


def run_name(prefix: str, cfg, exclude: tuple[str, ...], *parts) -> str:
    """One Ray run per (settings that shape the model, data): re-running the same command
    resumes it, even with more epochs; changing the head or data starts a new one."""
    shaping = {k: v for k, v in to_dict(cfg).items() if k not in exclude}
    key = json.dumps([shaping, *parts], sort_keys=True, default=str)
    return f"{prefix}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def ray_storage(out: str, endpoint_url: str | None):
    """(filesystem, path) of MODEL/_ray, where Ray Train keeps runs and checkpoints."""
    fs, base = storage.filesystem_for(storage.join(out, "_ray"), endpoint_url)
    if not storage.is_remote(out):
        storage.makedirs(storage.join(out, "_ray"))
    return fs, base


def scaling(run: TrainRunConfig):
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=run.workers, use_gpu=run.gpu,
                         resources_per_worker={"CPU": run.worker_cpus, **({"GPU": 1} if run.gpu else {})})


def train_head(
    manifest_uri: str,
    features_uri: str,
    out: str,
    cfg: HeadConfig,
    run: TrainRunConfig,
    normalizer: TagNormalizer,
    endpoint_url: str | None = None,
    inputs: TrainingInputs | None = None,
) -> dict:
    """Trains a LR or RLR head on the train split; returns the metrics also saved in `out`.
    `inputs`: what `training_inputs` read, when the caller checked them before starting Ray."""
    from ray.train import CheckpointConfig, RunConfig
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()
    inputs = inputs or training_inputs(manifest_uri, features_uri, normalizer, cfg.batch_size, endpoint_url)
    vocab, identity, dim, n_train, counts = inputs.vocab, inputs.identity, inputs.dim, inputs.n_train, inputs.counts
    tag_rate = counts / max(1, inputs.train.num_rows)
    log.info("train: %s head, %d tags, %d training images with features, %d worker(s)", cfg.head, len(vocab), n_train, run.workers)
    name = run_name(RUN_NAME, cfg, ("epochs", "checkpoint_every"), vocab.version, store.comparable(identity), run.workers)
    dataset = training_dataset(features_uri, inputs.train, normalizer.cfg.max_tags, run.data_cpus, run.readers, endpoint_url)
    if run.materialize:
        dataset = dataset.materialize()
    fs, base = ray_storage(out, endpoint_url)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "head": to_dict(cfg), "tags": len(vocab), "dim": dim, "tag_rate": tag_rate.tolist(),
            "torch_threads": run.torch_threads, "train_images": n_train,
        },
        scaling_config=scaling(run),
        run_config=RunConfig(
            name=name,
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
        "checkpoints": storage.join(out, "_ray", name),
    }
    save_head(
        SavedHead(model, vocab, cfg, identity, counts, np.zeros(len(vocab), bool), metrics), out, endpoint_url
    )
    plot_history(history, out)
    return metrics


def plot_history(history: list[dict], out: str) -> str | None:
    """loss (and mean π for RLR) against training step (PNG in the model directory)."""
    if storage.is_remote(out) or not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    with_pi = "mean_pi" in history[-1]
    fig, axes = plt.subplots(1, 2 if with_pi else 1, figsize=(9 if with_pi else 4.5, 3.2), squeeze=False)
    ax = axes[0]
    ax[0].plot(steps, [h["loss"] for h in history], marker="o")
    ax[0].set(xlabel="step", ylabel="training loss per image", title="loss")
    if with_pi:
        ax[1].plot(steps, [h["mean_pi"] for h in history], marker="o", color="C1")
        ax[1].set(xlabel="step", ylabel="mean π over tags", title="tagging likelihood π")
    fig.tight_layout()
    path = storage.join(out, "training.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path



def plot_epochs(history: list[dict], out: str, title: str) -> str | None:
    """Training loss and validation mAP against epoch (PNG in the model directory)."""
    if storage.is_remote(out) or not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    ax[0].plot(epochs, [h["loss"] for h in history], marker="o")
    ax[0].set(xlabel="epoch", ylabel="training loss", title=title)
    ax[1].plot(epochs, [h.get("val_map", float("nan")) for h in history], marker="o", color="C1")
    ax[1].set(xlabel="epoch", ylabel="validation mAP per label", title="validation")
    fig.tight_layout()
    path = storage.join(out, "training.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
