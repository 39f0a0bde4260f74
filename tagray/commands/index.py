"""`tagray index`: an exact faiss inner-product index over h(x) of every featurized image, for
search with the embedding head (seed 004; see tagray/serve/index.py)."""

from __future__ import annotations

import argparse
import time

from tagray.commands.common import add_endpoint, command
from tagray.data import schema
from tagray.features import store
from tagray.heads.embed_artifact import load_embed_head
from tagray.serve.index import build_image_index, save_image_index


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tagray index", description=__doc__)
    p.add_argument("--model", required=True, help="embed model directory (tagray train --head embed)")
    p.add_argument("--features", required=True, help="features of the images to index")
    p.add_argument("--manifest", default=None, help="manifest giving each image's uri (optional)")
    p.add_argument("--out", required=True, help="index directory (local or s3://)")
    add_endpoint(p)
    return p


@command("index")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    head = load_embed_head(args.model, endpoint_url=args.endpoint_url)
    features, identity = store.read_features(args.features, args.endpoint_url)
    schema.validate_features(features.schema, args.features)
    if head.backbone is not None and store.comparable(identity) != store.comparable(head.backbone):
        raise schema.SchemaError(f"{args.features}: features of another backbone than {args.model} was trained on")
    manifest = schema.read_manifest(args.manifest, endpoint_url=args.endpoint_url) if args.manifest else None
    index = build_image_index(head, features, manifest, args.model)
    save_image_index(index, args.out, args.endpoint_url)
    print(f"indexed {len(index.image_ids)} images (d={index.meta['dim']}) in {time.perf_counter() - t0:.1f}s")
    print(f"index → {args.out}")
    return 0
