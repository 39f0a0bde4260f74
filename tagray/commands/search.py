"""`tagray search`: the images of an index (tagray index) that match all query words
(`--q beach,sunset`) — ranked by the product of calibrated P(z=1|x) for a linear head (seed 001
§5.3), by f·Σv over any vocabulary word for the embedding head (seed 004) — or the images most
like an indexed one (`--similar IMAGE_ID`), with filters on the columns the index keeps
(`--user`, `--taken-after`, `--taken-before`, `--where col=value`), a relevance cut-off
(`--min-score`) and paging (`--offset`). For the embedding head, `--image-id` prints an
indexed image's top words instead. Searches every shard in this process, tombstones applied."""

from __future__ import annotations

import argparse

from tagray import jsonio
from tagray.commands.common import add_endpoint, command
from tagray.config import ConfigError
from tagray.index import Filters, ShardGroup, UnknownImage, hits_json, merge_hits, open_index
from tagray.resources import local_cpus
from tagray.serve.index import UnknownWord, WordIndex


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tagray search", description=__doc__)
    p.add_argument("--model", required=True, help="model directory (the one the index was built with)")
    p.add_argument("--index", required=True, help="index directory (tagray index)")
    p.add_argument("--q", default=None, help="comma-separated query words")
    p.add_argument("--similar", default=None, metavar="IMAGE_ID", help="images most like this indexed image")
    p.add_argument("--image-id", default=None, help="an indexed image: print its top words instead (embed head)")
    p.add_argument("-k", "--k", type=int, default=10, help="results (default 10)")
    p.add_argument("--offset", type=int, default=0, help="skip this many results first (paging)")
    p.add_argument("--min-score", type=float, default=None,
                   help="only results scoring at least this (linear heads: a product of calibrated probabilities, in (0, 1])")
    p.add_argument("--user", default=None, help="only this user_id's images")
    p.add_argument("--taken-after", default=None, help="only images taken on or after this ISO date")
    p.add_argument("--taken-before", default=None, help="only images taken on or before this ISO date")
    p.add_argument("--where", action="append", default=[], metavar="COLUMN=VALUE",
                   help="only images whose kept column equals the value (repeatable)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_endpoint(p)
    return p


def filters_of(args: argparse.Namespace) -> Filters:
    equals = []
    for w in args.where:
        col, eq, value = w.partition("=")
        if not eq or not col.strip():
            raise ConfigError(f"--where {w!r}: expected COLUMN=VALUE")
        equals.append((col.strip(), value))
    return Filters(user=args.user, taken_after=args.taken_after, taken_before=args.taken_before, equals=tuple(equals))


def tag_columns(head, terms: list[str]) -> list[int]:
    """Vocabulary columns of the query tags, normalised as the training tags were."""
    from tagray.data.normalize import TagNormalizer

    normalizer = TagNormalizer.from_identity(head.vocab.normalizer)
    columns = []
    for term in terms:
        tag = normalizer.normalize_tag(term)
        if tag is None or tag not in head.vocab.index:
            said = repr(term) + (f" (normalised: {tag!r})" if tag and tag != term else "")
            raise ConfigError(f"unknown tag {said}: not in the model's vocabulary")
        columns.append(head.vocab.index[tag])
    return columns


@command("search")
def main(argv: list[str] | None = None) -> int:
    from tagray.heads.embed_artifact import SavedEmbedHead
    from tagray.heads.models import load_image_tagger

    args = build_parser().parse_args(argv)
    if sum(x is not None for x in (args.q, args.image_id, args.similar)) != 1:
        raise ConfigError("give one of --q WORDS, --similar IMAGE_ID or --image-id ID")
    if args.k < 1:
        raise ConfigError(f"-k must be ≥ 1, got {args.k}")
    if args.offset < 0:
        raise ConfigError(f"--offset must be ≥ 0, got {args.offset}")
    head = load_image_tagger(args.model, args.endpoint_url)
    info = open_index(args.index, args.endpoint_url)
    group = ShardGroup(info, list(info.shards), head, args.endpoint_url, threads=local_cpus())
    deleted = frozenset(info.tombstones())
    filters = filters_of(args)
    n = args.offset + args.k
    embed = isinstance(head, SavedEmbedHead)
    words = WordIndex.of(head) if embed else None
    if args.image_id is not None:
        if words is None:
            raise ConfigError("--image-id needs an embed model (its index holds image embeddings)")
        v = group.vector_of(args.image_id)
        if v is None or args.image_id in deleted:
            raise ConfigError(f"image {args.image_id!r} is not in the index")
        scores, ids = words.top_words(v.reshape(1, -1), args.k)
        results = [{"word": words.words[i], "score": float(s)} for s, i in zip(scores[0], ids[0], strict=True)]
    else:
        terms = [t.strip() for t in (args.q or "").split(",") if t.strip()]
        if args.q is not None and not terms:
            raise ConfigError("empty query: give --q tag1,tag2,…")
        try:
            if args.similar is not None:
                if args.similar in deleted:
                    raise ConfigError(f"image {args.similar!r} is not in the index (deleted)")
                hits = group.similar(args.similar, n, filters, deleted)
                if args.min_score is not None:
                    hits = [h for h in hits if h.score >= args.min_score]
            elif embed:
                hits = group.search_vector(words.query_vector(terms), n, args.min_score, filters, deleted)
            else:
                hits = group.search_tags(tag_columns(head, terms), n, args.min_score, filters, deleted)
        except UnknownWord as e:
            raise ConfigError(str(e)) from None
        except UnknownImage as e:
            raise ConfigError(f"{e}: not in the index") from None
        results = hits_json(merge_hits([hits], args.k, args.offset))
    if args.json:
        print(jsonio.dumps(results, "search results", indent=1))
    else:
        for r in results:
            print(f"{r['score']:9.3g}  " + (f"{r['image_id']}  {r['uri'] or ''}" if "image_id" in r else r["word"]))
    return 0
