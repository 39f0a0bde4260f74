"""`tagray search`: the images of an index that match all query words (`--q beach,sunset`) —
ranked by the product of calibrated P(z=1|x) for a linear head, by f·Σv over any vocabulary
word for the embedding head (README: search) — or, for the embedding head, the top words
of an indexed image (`--image-id`)."""

from __future__ import annotations

import argparse

from tagray import jsonio
from tagray.commands.common import add_endpoint, command
from tagray.config import ConfigError
from tagray.serve.index import WordIndex
from tagray.serve.service import RequestError, SearchService, ServeConfig


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tagray search", description=__doc__)
    p.add_argument("--model", required=True, help="model directory (the one the index was built with)")
    p.add_argument("--index", required=True, help="index directory (tagray index)")
    p.add_argument("--q", default=None, help="comma-separated query words")
    p.add_argument("--image-id", default=None, help="an indexed image: print its top words instead")
    p.add_argument("-k", type=int, default=10, help="results (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_endpoint(p)
    return p


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
    service = SearchService(args.model, args.index, ServeConfig(max_k=max(args.k, ServeConfig.max_k),
                                                               endpoint_url=args.endpoint_url))
    try:
        if args.q is not None:
            results = service.search(service.terms(args.q), args.k)
        elif service.words is None:
            raise ConfigError("--image-id needs an embed model (its index holds image embeddings)")
        else:
            results = image_words(service.words, service.index, args.image_id, args.k)
    except RequestError as e:
        raise ConfigError(e.message) from None
    if args.json:
        print(jsonio.dumps(results, "search results", indent=1))
    else:
        for r in results:
            print(f"{r['score']:9.3f}  " + (f"{r['image_id']}  {r['uri'] or ''}" if "image_id" in r else r["word"]))
    return 0
