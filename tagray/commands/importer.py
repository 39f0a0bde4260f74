"""`tagray import <source>`: a corpus into the manifest contract (README *Data contract*),
with a JSON summary of what was written and skipped beside it (`<MANIFEST>.summary.json`,
`.parquet` dropped): MIRFlickr-25K/1M, NUS-WIDE, YFCC100M dataset files, or a photo folder
with XMP / IPTC keywords."""

from __future__ import annotations

import argparse
import logging
import time

from tagray.commands.common import add_endpoint, command
from tagray.data.importers.common import ImportSummary, write_summary

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tagray import", description=__doc__)
    sub = p.add_subparsers(dest="source", required=True, metavar="SOURCE")

    def source(name: str, help: str, what: str, nargs: str | None = None) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help, description=help)
        s.add_argument("input", nargs=nargs, metavar=what[0], help=what[1])
        s.add_argument("--out", required=True, help="manifest to write (Parquet, local or s3://)")
        add_endpoint(s)
        return s

    m = source("mirflickr", "MIRFlickr-25K / 1M: im<N>.jpg, meta/tags_raw/, annotations/, doc/owner_ids.txt",
               ("DIR", "the unpacked release (local or s3://)"))
    m.add_argument("--labels", choices=("concepts", "r1"), default="concepts",
                   help="annotations/<concept>.txt (default) or the stricter <concept>_r1.txt")
    n = source("nuswide", "NUS-WIDE: ImageList/, NUS_WID_Tags/All_Tags.txt, Groundtruth/AllLabels/, urls",
               ("DIR", "the unpacked release (local or s3://)"))
    n.add_argument("--images", default=None,
                   help="directory of the images as <concept>/<file>.jpg (default: their Flickr URLs)")
    n.add_argument("--url-size", choices=("large", "middle", "small", "original"), default="middle",
                   help="which URL of NUS-WIDE-urls.txt (another size where it is null)")
    n.add_argument("--val", type=float, default=0.0,
                   help="share of the official train images moved to split 'val' (seeded by --seed)")
    n.add_argument("--seed", type=int, default=0)
    n.add_argument("--skip-bad-labels", action="store_true",
                   help="skip (and count) images whose label files hold a value other than 0/1")
    y = source("yfcc100m", "YFCC100M dataset file(s): 25 or 23 tab-separated columns; videos skipped",
               ("FILE", "dataset files or globs (local or s3://; .bz2 / .gz by extension)"), nargs="+")
    y.add_argument("--uri-template", default=None,
                   help="uri from columns, e.g. 's3://bucket/{photo_id}.jpg' (default: the download URL)")
    y.add_argument("--limit", type=int, default=None, help="stop after this many photos")
    f = source("folder", "a photo library: every image under DIR, keywords from XMP (embedded or sidecar) "
               "and IPTC", ("DIR", "folder (local or s3://)"))
    f.add_argument("--user", default=None, help="user_id of every image (default: the top-level folder)")
    return p


def run(args: argparse.Namespace) -> ImportSummary:
    if args.source == "mirflickr":
        from tagray.data.importers.mirflickr import import_mirflickr

        return import_mirflickr(args.input, args.out, args.labels, args.endpoint_url)
    if args.source == "nuswide":
        from tagray.data.importers.nuswide import import_nuswide

        return import_nuswide(args.input, args.out, args.images, args.url_size, args.val, args.seed,
                              args.skip_bad_labels, args.endpoint_url)
    if args.source == "yfcc100m":
        from tagray.data.importers.common import expand_inputs
        from tagray.data.importers.yfcc100m import import_yfcc100m

        return import_yfcc100m(expand_inputs(args.input, args.endpoint_url), args.out, args.uri_template,
                               args.limit, args.endpoint_url)
    from tagray.data.importers.folder import import_folder

    return import_folder(args.input, args.out, args.user, args.endpoint_url)


@command("import")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    summary = run(args)
    summary_path = write_summary(summary, args.out, started, args.endpoint_url)
    skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(summary.skipped.items())) or "nothing"
    print(f"imported {summary.rows} images from {args.source} → {args.out} (skipped: {skipped}); "
          f"summary → {summary_path}")
    return 0
