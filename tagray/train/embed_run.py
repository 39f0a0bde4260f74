"""`tagray train --head embed`: starts the embedding shard server, runs the Ray Train loop,
snaps out-of-vocabulary words, writes the model directory.

The shard actors belong to this driver and end with it; a re-run of the same command finds
the Ray run's last checkpoint and restores both h and the word vectors from it.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow.compute as pc
import torch

from tagray.config import to_dict
from tagray.data import storage
from tagray.data.normalize import TagNormalizer
from tagray.data.word_vectors import word_table_init
from tagray.eval.training_plot import plot_epochs, plot_history
from tagray.features import store
from tagray.features.open_clip_backbone import pretrained_vectors
from tagray.heads.embed_artifact import SavedEmbedHead, save_embed_head
from tagray.heads.embedding import EmbedConfig, TagMLP
from tagray.heads.fit import align
from tagray.heads.oov import snap_oov
from tagray.heads.recipes.embed import build_embed
from tagray.heads.split_arrays import split_arrays, truth_of
from tagray.heads.standardize import MOMENT_IMAGES, feature_moments
from tagray.heads.user_tags import fit_on_split
from tagray.train.driver import fit_on_ray
from tagray.train.run import TrainingInputs, train_data, training_inputs
from tagray.train.run_config import TrainRunConfig, run_name
from tagray.train.shards import ShardedWordTable, read_snapshot

log = logging.getLogger(__name__)

RUN_NAME = "embed"


def train_embed(
    manifest_uri: str,
    features_uri: str,
    out: str,
    cfg: EmbedConfig,
    run: TrainRunConfig,
    normalizer: TagNormalizer,
    endpoint_url: str | None = None,
    inputs: TrainingInputs | None = None,
) -> dict:
    """Trains the word-embedding head on the train split's tagged images; returns the metrics
    also saved in `out`. `inputs`: what `training_inputs(…, tagged_only=True)` read, when the
    caller checked them before starting Ray."""
    import ray

    t0 = time.perf_counter()
    inputs = inputs or training_inputs(manifest_uri, features_uri, normalizer, cfg.batch_size, endpoint_url,
                                       tagged_only=True)
    vocab = inputs.vocab
    pretrained = None
    if cfg.vectors:
        pretrained = pretrained_vectors(cfg.vectors, normalizer, cfg.max_words, endpoint_url, words=vocab.tags)
        log.info("train: %d pretrained word vectors (d=%d) from %s", len(pretrained[0]), pretrained[1].shape[1], cfg.vectors)
    else:
        log.warning("train: no pretrained word vectors (set `vectors`): random initialisation, d=%d; "
                    "only training tags can be queried", cfg.word_dim)
    words, initial, from_file = word_table_init(vocab.tags, pretrained, cfg.word_dim, cfg.init_scale, cfg.seed)
    counts = np.zeros(len(words), np.int64)
    counts[: len(vocab)] = inputs.counts
    word_dim = initial.shape[1]
    print(f"[train] embed head: {inputs.n_train} tagged training images, {len(vocab)} tags, {len(words)} words "
          f"(d={word_dim}, {int(from_file.sum())} pretrained), {run.shards} shard(s), {run.workers} worker(s)", flush=True)

    val, val_info = validation_sample(inputs, features_uri, cfg, normalizer.cfg.max_tags, endpoint_url)
    name = run_name(RUN_NAME, cfg, ("epochs", "patience", "checkpoint_every", "oov_steps", "oov_lr", "oov_anchors",
                                    "calibration_images"),
                    vocab.version, store.comparable(inputs.identity), run.workers, run.shards, len(words), run.materialize)
    snapshot_root = storage.join(out, "_ray", name, "word_shards")
    moments = training_moments(inputs, features_uri, cfg, endpoint_url) if cfg.standardize else None
    train, datasets = train_data(inputs, features_uri, run, normalizer.cfg.max_tags, endpoint_url)
    table = ShardedWordTable.create(initial, run.shards, cfg.word_optimizer, cfg.word_lr, run.shard_cpus, endpoint_url)
    try:
        state = fit_on_ray("embed", cfg, {"dim": inputs.dim, "word_dim": word_dim, "counts": counts,
                                          "train_images": inputs.n_train, "train": train, "snapshot_root": snapshot_root,
                                          "endpoint_url": endpoint_url, "moments": moments,
                                          "val": ray.put(val) if val is not None else None},
                           run, out, name, endpoint_url, datasets,
                           extra={"shard_names": table.names, "words": len(words), "word_dim": word_dim})
        shard_stats = table.stats()
    finally:
        table.kill()
    recipe_state, history = state["recipe"], state["history"]
    best = recipe_state.get("best") or {}
    mlp = build_embed(cfg, inputs.dim, word_dim)
    if best.get("model") is not None and best.get("words"):  # the best epoch on validation: h and words together
        mlp.load_state_dict(best["model"])
        kept = best["words"]
        print(f"[train] best epoch {best['epoch']} of {len(history)}: validation mAP {best['map']:.4f} on "
              f"{val_info['images']} val images ({val_info['truth']})", flush=True)
    else:
        mlp.load_state_dict(recipe_state["mlp"])
        kept = recipe_state["words"]
    mlp.eval()
    trained = torch.from_numpy(read_snapshot(kept, run.shards, len(words), endpoint_url))

    unseen = counts == 0
    snap: dict = {"words": int(unseen.sum()), "steps": 0}
    if cfg.oov_steps and unseen.any() and not cfg.fixed_vectors:
        t_snap = time.perf_counter()
        vectors, snap = snap_oov(torch.from_numpy(initial), trained, unseen, cfg.oov_steps, cfg.oov_lr,
                                 cfg.oov_anchors, cfg.seed)
        snap["seconds"] = time.perf_counter() - t_snap
        print(f"[train] snapped {snap['words']} out-of-vocabulary words (eq. 4 loss {snap['loss_before']:.4f} → "
              f"{snap['loss_after']:.4f})", flush=True)
    else:
        vectors = trained
    user_tags, fit = calibration(mlp, vectors[: len(vocab)], inputs, features_uri, cfg, normalizer.cfg.max_tags,
                                 endpoint_url)
    metrics = {
        "head": "embed",
        "loss_kind": f"{'sampled ' if cfg.sampled else 'full '}{cfg.loss}{' (fixed word vectors)' if cfg.fixed_vectors else ''}",
        "train_images": inputs.n_train,
        "tags": len(vocab),
        "words": len(words),
        "pretrained_words": int(from_file.sum()),
        "vectors_source": cfg.vectors or "random",
        "workers": run.workers, "device": history[-1].get("device") if history else None,
        "shards": run.shards,
        "steps": int(recipe_state["step"]),
        "final_loss": history[-1]["loss"] if history else None,
        "validation": val_info,
        "best_epoch": best.get("epoch") if best.get("model") is not None else None,
        "best_val_map": best.get("map") if best.get("model") is not None else None,
        "early_stop": bool(history and history[-1].get("early_stop")),
        "history": history,
        "oov_snapping": snap,
        "user_tags": fit,
        "shard_server": shard_stats,
        "seconds": time.perf_counter() - t0,
        "run": to_dict(run),
        "checkpoints": storage.join(out, "_ray", name),
    }
    save_embed_head(
        SavedEmbedHead(mlp=mlp, vectors=vectors, words=words, vocab=vocab, config=cfg, backbone=inputs.identity,
                       positives=counts, pretrained=from_file, vectors_source=cfg.vectors or "random", metrics=metrics,
                       user_tags=user_tags, user_tags_fit=fit),
        out, endpoint_url,
    )
    if val is not None:
        plot_epochs(history, out, "word-embedding head")
    else:
        plot_history(history, out)
    return metrics


def validation_sample(inputs: TrainingInputs, features_uri: str, cfg: EmbedConfig, width: int,
                      endpoint_url: str | None = None) -> tuple[dict | None, dict]:
    """The loop's validation set: a seeded sample of up to `cfg.val_images` val images with
    features (the files it opens, not the store: `store.sample_features`) and their truth
    (`truth_of`: labels where the sample has them, else user tags) — (val, how) or (None, why not)."""
    if not cfg.val_images:
        return None, {"images": 0, "reason": "val_images: 0"}
    targets = inputs.targets
    part = targets.filter(pc.equal(targets.column("split"), "val"))
    features = store.sample_features(features_uri, part.column("image_id"), cfg.val_images, cfg.seed,
                                     endpoint_url=endpoint_url) if part.num_rows else None
    if features is None or not features.num_rows:
        log.warning("train: no val images with features: no validation, the last epoch is the model "
                    "(give the manifest a val split to keep the best epoch)")
        return None, {"images": 0, "reason": "no val images with features"}
    sample = split_arrays(targets, features, "val", width)
    rows, cols, truth, kind = truth_of(sample, len(inputs.vocab))
    log.info("train: validation mAP after every epoch on %d val images × %d tags (truth: %s)", len(rows), len(cols), kind)
    return ({"x": sample.x, "rows": rows, "cols": cols, "truth": truth},
            {"images": int(len(rows)), "tags": int(len(cols)), "truth": kind})



def training_moments(inputs: TrainingInputs, features_uri: str, cfg: EmbedConfig,
                     endpoint_url: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) of φ over the training images, or over a seeded sample of MOMENT_IMAGES of them
    (the files it opens, not the store: `store.sample_features`), for h's standardisation."""
    sample = store.sample_features(features_uri, inputs.train.column("image_id"), MOMENT_IMAGES, cfg.seed,
                                   endpoint_url=endpoint_url)
    x, _ = align(sample, sample.column("image_id"))
    log.info("train: φ standardised with the moments of %d training images", len(x))
    return feature_moments(x)


def calibration(mlp: TagMLP, tag_vectors: torch.Tensor, inputs: TrainingInputs, features_uri: str, cfg: EmbedConfig,
                width: int, endpoint_url: str | None = None) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, dict]:
    """Per-tag Platt scaling of the user-tag scores on up to `cfg.calibration_images` tagged val
    images (`user_tags.fit_on_split`) — ((a, b), how) or (None, why not); without it, user-tag
    probabilities are σ(s + log q(t))."""
    if not cfg.calibration_images:
        return None, {"method": None, "reason": "calibration_images: 0"}
    fitted, fit = fit_on_split(mlp, tag_vectors, inputs.targets, features_uri, "val", cfg.calibration_images, cfg.seed,
                               width, endpoint_url)
    if fitted is None:
        log.warning("train: no tagged val images with features: user-tag probabilities stay σ(s + log q(t)) of the "
                    "sampler (give the manifest a val split to calibrate them)")
    else:
        print(f"[train] user-tag calibration: per-tag Platt scaling on {fit['images']} tagged val images "
              f"({fit['tags_with_scale_0']} of {len(tag_vectors)} tags get scale 0: their base rate)", flush=True)
    return fitted, fit
