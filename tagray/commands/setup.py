"""`tagray setup wordnet [--dir DIR]`: makes WordNet 3.0 readable by nltk, for an installed
tagray (a wheel, a cluster image) as `make setup` does for a checkout.

It assembles `DIR/corpora/wordnet` from Debian's `wordnet-base` + `wordnet-sense-index`
(installing them with apt-get when they are missing and it may), or uses nltk's downloader
where a network allows, then prints where WordNet is and what to export. Without `--dir` it
installs into ~/nltk_data, one of nltk's default folders, so nothing needs exporting."""

from __future__ import annotations

import argparse
from pathlib import Path

from tagray.commands.common import command
from tagray.data.wordnet import (
    DEBIAN_SOURCE,
    DEFAULT_DIR,
    LOCAL_NLTK_DATA,
    install_wordnet,
    on_nltk_default_path,
)

WHAT = ("wordnet",)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tagray setup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=WHAT, help="what to install: wordnet (nltk's WordNet 3.0 corpus)")
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                   help=f"NLTK_DATA folder to install into (default {DEFAULT_DIR}, on nltk's default path)")
    p.add_argument("--source", type=Path, default=DEBIAN_SOURCE,
                   help=f"folder with Debian's WordNet database files (default {DEBIAN_SOURCE})")
    p.add_argument("--no-apt", action="store_true", help="never run apt-get to install the Debian packages")
    p.add_argument("--no-download", action="store_true", help="never try nltk's downloader (network)")
    return p


@command("setup")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    folder = args.dir.expanduser().resolve()
    version = install_wordnet(folder, source=args.source, use_apt=not args.no_apt, download=not args.no_download,
                              log=lambda line: print(f"[tagray setup] {line}"))
    print(f"WordNet {version} for nltk is in {folder / 'corpora' / 'wordnet'}")
    if on_nltk_default_path(folder):
        print(f"nltk looks in {folder} by default: nothing to export")
    elif folder == LOCAL_NLTK_DATA.resolve():
        print(f"tagray looks in {folder} by itself (this checkout's .nltk_data); other nltk programs: "
              f"export NLTK_DATA={folder}")
    else:
        print(f"export NLTK_DATA={folder}")
    print("(Ray workers on other machines need it too: the tagray images have it in /opt/nltk_data)")
    return 0
