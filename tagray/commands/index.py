"""`tagray index`: the search index of a model over every featurized image (tagray/serve/index.py):
for a linear head, every image's calibrated log P(z=1|x) per tag (multi-tag AND queries,
seed 001 §5.3); for the embedding head, an exact faiss inner-product index over h(x)
(open-vocabulary queries, seed 004)."""

from __future__ import annotations

import argparse
import time

from tagray.commands.common import add_endpoint, command
from tagray.data import schema
from tagray.features import store
from tagray.heads.embed_artifact import SavedEmbedHead
from tagray.heads.models import load_image_tagger
from tagray.serve.index import (
    build_image_index,
    build_prediction_index,
    save_image_index,
    save_prediction_index,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tagray index", description=__doc__)
    p.add_argument("--model", required=True, help="model directory (lr/rlr, calibrated or not, or embed)")
    p.add_argument("--features", required=True, help="features of the images to index")
    p.add_argument("--manifest", default=None, help="manifest giving each image's uri (optional)")
    p.add_argument("--out", required=True, help="index directory (local or s3://)")
    add_endpoint(p)
    return p


@command("index")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    head = load_image_tagger(args.model, args.endpoint_url)
    features, identity = store.read_features(args.features, args.endpoint_url)
    schema.validate_features(features.schema, args.features)
    store.require_same(identity, head.backbone, args.features, args.model)
    manifest = schema.read_manifest(args.manifest, endpoint_url=args.endpoint_url) if args.manifest else None
    if isinstance(head, SavedEmbedHead):
        index = build_image_index(head, features, manifest, args.model)
        save_image_index(index, args.out, args.endpoint_url)
        what = f"image embeddings, d={index.meta['dim']}"
    else:
        index = build_prediction_index(head, features, manifest, args.model)
        save_prediction_index(index, args.out, args.endpoint_url)
        what = f"P(z=1|x) of {index.meta['tags']} tags"
    print(f"indexed {len(index.image_ids)} images ({what}) in {time.perf_counter() - t0:.1f}s")
    print(f"index → {args.out}")
    return 0
