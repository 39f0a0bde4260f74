"""`tagray features import SRC --out FEATURES --name NAME`: features computed elsewhere (CLIP
embeddings from another pipeline, the low-level features NUS-WIDE ships) → tagray's feature
shards, with an identity (name, dim, sha256 of the source) that train, calibrate, evaluate,
index and serve check as they check a torchvision backbone's (see tagray/features/external.py)."""

from __future__ import annotations

import argparse

from tagray.commands.common import add_endpoint, command
from tagray.features.external import FORMATS, ID_FORMATS, ImportConfig, import_features


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tagray features", description=__doc__)
    sub = p.add_subparsers(dest="action", required=True, metavar="import")
    imp = sub.add_parser("import", help="Parquet, .npy + ids, or whitespace-separated text (NUS-WIDE .dat) → shards",
                         description=__doc__)
    imp.add_argument("src", metavar="SRC",
                     help="Parquet file or directory of *.parquet, a 2-D .npy, or a text file of one image a line "
                          "(local or s3://)")
    imp.add_argument("--out", required=True, help="feature shard directory to write (empty or absent; local or s3://)")
    imp.add_argument("--name", required=True, help="what these features are (e.g. clip-vit-b32); part of their identity")
    imp.add_argument("--format", choices=FORMATS, default="auto",
                     help="source format (default: by suffix: .parquet or a directory, .npy, else text)")
    imp.add_argument("--id-column", default="image_id", help="Parquet: the id column (of SRC, or of a Parquet --ids)")
    imp.add_argument("--feature-column", action="append", default=None, metavar="COL",
                     help="Parquet: the list column, or (repeated / comma-separated) the numeric columns in order "
                          "(default: the one list column, else every floating-point column)")
    imp.add_argument("--ids", default=None,
                     help=".npy / text: the ids of SRC's rows, in order: one id a line, a Parquet file (--id-column), "
                          "or NUS-WIDE's ImageList/Imagelist.txt (the photo id of each line)")
    imp.add_argument("--ids-format", choices=ID_FORMATS, default="auto",
                     help="lines, nuswide (Imagelist lines) or parquet (default: parquet by suffix; nuswide when the "
                          "first line looks like <concept>\\<NNNN>_<photo id>.jpg; else lines)")
    imp.add_argument("--batch-rows", type=int, default=ImportConfig.batch_rows, help="rows read and checked at a time")
    imp.add_argument("--shard-rows", type=int, default=ImportConfig.shard_rows,
                     help="rows per output shard (default 0: about 64 MiB of features a shard)")
    add_endpoint(imp)
    return p


@command("features")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    columns = tuple(c.strip() for flag in args.feature_column or () for c in flag.split(",") if c.strip())
    cfg = ImportConfig(name=args.name, format=args.format, id_column=args.id_column, feature_columns=columns,
                       ids=args.ids, ids_format=args.ids_format, batch_rows=args.batch_rows, shard_rows=args.shard_rows)
    summary = import_features(args.src, args.out, cfg, args.endpoint_url)
    ident = summary["identity"]
    if summary.get("already_imported"):
        print(f"{args.out} already holds this import ({summary['rows']} rows, {ident['source_digest'][:19]}…): nothing to do")
    else:
        print(f"imported {summary['rows']} features of {summary['dim']} dimensions as {ident['name']!r} "
              f"({ident['format']}, {ident['source_digest'][:19]}…) in {summary['seconds']:.1f}s "
              f"({summary['rows_per_second']:.0f} rows/s, {summary['shards']} shard(s))")
    print(f"features → {args.out}")
    return 0
