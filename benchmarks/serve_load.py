"""The Serve app under bounded concurrent load on loopback (SPEC §5).

1. Model-bound ceiling, same run: the Tagger's own backbone (ResNet-18, random weights) +
   RLR head on decoded 224-px crops at batch 1 and at the batch Serve forms (16), in this
   process, no HTTP — images/s.
2. POST /v1/tag with request batching (`batch_size` 16) and without (1), at concurrency
   1, 4, 16: p50 / p99 latency and throughput; 256-px JPEGs rendered like the synthetic
   corpus, sent as multipart uploads by a thread pool (the client shares the 2 cores).
3. GET /v1/search over 1,000,000 images (`synth --features-only`, 512-D, an RLR head trained on
   them, the prediction index of `tagray index`): 1-, 2- and 3-tag queries, p50 / p99 and QPS.

    .venv/bin/python benchmarks/serve_load.py [--search-images 1000000] [--requests 160]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import torch

IDENTITY = {"name": "resnet18", "weights": "random", "weights_digest": "random-seed-0", "image_size": 224,
            "resize_size": 256, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "dim": 512}


def make_model(directory: str, dim: int, identity: dict, features=None, targets=None, vocab=None) -> str:
    """An RLR model directory: trained on `features` when given, else on random features
    over a small vocabulary (tagging speed does not depend on the weights)."""
    from tagray.config import load_config
    from tagray.data.normalize import NormalizerConfig, TagNormalizer, Vocabulary
    from tagray.heads.artifact import SavedHead, save_head
    from tagray.heads.fit import HeadConfig
    from tagray.heads.recipes.linear import fit

    cfg = HeadConfig(head="rlr", epochs=2, batch_size=500)
    if features is None:
        normalizer = TagNormalizer(load_config(NormalizerConfig, "normalize.yaml"))
        tags = tuple(f"tag{i:03d}" for i in range(100))
        vocab = Vocabulary(tags, tuple(range(1000, 900, -1)), normalizer.identity())
        rng = torch.Generator().manual_seed(0)
        features = torch.randn(4000, dim, generator=rng)
        targets = (torch.rand(4000, len(tags), generator=rng) < 0.05).float()
    model = fit(features, targets, cfg)
    save_head(SavedHead(model, vocab, cfg, identity, targets.sum(0).numpy().astype(np.int64),
                        np.zeros(len(vocab), bool), {}), directory)
    return directory


def model_ceiling(model_dir: str, jpegs: list[bytes], batch_sizes: list[int], threads: int) -> dict:
    """Backbone + head alone, with as many torch threads as the Tagger replica gets (Ray sets
    OMP_NUM_THREADS to a replica's num_cpus)."""
    from tagray.serve.service import ServeConfig, TaggingService

    torch.set_num_threads(threads)
    service = TaggingService(model_dir, ServeConfig(model=model_dir, index=None))
    t0 = time.perf_counter()
    pixels = [service.decode(j) for j in jpegs]
    decode_ms = 1000 * (time.perf_counter() - t0) / len(jpegs)
    out = {"decode_ms_per_image": decode_ms, "torch_threads": threads}
    for b in batch_sizes:
        service.probabilities(np.stack(pixels[:b]))  # warm-up
        n = max(b, 64 // b * b)
        t0 = time.perf_counter()
        for lo in range(0, n, b):
            service.probabilities(np.stack([pixels[(lo + i) % len(pixels)] for i in range(b)]))
        out[f"images_per_s_batch_{b}"] = n / (time.perf_counter() - t0)
        print(f"model-bound ({threads} thread(s)): batch {b}: {out[f'images_per_s_batch_{b}']:.1f} images/s", flush=True)
    return out


def load(url: str, jpegs: list[bytes], concurrency: int, n: int) -> dict:
    def one(i: int) -> float:
        t0 = time.perf_counter()
        r = requests.post(f"{url}v1/tag?k=5", files={"file": ("p.jpg", jpegs[i % len(jpegs)], "image/jpeg")}, timeout=120)
        r.raise_for_status()
        return time.perf_counter() - t0

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(concurrency)))  # warm-up
        t0 = time.perf_counter()
        latencies = list(pool.map(one, range(n)))
        wall = time.perf_counter() - t0
    ms = np.array(latencies) * 1000
    return {"concurrency": concurrency, "requests": n, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "images_per_s": n / wall}


def bench_tag(model_dir: str, jpegs: list[bytes], levels: list[int], n: int, port: int) -> list[dict]:
    from ray import serve

    from tagray.commands.serve import start

    rows = []
    for batched in (True, False):
        url = start({"model": model_dir, "index": None, "batch_size": 16 if batched else 1,
                     "tagger_cpus": 1.0}, "127.0.0.1", port)
        tagger = serve.get_deployment_handle("Tagger", app_name="tagray")
        for c in levels:
            before = tagger.batching.remote().result()
            row = {"batching": batched, **load(url, jpegs, c, max(n if c > 1 else n // 2, 2 * c))}
            calls = {b: k - before.get(b, 0) for b, k in tagger.batching.remote().result().items()}
            calls = {b: k for b, k in sorted(calls.items()) if k}  # model calls per batch size (warm-up included)
            row["images_per_model_call"] = sum(b * k for b, k in calls.items()) / max(1, sum(calls.values()))
            row["model_calls_by_batch_size"] = calls
            print(json.dumps(row), flush=True)
            rows.append(row)
        serve.shutdown()
    return rows


def bench_search(images: int, n: int, port: int, workdir: str) -> dict:
    import pyarrow.compute as pc
    from ray import serve

    from tagray.commands.serve import start
    from tagray.config import load_config
    from tagray.data.normalize import NormalizerConfig, TagNormalizer
    from tagray.data.schema import read_manifest
    from tagray.data.split import SplitConfig, assign_splits
    from tagray.data.synth import SynthConfig, synthesize
    from tagray.features.store import read_features
    from tagray.heads.fit import align
    from tagray.heads.models import load_model
    from tagray.heads.targets import build_targets, dense, prepare_vocabulary
    from tagray.serve.index import build_prediction_index, save_prediction_index

    t0 = time.perf_counter()
    written = synthesize(SynthConfig(images=images, seed=5, feature_dim=512), f"{workdir}/big", features_only=True)
    manifest = assign_splits(read_manifest(written["manifest"]), SplitConfig(seed=0))
    normalizer = TagNormalizer(load_config(NormalizerConfig, "normalize.yaml"))
    vocab = prepare_vocabulary(manifest, normalizer)
    features, _ = read_features(written["features"])
    sample = build_targets(manifest, normalizer, vocab).slice(0, 50_000)
    sample = sample.filter(pc.equal(sample.column("split"), "train"))
    x, found = align(features, sample.column("image_id"))
    y = dense(sample.column("tag_ids").take(found), len(vocab))
    identity = IDENTITY  # 512-D, so the app's Tagger (ResNet-18) fits the model too
    model_dir = make_model(f"{workdir}/big_model", 512, identity, x, y, vocab)
    index = build_prediction_index(load_model(model_dir), features, manifest, model_dir)
    save_prediction_index(index, f"{workdir}/big_index")
    setup_s = time.perf_counter() - t0
    del features, index
    print(f"search corpus: {images} images × {len(vocab)} tags ready in {setup_s:.0f}s", flush=True)
    url = start({"model": model_dir, "index": f"{workdir}/big_index"}, "127.0.0.1", port)
    rng = np.random.default_rng(0)
    tags = list(vocab.tags[:40])
    out = {"images": images, "tags": len(vocab), "setup_seconds": setup_s}
    for terms in (1, 2, 3):
        queries = [",".join(rng.choice(tags, terms, replace=False)) for _ in range(n)]
        for q in queries[:20]:  # warm-up: the index rows' first touch, the route's first calls
            requests.get(f"{url}v1/search", params={"q": q, "k": 20}, timeout=60).raise_for_status()
        ms = []
        t0 = time.perf_counter()
        for q in queries:
            t = time.perf_counter()
            requests.get(f"{url}v1/search", params={"q": q, "k": 20}, timeout=60).raise_for_status()
            ms.append(1000 * (time.perf_counter() - t))
        wall = time.perf_counter() - t0
        out[f"{terms}_tag"] = {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
                               "qps": n / wall}
        print(f"search {terms}-tag: {json.dumps(out[f'{terms}_tag'])}", flush=True)
    serve.shutdown()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["tag", "search"])
    p.add_argument("--requests", type=int, default=160, help="tag requests per concurrency level (half at 1)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--search-images", type=int, default=1_000_000)
    p.add_argument("--search-queries", type=int, default=300)
    p.add_argument("--port", type=int, default=8311)
    p.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = p.parse_args()
    from tagray.data.render import encode_jpeg, make_signatures, render_image
    from tagray.runtime import init_ray

    init_ray()
    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"}
    with tempfile.TemporaryDirectory() as workdir:
        if "tag" in args.parts:
            rng = np.random.default_rng(0)
            signatures = make_signatures(40, rng)
            jpegs = [encode_jpeg(render_image(list(rng.choice(40, 2, replace=False)), signatures, 256, rng), 90)
                     for _ in range(64)]
            model_dir = make_model(f"{workdir}/model", 512, IDENTITY)
            result["ceiling_2_threads"] = model_ceiling(model_dir, jpegs, [1, 16], 2)
            result["ceiling"] = model_ceiling(model_dir, jpegs, [1, 16], 1)  # what the replica (num_cpus 1) gets
            result["tag"] = bench_tag(model_dir, jpegs, args.concurrency, args.requests, args.port)
            ceiling = result["ceiling"]["images_per_s_batch_16"]
            for row in result["tag"]:
                row["share_of_ceiling"] = row["images_per_s"] / ceiling
        if "search" in args.parts:
            result["search"] = bench_search(args.search_images, args.search_queries, args.port, workdir)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"results → {args.out}")


if __name__ == "__main__":
    main()
