"""`tagray featurize` on Ray Data (SPEC §2): manifest → fetch + decode on CPU tasks →
a callable-class actor pool holding the backbone → sharded Parquet.

Streaming and memory-bounded: Ray Data's backpressure keeps only a few blocks of
pixels in flight, and the driver writes finished shards as rows arrive. Failed images
travel through the pipeline as error rows and end in `errors.parquet`; a re-run into
the same directory featurises only the image_ids without features yet.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tagray.config import ConfigError, to_dict
from tagray.data import schema, storage
from tagray.features import store
from tagray.features.backbone import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RANDOM,
    BackboneIdentity,
    build_backbone,
    read_weights,
)
from tagray.features.decode import fetch_and_decode
from tagray.features.embed import Embedder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeaturizeConfig:
    backbone: str = "resnet50"  # torchvision model name (resnet18, resnet50, vit_b_16, …)
    weights: str | None = None  # state_dict path or s3:// URI; "random" for seeded random weights
    seed: int = 0  # seed of random weights
    image_size: int = 224  # square crop fed to the backbone
    resize_size: int = 256  # shorter side before the centre crop
    batch_size: int = 64  # images per backbone call
    decode_batch_size: int = 16  # images per fetch/decode task call
    actors: int | None = None  # backbone actors; default one per GPU, else one per CPU
    gpu: bool | None = None  # run the backbone on GPUs; default: when the cluster has any
    actor_cpus: float | None = None  # CPUs reserved per actor; default 1 with GPUs, 0.75 without
    decode_cpus: float = 0.25  # CPUs reserved per fetch/decode task
    torch_threads: int = 1  # intra-op threads of each CPU actor
    shard_rows: int = 10_000  # rows per output shard (the unit a killed run can lose)
    block_rows: int = 32  # manifest rows per input block: small blocks let every decode task start at once
    max_bytes: int = 50_000_000  # larger files are errors (fetch stage)
    max_pixels: int = 89_478_485  # larger images are errors (decompression bombs; PIL's default)
    max_error_fraction: float = 0.05  # the run fails when more of its images fail

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.decode_batch_size < 1 or self.shard_rows < 1:
            raise ConfigError("batch_size, decode_batch_size and shard_rows must be ≥ 1")
        if not 0 <= self.max_error_fraction <= 1:
            raise ConfigError(f"max_error_fraction must be in [0, 1], got {self.max_error_fraction}")


class TooManyErrors(RuntimeError):
    """More images failed than `max_error_fraction` allows (everything else is kept)."""


def _resources(cfg: FeaturizeConfig) -> tuple[bool, int, float]:
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    use_gpu = gpus > 0 if cfg.gpu is None else cfg.gpu
    if use_gpu and gpus == 0:
        raise ConfigError("gpu=true but the Ray cluster has no GPUs")
    actors = cfg.actors or (gpus if use_gpu else max(1, cpus))
    actor_cpus = cfg.actor_cpus if cfg.actor_cpus is not None else (1.0 if use_gpu else 0.75)
    return use_gpu, actors, actor_cpus


def _load_weights(cfg: FeaturizeConfig, endpoint_url: str | None) -> tuple[dict | None, str]:
    if cfg.weights is None:
        raise ConfigError(
            "no backbone weights given: pass --weights PATH or s3://… (a state_dict), "
            "or --weights random to use randomly initialised weights on purpose"
        )
    if cfg.weights == RANDOM:
        log.warning(
            "!!! featurize is using RANDOMLY INITIALISED %s weights (seed %d), as asked. "
            "Features will carry little meaning for real photos; this is recorded in the features' metadata.",
            cfg.backbone,
            cfg.seed,
        )
        return None, f"random-seed-{cfg.seed}"
    return read_weights(cfg.weights, endpoint_url)


def featurize(manifest_uri: str, out: str, cfg: FeaturizeConfig, endpoint_url: str | None = None) -> dict:
    """Featurises every image of the manifest not yet in `out` (earlier failures are tried
    again); returns the run's summary, also written to `out`/summary.json. Raises
    TooManyErrors when the manifest's failed share exceeds max_error_fraction."""
    import ray

    t_start = time.perf_counter()
    manifest = schema.read_manifest(manifest_uri, endpoint_url=endpoint_url).select(["image_id", "uri"])
    state, digest = _load_weights(cfg, endpoint_url)
    _, dim = build_backbone(cfg.backbone, state, cfg.seed)
    identity = BackboneIdentity(
        cfg.backbone, cfg.weights or "", digest, cfg.image_size, cfg.resize_size, IMAGENET_MEAN, IMAGENET_STD, dim
    ).to_dict()
    existing = store.features_identity(out, endpoint_url)
    if existing is not None and store.comparable(existing) != store.comparable(identity):
        raise schema.SchemaError(
            f"{out} already holds features of another backbone ({existing['name']}, weights {existing['weights_digest']}, "
            f"size {existing['image_size']}); this run is {identity['name']}, weights {digest}, size {cfg.image_size}: "
            "write to another --out"
        )
    done = store.featurized_ids(out, endpoint_url)
    pending = manifest.filter(pc.invert(pc.is_in(manifest.column("image_id"), value_set=done)))
    summary: dict = {
        "manifest": manifest_uri,
        "out": out,
        "backbone": identity,
        "config": to_dict(cfg),
        "images_in_manifest": manifest.num_rows,
        "already_done": manifest.num_rows - pending.num_rows,
        "processed": pending.num_rows,
    }
    old_errors = store.read_errors(out, endpoint_url)
    writer = store.ShardWriter(out, dim, identity, cfg.shard_rows, endpoint_url)
    errors: list[dict] = []
    if pending.num_rows:
        use_gpu, actors, actor_cpus = _resources(cfg)
        summary["resources"] = {"gpu": use_gpu, "actors": actors, "actor_cpus": actor_cpus, "decode_cpus": cfg.decode_cpus}
        log.info("featurize: %d images (%d already done) with %d %s actor(s) of %s",
                 pending.num_rows, summary["already_done"], actors, "GPU" if use_gpu else "CPU", cfg.backbone)
        weights_ref = [ray.put(state)] if state is not None else []
        blocks = [pending.slice(i, cfg.block_rows) for i in range(0, pending.num_rows, cfg.block_rows)]
        ds = ray.data.from_arrow(blocks).map_batches(
            fetch_and_decode,
            fn_kwargs={
                "image_size": cfg.image_size,
                "resize_size": cfg.resize_size,
                "max_bytes": cfg.max_bytes,
                "max_pixels": cfg.max_pixels,
                "endpoint_url": endpoint_url,
            },
            batch_size=cfg.decode_batch_size,
            batch_format="pyarrow",
            num_cpus=cfg.decode_cpus,
        ).map_batches(
            Embedder,
            fn_constructor_kwargs={
                "name": cfg.backbone,
                "weights_ref": weights_ref,
                "seed": cfg.seed,
                "torch_threads": cfg.torch_threads,
                "mean": IMAGENET_MEAN,
                "std": IMAGENET_STD,
            },
            batch_size=cfg.batch_size,
            num_cpus=actor_cpus,
            num_gpus=1 if use_gpu else 0,
            compute=ray.data.ActorPoolStrategy(size=actors),
        )
        t0 = time.perf_counter()
        first_rows = 0
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            if not first_rows:  # start-up: actors loading the backbone, the first blocks decoding
                first_rows = len(batch["reason"])
                summary["startup_seconds"] = time.perf_counter() - t0
            ok = batch["reason"] == ""
            writer.add(batch["image_id"][ok], batch["feature"][ok])
            for i in np.nonzero(~ok)[0]:
                errors.append({k: str(batch[k][i]) for k in ("image_id", "uri", "stage", "reason")})
        writer.close()
        summary["pipeline_seconds"] = time.perf_counter() - t0
        summary["images_per_second"] = pending.num_rows / summary["pipeline_seconds"]
        steady = summary["pipeline_seconds"] - summary["startup_seconds"]
        if pending.num_rows > first_rows and steady > 0:
            summary["steady_images_per_second"] = (pending.num_rows - first_rows) / steady
    # Errors of images not retried this run are kept; those retried are replaced by this run's outcome.
    retried = pc.is_in(old_errors.column("image_id"), value_set=pending.column("image_id"))
    all_errors = pa.concat_tables([old_errors.filter(pc.invert(retried)), pa.Table.from_pylist(errors, store.ERRORS_SCHEMA)])
    summary["errors_file"] = store.write_errors(all_errors, out, endpoint_url)
    summary["featurized"] = writer.rows
    summary["errors"] = len(errors)
    summary["errors_by_reason"] = dict(Counter(f"{e['stage']}: {_reason_kind(e['reason'])}" for e in errors))
    summary["shards"] = writer.shards
    # Judged over the whole manifest, so a re-run that only retries failures is not judged on them alone.
    summary["errors_total"] = all_errors.num_rows
    summary["error_fraction"] = all_errors.num_rows / manifest.num_rows
    summary["seconds"] = time.perf_counter() - t_start
    storage.write_text(storage.join(out, "summary.json"), json.dumps(summary, indent=1, default=str), endpoint_url)
    if summary["error_fraction"] > cfg.max_error_fraction:
        raise TooManyErrors(
            f"{all_errors.num_rows} of {manifest.num_rows} images failed ({summary['error_fraction']:.1%} > "
            f"max_error_fraction {cfg.max_error_fraction:.1%}); features of the others are kept in {out}, "
            f"the failures are listed in {summary['errors_file']}"
        )
    return summary


def _reason_kind(reason: str) -> str:
    """The reason without its details ('corrupt image: …' → 'corrupt image')."""
    return reason.split(":", 1)[0]

