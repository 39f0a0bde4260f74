"""Search over HTTP against the sharded index (issue 15): p50 / p99 of GET /v1/search and
POST /v1/similar through the whole Serve app on loopback.

1. A corpus of N images (`synth --features-only`, D-dimensional features — small D so 10M fit
   this machine), an RLR head trained on a sample of it (no backbone: search only), and three
   indexes of it: the previous single-directory index (`serve/index.py`, the unsharded
   baseline), `tagray index --shards 1` and `--shards 4`.
2. For each, the app deployed (K = 4: four Searcher groups) and 1-, 2-, 3-tag queries of random
   tags sent one after another (k = 20) after a warm-up: p50 / p99 / QPS. The answers of the
   three are compared (ids and scores equal) on every query.
3. With --embed: an embed head (random h, word vectors; speed does not depend on the weights),
   its index with a flat factory and with IVF-PQ, K = 4; `/v1/search` word queries and
   `/v1/similar` by image id: p99, recall@20 of IVF-PQ against flat, bytes per image.

    .venv/bin/python benchmarks/search_http.py --images 1000000 [--dim 64] [--embed]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import torch


def make_rlr(directory: str, features_uri: str, manifest_uri: str, sample: int) -> tuple[str, list[str]]:
    """An RLR head trained (2 epochs) on the first `sample` training images; backbone None, so
    the app serves search only and `tagray index` accepts the synthetic features."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from tagray.config import load_config
    from tagray.data.normalize import NormalizerConfig, TagNormalizer
    from tagray.data.schema import read_manifest
    from tagray.data.split import SplitConfig, assign_splits
    from tagray.heads.artifact import SavedHead, save_head
    from tagray.heads.fit import HeadConfig, align
    from tagray.heads.recipes.linear import fit
    from tagray.heads.targets import build_targets, dense, prepare_vocabulary

    manifest = assign_splits(read_manifest(manifest_uri), SplitConfig(seed=0))
    normalizer = TagNormalizer(load_config(NormalizerConfig, "normalize.yaml"))
    vocab = prepare_vocabulary(manifest, normalizer)
    targets = build_targets(manifest, normalizer, vocab).slice(0, sample)
    targets = targets.filter(pc.equal(targets.column("split"), "train"))
    file = pq.ParquetFile(features_uri)
    rows, groups = 0, []
    while rows < sample and len(groups) < file.num_row_groups:  # the first rows: the sample's features
        rows += file.metadata.row_group(len(groups)).num_rows
        groups.append(len(groups))
    x, found = align(file.read_row_groups(groups), targets.column("image_id"))
    y = dense(targets.column("tag_ids").take(found), len(vocab))
    cfg = HeadConfig(head="rlr", epochs=2, batch_size=1000)
    model = fit(x, y, cfg)
    save_head(SavedHead(model, vocab, cfg, None, y.sum(0).numpy().astype(np.int64), np.zeros(len(vocab), bool), {}),
              directory)
    return directory, list(vocab.tags)


def make_embed(directory: str, rlr_dir: str, dim: int, word_dim: int = 32) -> str:
    """An embed head of random weights over the RLR model's vocabulary (seeded)."""
    from tagray.heads.embed_artifact import SavedEmbedHead, save_embed_head
    from tagray.heads.embedding import EmbedConfig, TagMLP
    from tagray.heads.models import load_model

    vocab = load_model(rlr_dir).vocab
    torch.manual_seed(0)
    tags = len(vocab)
    save_embed_head(SavedEmbedHead(TagMLP(dim, (64,), word_dim), torch.randn(tags, word_dim), list(vocab.tags), vocab,
                                   EmbedConfig(hidden=(64,), word_dim=word_dim), None, np.ones(tags, np.int64),
                                   np.zeros(tags, bool), "random"), directory)
    return directory


def build(model: str, features: str, manifest: str | None, out: str, shards: int, factory: str = "flat",
          similar: bool = False, nprobe: int = 16) -> dict:
    from tagray.heads.models import load_image_tagger
    from tagray.index.build import IndexBuildConfig, build_index

    t0 = time.perf_counter()
    summary = build_index(load_image_tagger(model), model, features, out, manifest,
                          IndexBuildConfig(shards=shards, factory=factory, similar=similar, train_sample=50_000,
                                                   nprobe=nprobe))
    workers = summary.get("workers") or [{}]
    return {"seconds": time.perf_counter() - t0, "workers_peak_rss_mb": max(w.get("peak_rss_mb", 0) for w in workers),
            **{k: v for k, v in summary.items() if not isinstance(v, list | dict)}}


def build_legacy(model: str, features: str, out: str) -> dict:
    """The previous `tagray index`: every prediction computed in the driver, one directory."""
    from tagray.features.store import read_features
    from tagray.heads.models import load_model
    from tagray.serve.index import build_prediction_index, save_prediction_index

    t0 = time.perf_counter()
    table, _ = read_features(features)
    save_prediction_index(build_prediction_index(load_model(model), table, None, model), out)
    return {"seconds": time.perf_counter() - t0}


def timed(fn, queries: list, warmup: int = 20) -> tuple[dict, list]:
    for q in queries[:warmup]:
        fn(q)
    ms, answers = [], []
    t0 = time.perf_counter()
    for q in queries:
        t = time.perf_counter()
        answers.append(fn(q))
        ms.append(1000 * (time.perf_counter() - t))
    wall = time.perf_counter() - t0
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "qps": round(len(queries) / wall, 1), "slowest_ms": [round(x, 1) for x in sorted(ms)[-5:]],
            "slowest_at": sorted(range(len(ms)), key=ms.__getitem__)[-5:]}, answers


def get_search(url: str):
    def one(q: str) -> list:
        r = requests.get(f"{url}v1/search", params={"q": q, "k": 20}, timeout=60)
        r.raise_for_status()
        body = r.json()
        assert not body.get("partial"), body
        return [(i["image_id"], i["score"]) for i in body["images"]]
    return one


def post_similar(url: str):
    def one(image_id: str) -> list:
        r = requests.post(f"{url}v1/similar", json={"image_id": image_id, "k": 20}, timeout=60)
        r.raise_for_status()
        return [i["image_id"] for i in r.json()["images"]]
    return one


def deploy(args: dict, port: int, searcher_cpus: float = 0.25, search_threads: int = 0, scan_codes: bool = True) -> str:
    from ray import serve

    from tagray.commands.serve import start

    serve.shutdown()
    return start({**args, "tagger_cpus": 0.1, "searcher_cpus": searcher_cpus, "search_threads": search_threads,
                  "scan_codes": scan_codes, "search_timeout_s": 30.0}, "127.0.0.1", port)


def searcher_rss_mb() -> float:
    """RSS of the Serve app's Searcher replicas (their process titles name the deployment), MB."""
    import psutil

    total = 0
    for proc in psutil.process_iter(["cmdline", "memory_info"]):
        try:
            if "Searcher" in " ".join(proc.info["cmdline"] or []):
                total += proc.info["memory_info"].rss
        except (psutil.Error, TypeError):
            continue
    return round(total / 2**20, 1)


def du(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64, help="feature dimension D (memory: N × D × 4 bytes)")
    p.add_argument("--shards", type=int, nargs="+", default=[1, 4])
    p.add_argument("--queries", type=int, default=300, help="queries per query size")
    p.add_argument("--no-legacy", action="store_true", help="skip the previous single-directory baseline")
    p.add_argument("--embed", action="store_true", help="also the embed head: flat vs IVF-PQ")
    p.add_argument("--ivfpq", default="IVF1024,PQ16")
    p.add_argument("--nprobe", type=int, default=16, help="IVF lists searched per query (the IVF-PQ index)")
    p.add_argument("--no-tags", action="store_true", help="skip the tag searches (with --embed: the embed index only)")
    p.add_argument("--port", type=int, default=8312)
    p.add_argument("--workdir", default=None, help="keep the corpus and indexes here (default: a temporary dir)")
    p.add_argument("--reuse", default=None, metavar="DIR",
                   help="a kept run's directory (corpus/, rlr/, k<K>/): search its indexes, no synth or build")
    p.add_argument("--searcher-cpus", type=float, default=0.25, help="CPUs per Searcher replica")
    p.add_argument("--search-threads", type=int, nargs="+", default=[0],
                   help="ServeConfig.search_threads: each index is deployed and searched with each (0: one per whole "
                        "CPU of --searcher-cpus, at least 1)")
    p.add_argument("--scan-codes", nargs="+", choices=["on", "off"], default=["on"],
                   help="ServeConfig.scan_codes: each index is deployed and searched with each (on: the Searchers "
                        "bound multi-tag scans from coarse codes, one byte per image and tag more)")
    p.add_argument("--repeat", type=int, default=1, help="deploy and search each setting this many times, "
                                                          "interleaved (A B A B: the VM's hour moves both alike)")
    p.add_argument("--out", default="benchmarks/results/search_http.json")
    args = p.parse_args()

    from ray import serve

    from tagray.data.synth import SynthConfig, synthesize
    from tagray.runtime import init_ray

    init_ray()
    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), Python {platform.python_version()}",
                    "images": args.images, "dim": args.dim}
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        indexes = {}
        if args.reuse:  # a kept run (killed before its temporary directory went): search only
            work = args.reuse
            written = {"features": f"{work}/corpus/features.parquet", "manifest": f"{work}/corpus/manifest.parquet"}
            model = f"{work}/rlr"
            from tagray.heads.models import load_model

            tags = list(load_model(model).vocab.tags)
            indexes = {f"k{k}": f"{work}/k{k}" for k in args.shards}
            result["reused"] = work
        else:
            t0 = time.perf_counter()
            written = synthesize(SynthConfig(images=args.images, seed=5, feature_dim=args.dim), f"{work}/corpus",
                                 features_only=True)
            result["synth_seconds"] = round(time.perf_counter() - t0, 1)
            print(f"synth: {args.images} images in {result['synth_seconds']}s", flush=True)
            model, tags = make_rlr(f"{work}/rlr", written["features"], written["manifest"], 50_000)
            if not args.no_legacy:
                indexes["legacy"] = f"{work}/legacy"
                result["build_legacy"] = build_legacy(model, written["features"], indexes["legacy"])
            for k in args.shards:
                indexes[f"k{k}"] = f"{work}/k{k}"
                result[f"build_k{k}"] = build(model, written["features"], written["manifest"], indexes[f"k{k}"], k)
                print(f"index K={k}: {result[f'build_k{k}']}", flush=True)
        result["index_bytes_per_image"] = {name: round(du(d) / args.images, 1) for name, d in indexes.items()}
        print(f"peak driver RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB", flush=True)

        rng = np.random.default_rng(0)
        pool = tags[:40]
        queries = {n: [",".join(rng.choice(pool, n, replace=False)) for _ in range(args.queries)] for n in (1, 2, 3)}
        answers: dict = {}
        result["search"] = {}
        runs = [(name, index, threads, codes, r) for r in range(args.repeat)
                for name, index in ({} if args.no_tags else indexes).items()
                for threads in args.search_threads for codes in args.scan_codes]
        for name, index, threads, codes, r in runs:
            label = name + (f"_threads{threads}" if len(args.search_threads) > 1 else "") + \
                (f"_codes_{codes}" if len(args.scan_codes) > 1 else "") + (f"_run{r + 1}" if args.repeat > 1 else "")
            url = deploy({"model": model, "index": index}, args.port, args.searcher_cpus, threads, codes == "on")
            rows = {"searcher_rss_mb": searcher_rss_mb()}
            for n, qs in queries.items():
                rows[f"{n}_tag"], answers[(label, n)] = timed(get_search(url), qs)
                print(f"search {label} {n}-tag: {rows[f'{n}_tag']}", flush=True)
            result["search"][label] = rows
        if answers:
            labels = list(result["search"])
            result["same_answers"] = all(answers[(label, n)] == answers[(labels[0], n)] for label in labels for n in queries)
            print(f"same answers across {labels}: {result['same_answers']}", flush=True)

        if args.embed:
            embed = make_embed(f"{work}/embed", model, args.dim)
            result["embed"] = {}
            ids = None
            hits, found = {}, {}
            words = [",".join(rng.choice(pool, 2, replace=False)) for _ in range(args.queries)]  # the same for each factory
            for factory in ("flat", args.ivfpq):
                out = f"{work}/embed_{factory.replace(',', '_')}"
                serve.shutdown()  # the builders need the CPUs the app's replicas hold
                build_summary = build(embed, written["features"], None, out, 4, factory=factory, nprobe=args.nprobe)
                url = deploy({"model": embed, "index": out}, args.port, args.searcher_cpus)
                if ids is None:
                    from tagray.index import open_index

                    all_ids = open_index(out).image_ids().to_pylist()
                    ids = [all_ids[i] for i in rng.choice(len(all_ids), args.queries, replace=False)]
                search_row, found[factory] = timed(get_search(url), words)
                similar_row, hits[factory] = timed(post_similar(url), ids)
                result["embed"][factory] = {"build": build_summary, "search_2_words": search_row,
                                            "similar": similar_row,
                                            "bytes_per_image": round(du(out) / args.images, 1)}
                print(f"embed {factory}: {result['embed'][factory]}", flush=True)
            exact = hits["flat"]
            approx = hits[args.ivfpq]
            result["embed"][args.ivfpq]["recall_at_20_similar"] = float(np.mean(
                [len(set(a) & set(e)) / max(1, len(e)) for a, e in zip(approx, exact, strict=True)]))
            result["embed"][args.ivfpq]["recall_at_20_search_2_words"] = float(np.mean(
                [len({i for i, _ in a} & {i for i, _ in e}) / max(1, len(e))
                 for a, e in zip(found[args.ivfpq], found["flat"], strict=True)]))
            result["embed"][args.ivfpq]["nprobe"] = args.nprobe
        serve.shutdown()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"results → {args.out}")


if __name__ == "__main__":
    main()
