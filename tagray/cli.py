"""The `tagray` console script: `tagray <command> [args]`; each command is a `main(argv)`."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "import": "a corpus into a manifest: mirflickr, nuswide, yfcc100m, or a photo folder (XMP/IPTC keywords)",
    "synth": "generate a synthetic tagged-photo corpus",
    "split": "assign train/val/test splits by user",
    "stats": "tag statistics and plots of a manifest",
    "featurize": "images → backbone features on Ray Data (sharded Parquet, errors, resume)",
    "features": "features computed elsewhere (Parquet, .npy, NUS-WIDE files) → tagray's feature shards",
    "train": "train a LR / RLR / word-embedding / neighbourhood / refinement head on Ray Train (resumable)",
    "tune": "Ray Tune sweep of the neighbors or refine head (ASHA on validation mAP), best model exported",
    "refine": "refined tag scores of the training images from a refine model (seed 002)",
    "calibrate": "fit per-tag intercepts β on labelled images or users' verdicts (W frozen)",
    "evaluate": "tag prediction, annotation, retrieval metrics with baselines",
    "index": "the sharded search index of a model over every featurized image (Ray Data; --append, --delete)",
    "export": "each image's user and predicted tags (P(z) above a threshold) as XMP sidecars, jsonl or csv",
    "search": "images matching all query tags, or like an image, in an index (filters, min score, paging)",
    "serve": "Ray Serve app: POST /v1/tag, GET /v1/search, the page at /",
    "keys": "API keys for the Serve app: a new key and the hash entry the server holds",
    "demo": "run every stage end to end on generated data",
    "setup": "install what tagray needs at run time (WordNet for nltk)",
}
# Commands whose name is not a module name (`import` is a Python keyword).
MODULES = {"import": "importer"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {desc}" for name, desc in COMMANDS.items()]
        print("usage: tagray <command> [args]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\ntagray: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(f"tagray.commands.{MODULES.get(argv[0], argv[0])}")
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
