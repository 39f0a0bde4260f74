"""`tagray train` on Ray Train: builds the targets, runs the TorchTrainer, writes the model.

Checkpoints live in MODEL/_ray/<run name>; re-running the same command after a crash or
a kill resumes from the last one (Ray Train restores a run from its storage path and name).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tagray.config import to_dict
from tagray.data import schema, storage
from tagray.data.normalize import TagNormalizer, Vocabulary
from tagray.eval.training_plot import plot_history
from tagray.features import store
from tagray.heads.artifact import SavedHead, save_head
from tagray.heads.fit import HeadConfig, align
from tagray.heads.recipes.linear import build_linear
from tagray.heads.targets import build_targets, padded_ids, prepare_vocabulary
from tagray.train.data import count_with_features, training_dataset
from tagray.train.driver import fit_on_ray
from tagray.train.run_config import TrainRunConfig, run_name

log = logging.getLogger(__name__)

RUN_NAME = "train"


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


def train_arrays(inputs: TrainingInputs, features_uri: str, width: int, endpoint_url: str | None = None) -> dict:
    """The train split's features (N, D) float32 and padded tag ids (N, width), read once by the
    driver for the object store (`materialize: true`); images without features are left out."""
    features, _ = store.read_features(features_uri, endpoint_url)
    x, found = align(features, inputs.train.column("image_id"))
    return {"x": x.numpy(), "tag_ids": padded_ids(inputs.train.column("tag_ids").take(found), width)}


def train_data(inputs: TrainingInputs, features_uri: str, run: TrainRunConfig, width: int,
               endpoint_url: str | None = None) -> tuple[dict | None, dict | None]:
    """(the recipe's `train` input, Ray Train's datasets): arrays in the object store when the run
    materializes (each worker slices them zero-copy: the same batches as in-process), else a Ray
    Dataset every worker streams its shard of (corpora larger than the object store)."""
    import ray

    if run.materialize:
        return ray.put(train_arrays(inputs, features_uri, width, endpoint_url)), None
    dataset = training_dataset(features_uri, inputs.train, width, run.data_cpus, run.readers, endpoint_url)
    return None, {"train": dataset}


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
    """Trains a LR or RLR head on the train split (recipes/linear.py on Ray Train); returns the
    metrics also saved in `out`. `inputs`: what `training_inputs` read, when the caller checked
    them before starting Ray."""
    t0 = time.perf_counter()
    inputs = inputs or training_inputs(manifest_uri, features_uri, normalizer, cfg.batch_size, endpoint_url)
    vocab, identity, dim, n_train, counts = inputs.vocab, inputs.identity, inputs.dim, inputs.n_train, inputs.counts
    tag_rate = counts / max(1, inputs.train.num_rows)
    log.info("train: %s head, %d tags, %d training images with features, %d worker(s)", cfg.head, len(vocab), n_train, run.workers)
    name = run_name(RUN_NAME, cfg, ("epochs", "checkpoint_every"), vocab.version, store.comparable(identity), run.workers,
                    run.materialize)
    train, datasets = train_data(inputs, features_uri, run, normalizer.cfg.max_tags, endpoint_url)
    state = fit_on_ray(cfg.head, cfg, {"dim": dim, "tags": len(vocab), "tag_rate": tag_rate, "train_images": n_train,
                                       "train": train}, run, out, name, endpoint_url, datasets)
    model = build_linear(cfg, dim, len(vocab))
    model.load_state_dict(state["recipe"]["model"])
    history = state["history"]
    metrics = {
        "head": cfg.head,
        "train_images": n_train,
        "tags": len(vocab),
        "workers": run.workers, "device": history[-1].get("device") if history else None,
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
