"""`tagray featurize`: images of a manifest → backbone features (sharded Parquet) on Ray Data,
with an error table and resume."""

from __future__ import annotations

import argparse
import logging
import sys

from tagray import jsonio
from tagray.commands.common import add_endpoint, add_overrides, command
from tagray.config import load_config, parse_overrides
from tagray.data import storage
from tagray.features.pipeline import FeaturizeConfig, TooManyErrors, featurize, prepare_backbone

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tagray featurize", description=__doc__)
    p.add_argument("--manifest", required=True, help="manifest (Parquet, local or s3://)")
    p.add_argument("--out", required=True, help="features directory (local or s3://); re-running resumes")
    p.add_argument("--config", default=None, help="YAML of FeaturizeConfig fields (e.g. configs/featurize.yaml)")
    p.add_argument("--backbone", default=None,
                   help="torchvision model name (default resnet50), or open_clip:<model> (open_clip:ViT-B-32: CLIP's image tower)")
    p.add_argument("--weights", default=None,
                   help="state_dict path or s3:// URI, a torchvision weights name (IMAGENET1K_V2, DEFAULT: from "
                        "$TORCH_HOME's cache, downloaded when missing), or 'random' (explicitly)")
    p.add_argument("--batch-size", type=int, default=None, help="images per backbone call")
    p.add_argument("--actors", type=int, default=None, help="backbone actors (default: one per GPU, else per CPU)")
    p.add_argument("--ray-address", default=None, help="Ray cluster (default: RAY_ADDRESS or a local one)")
    add_endpoint(p)
    add_overrides(p, "FeaturizeConfig")
    return p


def summary_line(s: dict) -> str:
    line = (
        f"featurized {s['featurized']} images ({s['already_done']} already done, {s['errors']} errors"
        + (f": {s['errors_by_reason']}" if s["errors"] else "")
        + ")"
    )
    if "images_per_second" in s:
        line += f" at {s['images_per_second']:.1f} images/s"
    return line


@command("featurize")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = parse_overrides(args.overrides)
    for flag, key in (("backbone", "backbone"), ("weights", "weights"), ("batch_size", "batch_size"), ("actors", "actors")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    cfg = load_config(FeaturizeConfig, args.config, overrides)
    # Backbone name, crop, weights checked (and the model probed) before Ray starts: a bad setting is one line, at once.
    prepared = prepare_backbone(cfg, args.endpoint_url)
    if not storage.exists(args.manifest, args.endpoint_url):
        raise FileNotFoundError(f"--manifest {args.manifest}: no such file")
    from tagray.runtime import init_ray

    init_ray(args.ray_address)
    try:
        summary = featurize(args.manifest, args.out, cfg, endpoint_url=args.endpoint_url, prepared=prepared)
    except TooManyErrors as e:
        print(f"tagray featurize: failed: {e}", file=sys.stderr)
        return 1
    print(summary_line(summary))
    log.info("features → %s (%d new shards); errors → %s", args.out, len(summary["shards"]), summary["errors_file"])
    print(jsonio.dumps({k: summary[k] for k in ("out", "featurized", "errors", "errors_file")}, "featurize summary",
                       indent=1))
    return 0
