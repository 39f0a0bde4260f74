"""`tagray index`: the sharded search index of a model over every featurized image, built on
Ray Data (tagray/index/): for a linear or refine head, every image's calibrated log P(z=1|x) per
tag (multi-tag AND queries rank by their product, seed 001 §5.3) plus, optionally, the
normalised features for search by example; for the embedding head, a faiss index over h(x)
(seed 004). `--append` adds the images not yet indexed as new shards, `--delete` tombstones
image_ids, `--compact` rewrites the shards without them; each bumps the index's version."""

from __future__ import annotations

import argparse

from tagray import jsonio
from tagray.commands.common import add_endpoint, command
from tagray.config import ConfigError
from tagray.index.build import IndexBuildConfig, build_index, compact, delete, parse_ids, plan


def build_parser() -> argparse.ArgumentParser:
    d = IndexBuildConfig()
    p = argparse.ArgumentParser(prog="tagray index", description=__doc__)
    p.add_argument("--model", default=None, help="model directory (lr/rlr, calibrated or not, refine, or embed); "
                                                 "needed to build or append")
    p.add_argument("--features", default=None, help="features of the images to index (needed to build or append)")
    p.add_argument("--manifest", default=None, help="manifest giving each image's uri and the filter columns")
    p.add_argument("--out", required=True, help="index directory (local or s3://)")
    p.add_argument("--shards", type=int, default=d.shards, help=f"index shards this build writes (default {d.shards})")
    p.add_argument("--columns", default=None,
                   help="comma-separated manifest columns kept for filters (default: user_id, date_taken where present)")
    p.add_argument("--factory", default=d.factory,
                   help="faiss index_factory string of the vector store: flat (exact, default), 'IVF1024,PQ16', 'HNSW32'")
    p.add_argument("--train-sample", type=int, default=d.train_sample,
                   help=f"rows an IVF/PQ factory is trained on (seeded sample; default {d.train_sample})")
    p.add_argument("--nprobe", type=int, default=d.nprobe,
                   help=f"IVF lists a query searches (kept in the index; recall against speed, default {d.nprobe})")
    p.add_argument("--ef-search", type=int, default=d.ef_search, help=f"HNSW efSearch (default {d.ef_search})")
    p.add_argument("--similar", action=argparse.BooleanOptionalAction, default=d.similar,
                   help="linear heads: keep the normalised features for search by example (D×4 bytes per image with flat)")
    p.add_argument("--gpu", action="store_true", help="faiss on a GPU when faiss has GPU support (else CPU)")
    p.add_argument("--append", action="store_true", help="add the images not yet in the index as new shards")
    p.add_argument("--delete", default=None, metavar="IDS", help="tombstone these image_ids (a file, one per line, or a comma list)")
    p.add_argument("--compact", action="store_true", help="rewrite the shards without tombstoned rows")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per forward pass in a worker")
    p.add_argument("--worker-cpus", type=float, default=d.worker_cpus, help="CPUs per builder actor")
    p.add_argument("--workers", type=int, default=d.workers, help="builder actors at most (default: K)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the training sample")
    p.add_argument("--ray-address", default=None, help="Ray cluster (default: RAY_ADDRESS or a local one)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_endpoint(p)
    return p


def config_of(args: argparse.Namespace) -> IndexBuildConfig:
    columns = None if args.columns is None else tuple(c.strip() for c in args.columns.split(",") if c.strip())
    return IndexBuildConfig(shards=args.shards, columns=columns, factory=args.factory, train_sample=args.train_sample,
                            similar=args.similar, gpu=args.gpu, batch_size=args.batch_size, worker_cpus=args.worker_cpus,
                            workers=args.workers, seed=args.seed, nprobe=args.nprobe, ef_search=args.ef_search)


@command("index")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_of(args)
    building = args.features is not None or args.append
    if not building and args.delete is None and not args.compact:
        raise ConfigError("give --features (build or --append), --delete IDS or --compact")
    if building and (args.model is None or args.features is None):
        raise ConfigError("building or appending needs --model and --features")
    summaries = []
    head = None
    if building:
        from tagray.heads.models import load_image_tagger

        head = load_image_tagger(args.model, args.endpoint_url)
        plan(head, args.model, args.features, args.out, args.manifest, cfg, args.endpoint_url, args.append)  # before Ray
    ids = parse_ids(args.delete, args.endpoint_url) if args.delete is not None else None
    started = _ray(args) if building or args.compact else False
    try:
        if building:
            summaries.append(build_index(head, args.model, args.features, args.out, args.manifest, cfg,
                                         args.endpoint_url, append=args.append))
        if ids is not None:
            summaries.append(delete(args.out, ids, args.endpoint_url))
        if args.compact:
            summaries.append(compact(args.out, cfg, args.endpoint_url))
    finally:
        if started:
            import ray

            ray.shutdown()
    for s in summaries:
        if args.json:
            continue
        print(_line(s))
    if args.json:
        print(jsonio.dumps(summaries, "index summary", indent=1))
    else:
        print(f"index → {args.out}")
    return 0


def _ray(args: argparse.Namespace) -> bool:
    """Joins or starts Ray; True when this command started it (and so shuts it down)."""
    import ray

    from tagray.runtime import init_ray

    if ray.is_initialized():
        return False
    init_ray(args.ray_address)
    return True


def _line(s: dict) -> str:
    if s["what"] == "delete":
        return (f"version {s['version']}: {s['deleted']} image(s) tombstoned ({s['not_in_index']} not in the index; "
                f"{s['tombstones']} tombstone(s) in all)")
    if s.get("unchanged"):
        return f"version {s['version']}: nothing to {s['what']}"
    rate = f", {s['rows_per_s']:.0f} rows/s" if s.get("rows_per_s") else ""
    return (f"version {s['version']}: {s['what']} of {s['rows']} images into {len(s['new_shards'])} shard(s) in "
            f"{s['seconds']:.1f}s{rate}; the index holds {s['images']} images in {s['shards']} shard(s) ({s['kind']})")
