"""`tagray train`: a LR or robust-LR tagging head (seed 001 §4), the word-embedding head
(seed 004, word vectors in an embedding shard server), the metadata-neighbourhood model
(seed 003) or the weakly-supervised refinement network (seed 002) on Ray Train,
data-parallel, checkpointed, resumable; writes a model directory (see README: model directory)."""

from __future__ import annotations

import argparse
import dataclasses

from tagray.commands.common import add_endpoint, add_overrides, command
from tagray.config import ConfigError, from_dict, load_yaml, parse_overrides
from tagray.data.normalize import NormalizerConfig, TagNormalizer
from tagray.heads.embedding import EmbedConfig
from tagray.train.run import train_head
from tagray.train.run_config import TrainRunConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tagray train", description=__doc__)
    p.add_argument("--head", choices=("lr", "rlr", "embed", "neighbors", "refine"), default=None,
                   help="lr, rlr, embed, neighbors or refine (default: the config's, else rlr)")
    p.add_argument("--manifest", required=True, help="manifest with a split column (Parquet, local or s3://)")
    p.add_argument("--features", required=True, help="features file or shard directory (from featurize or synth)")
    p.add_argument("--out", required=True, help="model directory; re-running resumes from its last checkpoint")
    p.add_argument("--config", default=None,
                   help="YAML of HeadConfig (or EmbedConfig) and TrainRunConfig fields (e.g. configs/rlr.yaml, configs/embed.yaml)")
    p.add_argument("--vectors", default=None,
                   help="embed head: pretrained word vectors (GloVe/word2vec text), path or s3://; or "
                        "open_clip:<model>@WEIGHTS (CLIP's text tower encodes 'a photo of {word}.'; @random for tests)")
    p.add_argument("--metadata", choices=("tags", "sets", "groups"), default=None,
                   help="neighbors head: the metadata whose Jaccard distance picks neighbours (default tags)")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (default 1)")
    p.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker")
    p.add_argument("--ray-address", default=None, help="Ray cluster (default: RAY_ADDRESS or a local one)")
    add_endpoint(p)
    add_overrides(p, "HeadConfig or EmbedConfig / TrainRunConfig")
    return p


def head_config_class(head: str | None) -> type:
    """The head's config dataclass (rlr's when no head is named); an unknown head is a ConfigError."""
    from tagray.heads.recipes import HEADS, config_class

    if head is not None and head not in HEADS:
        raise ConfigError(f"unknown head {head!r}: tagray train trains one of {', '.join(HEADS)}")
    return config_class(head or "rlr")


def split_settings(data: dict, source: str) -> tuple[object, TrainRunConfig]:
    """One flat dict of settings → the head's config (by `head`) and the Ray run's config."""
    head_cls = head_config_class(data.get("head"))
    run_keys = {f.name for f in dataclasses.fields(TrainRunConfig)}
    head_keys = {f.name for f in dataclasses.fields(head_cls)}
    unknown = sorted(set(data) - run_keys - head_keys)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)} for the {data.get('head', 'rlr')} head; "
                          f"expected some of: {', '.join(sorted(run_keys | head_keys))}")
    head = from_dict(head_cls, {k: v for k, v in data.items() if k in head_keys}, source)
    run = from_dict(TrainRunConfig, {k: v for k, v in data.items() if k in run_keys}, source)
    per_step = head.batch_size // head.m if head.head == "refine" else head.batch_size
    if per_step % run.workers:
        what = f"batch_size / m = {per_step}" if head.head == "refine" else f"batch_size={head.batch_size}"
        raise ConfigError(f"{source}: {what} does not split over {run.workers} workers (each step's global batch "
                          f"is the configured one): choose a multiple of {run.workers}")
    return head, run


def load_settings(config: str | None, overrides: dict) -> tuple[object, TrainRunConfig]:
    data = load_yaml(config) if config else {}
    data.update(overrides)
    return split_settings(data, f"{config or 'defaults'}{' + command-line overrides' if overrides else ''}")


def check_inputs(head, args, normalizer: TagNormalizer):
    """Reads and checks the manifest (its vocabulary: "empty vocabulary" when no tag reaches
    min_images), the features and the batch size, without Ray: errors come before Ray starts.
    Returns what the head's trainer takes as its pre-read inputs."""
    if head.head == "neighbors":
        from tagray.train.neighbors_run import neighbors_data

        return neighbors_data(args.manifest, args.features, head, normalizer, args.endpoint_url)
    if head.head == "refine":
        from tagray.train.refine_run import refine_data

        return refine_data(args.manifest, args.features, head, normalizer, args.endpoint_url)
    from tagray.train.run import training_inputs

    return training_inputs(args.manifest, args.features, normalizer, head.batch_size, args.endpoint_url,
                           tagged_only=isinstance(head, EmbedConfig))


@command("train")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = parse_overrides(args.overrides)
    for flag in ("head", "workers", "gpu", "vectors", "metadata"):
        if getattr(args, flag) is not None:
            overrides[flag] = getattr(args, flag)
    head, run = load_settings(args.config, overrides)
    if isinstance(head, EmbedConfig) and head.vectors:
        from tagray.features.open_clip_backbone import check_vectors_source

        check_vectors_source(head.vectors)  # open_clip:<model>@WEIGHTS checked before Ray starts
    from tagray.config import load_config

    normalizer = TagNormalizer(load_config(NormalizerConfig, head.normalizer))
    inputs = check_inputs(head, args, normalizer)
    from tagray.resources import require_resources
    from tagray.runtime import init_ray

    init_ray(args.ray_address)
    require_resources(*run.request(head.head), f"training ({run.workers} worker(s) × {run.worker_cpus:g} CPU"
                      f"{', 1 GPU' if run.gpu else ''})", run.resources_wait_s)
    if head.head in ("neighbors", "refine"):
        from tagray.train.neighbors_run import train_neighbors
        from tagray.train.refine_run import train_refine

        train = train_neighbors if head.head == "neighbors" else train_refine
        metrics = train(args.manifest, args.features, args.out, head, run, normalizer, args.endpoint_url, data=inputs)
        print(f"trained {head.head} on {metrics['train_images']} images × {metrics['tags']} tags in {metrics['seconds']:.1f}s "
              f"({run.workers} worker(s)); best validation mAP {metrics['best_val_map']:.4f} at epoch {metrics['best_epoch']}")
    elif isinstance(head, EmbedConfig):
        from tagray.train.embed_run import train_embed

        metrics = train_embed(args.manifest, args.features, args.out, head, run, normalizer, args.endpoint_url, inputs)
        print(f"trained embed ({metrics['loss_kind']}) on {metrics['train_images']} images × {metrics['words']} words "
              f"in {metrics['seconds']:.1f}s ({metrics['steps']} steps, {run.workers} worker(s), {run.shards} shard(s)); "
              f"final loss {metrics['final_loss']:.4f}")
    else:
        metrics = train_head(args.manifest, args.features, args.out, head, run, normalizer, args.endpoint_url, inputs)
        print(f"trained {metrics['head']} on {metrics['train_images']} images × {metrics['tags']} tags "
              f"in {metrics['seconds']:.1f}s ({metrics['steps']} steps, {run.workers} worker(s)); "
              f"final loss {metrics['final_loss']:.4f}, mean π {metrics['mean_pi']:.3f}")
    print(f"model → {args.out}")
    return 0
