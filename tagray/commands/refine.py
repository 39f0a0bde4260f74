"""`tagray refine`: the refined tag scores of a manifest's training images (seed 002's tag
refinement) from a model trained with `tagray train --head refine`, as Parquet:
image_id, tags (the top-k refined tags, best first), scores (their probabilities), user_tags."""

from __future__ import annotations

import argparse

from tagray.commands.common import add_endpoint, add_model_inputs, command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tagray refine", description=__doc__)
    add_model_inputs(p, "model directory of a refine head", "manifest with a split column")
    p.add_argument("--out", required=True, help="refined.parquet (local or s3://)")
    p.add_argument("--split", default="train", help="split to refine (default train: the paper's refinement)")
    p.add_argument("--top-k", type=int, default=10, help="refined tags kept per image (default 10)")
    add_endpoint(p)
    return p


@command("refine")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tagray.eval.refined import write_refined

    n = write_refined(args.model, args.manifest, args.features, args.out, args.split, args.top_k, args.endpoint_url)
    print(f"refined tags of {n} {args.split} images → {args.out}")
    return 0
