"""`tagray featurize` on Ray Data (SPEC §2): manifest → fetch + decode on CPU tasks →
a callable-class actor pool holding the backbone → sharded Parquet.

Streaming and memory-bounded: Ray Data's backpressure keeps only a few blocks of
pixels in flight. The workers write the shards (`store.write_feature_block`: one shard
per block of `shard_rows` images, moved into place once whole, named by its image_ids);
the driver only collects their names, row counts and failed images. Failed images
travel through the pipeline as error rows and end in `errors.parquet`; a re-run into
the same directory featurises only the image_ids without features yet.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from tagray import jsonio
from tagray.config import ConfigError, to_dict
from tagray.data import schema, storage
from tagray.data.http_fetch import HttpSettings
from tagray.features import open_clip_backbone, store
from tagray.features.backbone import (
    OPEN_CLIP,
    TORCHVISION,
    BackboneIdentity,
    build_backbone,
    check_name,
    load_weights,
    preprocessing,
)
from tagray.features.decode import fetch_and_decode
from tagray.features.embed import Embedder
from tagray.resources import PoolPlan, bounded_start, plan_pool, released

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeaturizeConfig:
    backbone: str = "resnet50"  # torchvision model name (resnet18, resnet50, vit_b_16, …) or open_clip:<model>
    weights: str | None = None  # state_dict path or URI, torchvision weights name (IMAGENET1K_V2), or "random"
    seed: int = 0  # seed of random weights
    image_size: int | None = None  # square crop fed to the backbone; default the backbone's (224 for most)
    resize_size: int | None = None  # shorter side before the centre crop; default the backbone's (torchvision 256)
    batch_size: int = 64  # images per backbone call
    decode_batch_size: int = 16  # images per fetch/decode task call
    actors: int | None = None  # most backbone actors; default one per GPU, else one per CPU (starts with those that fit)
    gpu: bool | None = None  # run the backbone on GPUs; default: when the cluster has any
    actor_cpus: float | None = None  # CPUs reserved per actor; default 1 with GPUs, 0.75 without
    decode_cpus: float = 0.25  # CPUs reserved per fetch/decode task
    write_cpus: float = 0.25  # CPUs reserved per shard-writing task (and per task regrouping rows into shards)
    resources_wait_s: float | None = None  # fail when no backbone actor gets its CPUs / GPU in this time (None: 600 s)
    torch_threads: int = 1  # intra-op threads of each CPU actor
    shard_rows: int = 10_000  # images per output shard (the unit a killed run can lose; failed images count too)
    block_rows: int = 32  # manifest rows per input block: small blocks let every decode task start at once
    max_bytes: int = 50_000_000  # larger files are errors (fetch stage)
    max_pixels: int = 89_478_485  # larger images are errors (decompression bombs; PIL's default)
    max_error_fraction: float = 0.05  # the run fails when more of its images fail
    # http(s) image URLs: tagray.data.http_fetch.HttpSettings defines them (and their defaults)
    http_timeout_s: float = HttpSettings.http_timeout_s
    http_total_timeout_s: float = HttpSettings.http_total_timeout_s
    http_retries: int = HttpSettings.http_retries
    http_backoff_s: float = HttpSettings.http_backoff_s
    http_max_redirects: int = HttpSettings.http_max_redirects
    allow_hosts: tuple[str, ...] = HttpSettings.allow_hosts

    def __post_init__(self) -> None:
        from tagray.data.http_fetch import check_settings

        if self.batch_size < 1 or self.decode_batch_size < 1 or self.shard_rows < 1:
            raise ConfigError("batch_size, decode_batch_size and shard_rows must be ≥ 1")
        if not 0 <= self.max_error_fraction <= 1:
            raise ConfigError(f"max_error_fraction must be in [0, 1], got {self.max_error_fraction}")
        at_least_one = {"image_size": self.image_size, "resize_size": self.resize_size, "actors": self.actors,
                        "torch_threads": self.torch_threads, "block_rows": self.block_rows,
                        "max_bytes": self.max_bytes, "max_pixels": self.max_pixels}
        bad = [f"{k}={v}" for k, v in at_least_one.items() if v is not None and v < 1]
        if bad:
            raise ConfigError(f"{', '.join(bad)}: must be ≥ 1")
        if self.image_size is not None and self.resize_size is not None and self.resize_size < self.image_size:
            raise ConfigError(f"resize_size={self.resize_size} < image_size={self.image_size}: the crop is taken from "
                              "the image resized to resize_size, so it must be at least image_size")
        if not self.write_cpus > 0:
            raise ConfigError(f"write_cpus must be > 0, got {self.write_cpus}")
        if self.resources_wait_s is not None and not self.resources_wait_s > 0:
            raise ConfigError(f"resources_wait_s must be > 0 (or null), got {self.resources_wait_s}")
        if self.decode_cpus <= 0 or (self.actor_cpus is not None and self.actor_cpus < 0) or self.seed < 0:
            raise ConfigError(f"decode_cpus must be > 0, actor_cpus ≥ 0 and seed ≥ 0; got decode_cpus={self.decode_cpus}, "
                              f"actor_cpus={self.actor_cpus}, seed={self.seed}")
        if isinstance(self.max_bytes, bool) or not isinstance(self.max_bytes, int) or self.max_bytes < 1:
            raise ConfigError(f"max_bytes must be an integer ≥ 1, got {self.max_bytes!r}")
        check_settings(self.http_timeout_s, self.http_total_timeout_s, self.http_retries, self.http_backoff_s,
                       self.http_max_redirects, self.allow_hosts)


class TooManyErrors(RuntimeError):
    """More images failed than `max_error_fraction` allows (everything else is kept)."""


def _resources(cfg: FeaturizeConfig) -> tuple[bool, PoolPlan]:
    """GPU or not, and the backbone actors' pool: at most one per GPU (else per CPU) or
    `cfg.actors`, started with those that fit the free resources beside one decode and one
    write task (tagray.resources)."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = int(ray.cluster_resources().get("CPU", 1))
    use_gpu = gpus > 0 if cfg.gpu is None else cfg.gpu
    if use_gpu and gpus == 0:
        raise ConfigError("gpu=true but the Ray cluster has no GPUs")
    actors = cfg.actors or (gpus if use_gpu else max(1, cpus))
    actor_cpus = cfg.actor_cpus if cfg.actor_cpus is not None else (1.0 if use_gpu else 0.75)
    pool = plan_pool("featurize's backbone actors", actors, actor_cpus, 1.0 if use_gpu else 0.0,
                     beside_cpus=max(cfg.decode_cpus, cfg.write_cpus), wait_s=cfg.resources_wait_s)
    return use_gpu, pool


@dataclass(frozen=True)
class PreparedBackbone:
    """A backbone whose settings were checked before any work: weights (None: random; for
    open_clip only the image tower's) and the identity every shard records."""

    state: dict | None
    identity: dict


def prepare_backbone(cfg: FeaturizeConfig, endpoint_url: str | None = None) -> PreparedBackbone:
    """Name, crop and weights of `cfg` checked, and the model built and probed once at the crop
    size: everything a run needs from the backbone, with no Ray (the command calls this before
    Ray starts, so a bad setting is one line at once)."""
    check_name(cfg.backbone)
    pre = preprocessing(cfg.backbone, cfg.image_size, cfg.resize_size)
    state, digest, recorded = load_weights(cfg.backbone, cfg.weights, cfg.seed, endpoint_url)
    _, dim = build_backbone(cfg.backbone, state, cfg.seed, pre["image_size"])
    kind = OPEN_CLIP if open_clip_backbone.is_open_clip(cfg.backbone) else TORCHVISION
    identity = BackboneIdentity(
        cfg.backbone, recorded, digest, pre["image_size"], pre["resize_size"], tuple(pre["mean"]), tuple(pre["std"]),
        dim, kind, pre["interpolation"], pre["resize_mode"],
    ).to_dict()
    if state is not None and kind == OPEN_CLIP:
        state = open_clip_backbone.image_state(state)  # the actors need no text tower
    return PreparedBackbone(state, identity)


def records_dataset(pending: pa.Table, out: str, cfg: FeaturizeConfig, prepared: PreparedBackbone,
                    resources: tuple[bool, PoolPlan], endpoint_url: str | None = None) -> ray.data.Dataset:
    """The featurize pipeline (SPEC §2) as a Ray Dataset of bookkeeping records
    (store.RECORDS_SCHEMA): manifest rows (image_id, uri) → fetch + decode tasks → the backbone
    actors → blocks of exactly `shard_rows` images (Ray Data's strict streaming repartition;
    the last one smaller) → write tasks that write each block's featurised rows as one shard
    (store.write_feature_block) and pass on only its name, row count, failed images and when
    the block's first batch left a backbone actor (the run's start-up figure).
    Feature vectors stay in the workers and the object store; `resources` is `_resources(cfg)`."""
    import ray

    use_gpu, pool = resources
    identity = prepared.identity
    weights_ref = [ray.put(prepared.state)] if prepared.state is not None else []
    ds = manifest_rows(
        pending.select(["image_id", "uri"]), cfg.block_rows, pool.total_cpus, cfg.decode_cpus,
        then=fetch_and_decode, then_rows=cfg.decode_batch_size,
        then_kwargs={
            "image_size": identity["image_size"],
            "resize_size": identity["resize_size"],
            "max_bytes": cfg.max_bytes,
            "max_pixels": cfg.max_pixels,
            "endpoint_url": endpoint_url,
            "http": {k: getattr(cfg, k) for k in (
                "http_timeout_s", "http_total_timeout_s", "http_retries", "http_backoff_s",
                "http_max_redirects", "allow_hosts")},
        },
    ).map_batches(
        Embedder,
        fn_constructor_kwargs={
            "name": cfg.backbone,
            "weights_ref": weights_ref,
            "seed": cfg.seed,
            "torch_threads": cfg.torch_threads,
            "mean": identity["mean"],
            "std": identity["std"],
        },
        batch_size=cfg.batch_size,
        num_cpus=pool.cpus,
        num_gpus=pool.gpus,
        compute=pool.strategy(),
    )
    return in_blocks_of(ds, cfg.shard_rows, cfg.write_cpus).map_batches(
        store.write_feature_block,
        fn_kwargs={"out": out, "dim": identity["dim"], "identity": identity, "endpoint_url": endpoint_url},
        batch_size=None,  # one block, one shard
        batch_format="numpy",
        num_cpus=cfg.write_cpus,
    )


def manifest_rows(pending: pa.Table, block_rows: int, cluster_cpus: float, cpus: float,
                  then: Callable[..., Any] | None = None, then_rows: int = 1,
                  then_kwargs: dict | None = None) -> ray.data.Dataset:
    """The pending (image_id, uri) rows as a Dataset, `block_rows` at a time, with no task per
    block — or, given `then`, `then(rows, **then_kwargs)` of every `then_rows` of them (the
    fetch + decode stage) — in tasks reserving `cpus`. The table goes to the object store once,
    and a dataset of start rows (built in the driver: `from_items`) is expanded by tasks that
    each take one block of starts. `from_arrow` of one table per block ran a 1-CPU metadata task
    per block: 100 s before the first image at 1M images on 2 CPUs
    (benchmarks/featurize_start.py), and never beside a Serve app holding all but half a CPU.
    The starts are cut into enough blocks for every task the cluster can run at once to have
    work, four times over. `then` runs inside the expanding task rather than as a map fused
    after it: Ray Data bundles a fused map's input by the later map's batch size counted in
    start rows, so decode_batch_size 16 gave every decode task 16 starts of 32 images, and a run
    of 160 images was one decode task and one block, embedded by one actor while the other
    waited (BENCHMARKS.md, *Feature extraction*: small runs)."""
    import ray

    ref = ray.put(pending)
    starts = [{"start": s} for s in range(0, pending.num_rows, block_rows)]
    blocks = max(1, min(len(starts), 4 * math.ceil(max(cluster_cpus, 1.0) / cpus)))
    step = then_rows if then is not None else block_rows
    return ray.data.from_items(starts, override_num_blocks=blocks).map_batches(
        _rows_from, fn_kwargs={"table": [ref], "rows": block_rows, "step": step, "then": then,
                               "then_kwargs": then_kwargs or {}},
        batch_size=1, batch_format="pyarrow", num_cpus=cpus)


def _rows_from(batch: pa.Table, table: list, rows: int, step: int, then: Callable[..., Any] | None,
               then_kwargs: dict) -> Iterator[Any]:
    """The `rows` manifest rows from each start row of `batch` (table: [the pending rows' ref]),
    `step` rows at a time, each passed through `then` when given."""
    import ray

    pending = ray.get(table[0])
    for s in batch.column("start").to_pylist():
        for at in range(s, min(s + rows, pending.num_rows), step):
            part = pending.slice(at, min(step, s + rows - at))
            yield part if then is None else then(part, **then_kwargs)


def in_blocks_of(ds: ray.data.Dataset, rows: int, cpus: float) -> ray.data.Dataset:
    """`ds` in blocks of exactly `rows` rows, the last one smaller: Ray Data's strict streaming
    repartition, its tasks reserving `cpus` CPUs instead of the 1 CPU Ray Data gives a map task
    that names none (`Dataset.repartition` takes no ray_remote_args). The stage only regroups
    blocks; at 1 CPU it did not fit beside the backbone actors: on 2 CPUs with the default 2
    actors of 0.75, no shard was written before the last image was embedded (every feature
    held in the object store, a killed run losing all of them), and beside a Serve app it
    never ran."""
    out = ds.repartition(target_num_rows_per_block=rows, strict=True)
    op = getattr(getattr(out, "_logical_plan", None), "dag", None)  # Ray Data 2.60's logical plan (private)
    if isinstance(getattr(op, "ray_remote_args", None), dict):
        op.ray_remote_args.setdefault("num_cpus", cpus)
    else:
        log.warning("this Ray Data's repartition stage could not be given %g CPU: its tasks reserve 1 CPU", cpus)
    return out


def featurize(manifest_uri: str, out: str, cfg: FeaturizeConfig, endpoint_url: str | None = None,
              prepared: PreparedBackbone | None = None) -> dict:
    """Featurises every image of the manifest not yet in `out` (earlier failures are tried
    again); returns the run's summary, also written to `out`/summary.json. Raises
    TooManyErrors when the manifest's failed share exceeds max_error_fraction. `prepared`:
    `prepare_backbone(cfg)` when the caller already did it."""
    t_start = time.perf_counter()
    manifest = schema.read_manifest(manifest_uri, endpoint_url=endpoint_url).select(["image_id", "uri"])
    prepared = prepared or prepare_backbone(cfg, endpoint_url)
    identity = prepared.identity
    existing = store.features_identity(out, endpoint_url)
    if existing is not None and store.comparable(existing) != store.comparable(identity):
        raise schema.SchemaError(
            f"{storage.redact(out)} already holds features of another backbone ({store.describe_identity(existing)}); "
            f"this run is {store.describe_identity(identity)}, size {identity['image_size']}: write to another --out")
    done = store.featurized_ids(out, endpoint_url)
    pending = manifest.filter(pc.invert(pc.is_in(manifest.column("image_id"), value_set=done)))
    summary: dict = {
        "manifest": storage.redact(manifest_uri),
        "out": storage.redact(out),
        "backbone": identity,
        "config": to_dict(cfg),
        "images_in_manifest": manifest.num_rows,
        "already_done": manifest.num_rows - pending.num_rows,
        "processed": pending.num_rows,
    }
    old_errors = store.read_errors(out, endpoint_url)
    storage.makedirs(out, endpoint_url)
    summary["temporaries_removed"] = store.remove_temporaries(out, endpoint_url)  # a killed run's, never read
    errors: list[dict] = []
    shards: dict[str, int] = {}
    if pending.num_rows:
        use_gpu, pool = _resources(cfg)
        summary["resources"] = {"gpu": use_gpu, **pool.as_dict(), "decode_cpus": cfg.decode_cpus,
                                "write_cpus": cfg.write_cpus}
        log.info("featurize: %d images (%d already done) with %d–%d %s actor(s) of %s",
                 pending.num_rows, summary["already_done"], pool.first, pool.most, "GPU" if use_gpu else "CPU",
                 cfg.backbone)
        ds = records_dataset(pending, out, cfg, prepared, (use_gpu, pool), endpoint_url)
        t0, t0_wall = time.perf_counter(), time.time()
        first_embedded = math.inf  # wall clock: the first batch out of any backbone actor
        first_batch_rows = 0  # the images of that batch (its stamp can be on more than one block)
        record_bytes = 0
        # The driver sees bookkeeping only (store.RECORDS_SCHEMA): the workers wrote the shards.
        failure = None
        try:
            with bounded_start(ds, pool):
                for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                    record_bytes += batch.nbytes
                    rows = batch.column("rows").to_pylist()
                    for name, n in zip(batch.column("shard").to_pylist(), rows, strict=True):
                        if name is not None:
                            shards[name] = n  # a name seen twice is one file written twice (a retried task)
                    failed = batch.filter(pc.is_null(batch.column("shard"))).select(store.ERRORS_SCHEMA.names)
                    errors.extend(failed.to_pylist())
                    stamps = batch.column("first_embedded_at").to_pylist()
                    for at, n in zip(stamps, batch.column("first_batch_rows").to_pylist(), strict=True):
                        if at is not None and at <= first_embedded:
                            first_batch_rows = (first_batch_rows if at == first_embedded else 0) + n
                            first_embedded = at
        except Exception as e:
            failure = e
        if failure is not None:
            raise released(failure)  # the actors' CPUs / GPUs free for a re-run in this process
        summary["pipeline_seconds"] = time.perf_counter() - t0
        summary["driver_record_bytes"] = record_bytes
        summary["images_per_second"] = pending.num_rows / summary["pipeline_seconds"]
        # Start-up: until the first batch left a backbone actor (actors placed and loading the
        # backbone, the first images fetched and decoded); the steady rate is that of the images
        # after it, over the rest of the run (none when the run was one batch). The stamp is the
        # worker's clock against the driver's: on a multi-node cluster their skew is in the figure.
        if math.isfinite(first_embedded):
            startup = min(max(first_embedded - t0_wall, 0.0), summary["pipeline_seconds"])
            summary["startup_seconds"] = startup
            after = pending.num_rows - first_batch_rows
            if after > 0 and summary["pipeline_seconds"] > startup:
                summary["steady_images_per_second"] = after / (summary["pipeline_seconds"] - startup)
    # Errors of images not retried this run are kept; those retried are replaced by this run's outcome.
    retried = pc.is_in(old_errors.column("image_id"), value_set=pending.column("image_id"))
    all_errors = pa.concat_tables([old_errors.filter(pc.invert(retried)), pa.Table.from_pylist(errors, store.ERRORS_SCHEMA)])
    summary["errors_file"] = store.write_errors(all_errors, out, endpoint_url)
    summary["featurized"] = sum(shards.values())
    summary["errors"] = len(errors)
    summary["errors_by_reason"] = dict(Counter(f"{e['stage']}: {_reason_kind(e['reason'])}" for e in errors))
    summary["shards"] = [storage.join(out, name) for name in sorted(shards)]
    # Judged over the whole manifest, so a re-run that only retries failures is not judged on them alone.
    summary["errors_total"] = all_errors.num_rows
    summary["error_fraction"] = all_errors.num_rows / manifest.num_rows
    summary["seconds"] = time.perf_counter() - t_start
    storage.write_text(storage.join(out, "summary.json"), jsonio.dumps(summary, "summary.json", indent=1, default=str), endpoint_url)
    if summary["error_fraction"] > cfg.max_error_fraction:
        raise TooManyErrors(
            f"{all_errors.num_rows} of {manifest.num_rows} images failed ({summary['error_fraction']:.1%} > "
            f"max_error_fraction {cfg.max_error_fraction:.1%}); features of the others are kept in {storage.redact(out)}, "
            f"the failures are listed in {summary['errors_file']}"
        )
    return summary


def _reason_kind(reason: str) -> str:
    """The reason without its details ('corrupt image: …' → 'corrupt image')."""
    return reason.split(":", 1)[0]

