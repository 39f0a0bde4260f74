"""`tagray stats`: tag histogram, tagging likelihoods, false-tag rates and tag accuracy by
position (seed 001 §3, Fig. 1, 2, 4), as JSON and PNG plots."""

from __future__ import annotations

import argparse
import logging

from tagray.commands.common import add_endpoint, add_overrides, command
from tagray.config import load_config, parse_overrides
from tagray.data import storage
from tagray.data.normalize import NormalizerConfig, TagNormalizer
from tagray.data.schema import read_manifest
from tagray.data.stats import plot_statistics, tag_statistics, write_statistics

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tagray stats", description=__doc__)
    p.add_argument("--manifest", required=True, help="manifest (Parquet, local or s3://)")
    p.add_argument("--out", required=True, help="directory for stats.json and the plots")
    p.add_argument("--normalizer", default=None, help="YAML of NormalizerConfig fields (e.g. configs/normalize.yaml)")
    p.add_argument("--split", default=None, choices=["train", "val", "test"], help="only this split")
    add_endpoint(p)
    add_overrides(p, "NormalizerConfig")
    return p


def summary_lines(stats: dict) -> list[str]:
    lines = [
        f"{stats['images']} images, {stats['distinct_tags']} distinct tags after normalisation, "
        f"{stats['tags_per_image']:.2f} tags/image ({stats['raw_tags_per_image']:.2f} raw)"
    ]
    lab = stats.get("labels")
    if lab:
        pos = lab["accuracy_by_position"]
        lines.append(
            f"median tagging likelihood P(tag|label) {lab['median_tagging_likelihood']:.3f}, "
            f"tag precision {lab['overall_precision']:.2f}, "
            f"false-tag rate {lab['overall_false_tag_rate']:.4f}"
        )
        lines.append(
            f"tag accuracy by position: {pos[0]['accuracy']:.2f} at {pos[0]['position']} → "
            f"{pos[-1]['accuracy']:.2f} at {pos[-1]['position']}"
        )
    return lines


@command("stats")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    normalizer = TagNormalizer(load_config(NormalizerConfig, args.normalizer, parse_overrides(args.overrides)))
    manifest = read_manifest(args.manifest, split=args.split, endpoint_url=args.endpoint_url)
    stats = tag_statistics(manifest, normalizer)
    storage.makedirs(args.out, args.endpoint_url)
    written = [write_statistics(stats, args.out, args.endpoint_url),
               *plot_statistics(stats, args.out, endpoint_url=args.endpoint_url)]
    for line in summary_lines(stats):
        print(line)
    log.info("stats → %s", ", ".join(written))
    return 0
