"""`tagray search`: with the embedding head, the images that best match any vocabulary words
(`--q seashore,sunset`: the sum of the words' vectors, README: search), or the top words of
an indexed image (`--image-id`)."""

from __future__ import annotations

import argparse
import json

from tagray.commands.common import add_endpoint, command
from tagray.config import ConfigError
from tagray.heads.embed_artifact import load_embed_head
from tagray.serve.index import WordIndex, check_index_matches, load_image_index


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tagray search", description=__doc__)
    p.add_argument("--model", required=True, help="embed model directory")
    p.add_argument("--index", required=True, help="index directory (tagray index)")
    p.add_argument("--q", default=None, help="comma-separated query words")
    p.add_argument("--image-id", default=None, help="an indexed image: print its top words instead")
    p.add_argument("-k", type=int, default=10, help="results (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_endpoint(p)
    return p


def search(words: WordIndex, index, query: list[str], k: int) -> list[dict]:
    return [{"image_id": i, "uri": u, "score": s} for i, u, s in index.search(words.query_vector(query), k)]


def image_words(words: WordIndex, index, image_id: str, k: int) -> list[dict]:
    try:
        row = index.image_ids.index(image_id)
    except ValueError:
        raise ConfigError(f"image {image_id!r} is not in the index") from None
    scores, ids = words.top_words(index.index.reconstruct(row).reshape(1, -1), k)
    return [{"word": words.words[i], "score": float(s)} for s, i in zip(scores[0], ids[0], strict=True)]


@command("search")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if (args.q is None) == (args.image_id is None):
        raise ConfigError("give either --q WORDS or --image-id ID")
    if args.k < 1:
        raise ConfigError(f"-k must be ≥ 1, got {args.k}")
    head = load_embed_head(args.model, endpoint_url=args.endpoint_url)
    index = load_image_index(args.index, args.endpoint_url)
    check_index_matches(index, head, args.index)
    words = WordIndex.of(head)
    if args.q is not None:
        results = search(words, index, [w for w in args.q.split(",") if w.strip()], args.k)
    else:
        results = image_words(words, index, args.image_id, args.k)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            print(f"{r['score']:9.3f}  " + (f"{r['image_id']}  {r['uri'] or ''}" if "image_id" in r else r["word"]))
    return 0
