"""`tagray split`: assign train/val/test by user_id (no user in two splits)."""

from __future__ import annotations

import argparse
import logging

from tagray import jsonio
from tagray.commands.common import add_endpoint, add_overrides, command
from tagray.config import load_config, parse_overrides
from tagray.data.schema import read_manifest, write_manifest
from tagray.data.split import SplitConfig, assign_splits, split_sizes

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tagray split", description=__doc__)
    p.add_argument("--manifest", required=True, help="input manifest (Parquet, local or s3://)")
    p.add_argument("--out", required=True, help="output manifest with a `split` column (may equal --manifest)")
    p.add_argument("--config", default=None, help="YAML of SplitConfig fields (e.g. configs/split.yaml)")
    add_endpoint(p)
    add_overrides(p, "SplitConfig (train=0.8 val=0.1 test=0.1 seed=0)")
    return p


@command("split")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = load_config(SplitConfig, args.config, parse_overrides(args.overrides))
    manifest = read_manifest(args.manifest, endpoint_url=args.endpoint_url)
    out = assign_splits(manifest, cfg)
    write_manifest(out, args.out, args.endpoint_url)
    sizes = split_sizes(out)
    log.info("split manifest → %s", args.out)
    print(jsonio.dumps(sizes, "split sizes", indent=1))
    return 0
