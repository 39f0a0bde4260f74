"""The embed head's image index by faiss factory string (seed 004 §2: f·q), in process: recall@20
against exact search (flat), p50 / p99 per query, bytes per image, build seconds, on the first N
images of a corpus, through tagray's own faiss code (`tagray/index/faiss_index.py`: trained once
on a seeded sample, then filled). Queries: sums of 2 word vectors (`/v1/search` on an embed
index) and images' own f(x) (`/v1/similar`), 100 of each.

    .venv/bin/python benchmarks/embed_recall.py --features CORPUS/features.parquet --model EMBED_MODEL \\
        --images 1000000 10000000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tagray.index import faiss_index  # noqa: E402

FACTORIES = ["IVF1024,PQ16", "IVF1024,PQ32", "IVF1024,SQ8", "IVF1024,Flat"]


def vectors_of(features: str, model: str, images: int) -> tuple[np.ndarray, object]:
    import pyarrow.parquet as pq

    from tagray.heads.models import load_image_tagger
    from tagray.index.model import embed

    head = load_image_tagger(model)
    table = pq.read_table(features, columns=["feature"]).slice(0, images)
    flat = table.column("feature").combine_chunks()
    x = flat.flatten().to_numpy(zero_copy_only=False).reshape(-1, flat.type.list_size)
    f = np.concatenate([embed(head, x[i: i + 500_000]) for i in range(0, len(x), 500_000)])
    return np.ascontiguousarray(f, np.float32), head


def timed_search(index, queries: np.ndarray, k: int) -> tuple[dict, list[set]]:
    ms, found = [], []
    for q in queries:
        t = time.perf_counter()
        _, rows = faiss_index.search(index, q, k, None)
        ms.append(1000 * (time.perf_counter() - t))
        found.append(set(rows.tolist()))
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}, found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", required=True)
    p.add_argument("--model", required=True, help="an embed model directory")
    p.add_argument("--images", type=int, nargs="+", default=[1_000_000])
    p.add_argument("--factories", nargs="+", default=FACTORIES)
    p.add_argument("--nprobe", type=int, nargs="+", default=[16, 64])
    p.add_argument("--train-sample", type=int, default=50_000)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--out", default="benchmarks/results/embed_recall.json")
    args = p.parse_args()
    import faiss

    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
                    "command": " ".join(sys.argv), "k": args.k, "runs": []}
    for images in args.images:
        f, head = vectors_of(args.features, args.model, images)
        rng = np.random.default_rng(0)
        words = head.vectors.numpy()
        queries = {"2_words": np.stack([words[rng.choice(len(words), 2, replace=False)].sum(0)
                                        for _ in range(args.queries)]).astype(np.float32),
                   "example": f[rng.choice(images, args.queries, replace=False)]}
        sample = f[np.sort(rng.choice(images, min(images, args.train_sample), replace=False))]
        run: dict = {"images": images, "dim": int(f.shape[1]), "factories": {}}
        exact: dict = {}
        for factory in ["flat", *args.factories]:
            faiss.omp_set_num_threads(os.cpu_count() or 1)  # building: every core, as the builder actors do
            t0 = time.perf_counter()
            trained = faiss_index.train(factory, sample) if faiss_index.needs_training(factory, f.shape[1]) else None
            filling = faiss_index.Filling(trained, factory, f.shape[1])
            for lo in range(0, images, 1_000_000):
                filling.add(f[lo: lo + 1_000_000])
            index = filling.finish()
            row: dict = {"build_seconds": round(time.perf_counter() - t0, 1),
                         "bytes_per_image": round(len(faiss_index.serialise(index)) / images, 1)}
            faiss.omp_set_num_threads(1)  # searching: a Searcher replica's one thread
            for nprobe in (args.nprobe if factory != "flat" else [None]):
                if nprobe is not None:
                    faiss.extract_index_ivf(index).nprobe = nprobe
                key = "exact" if nprobe is None else f"nprobe_{nprobe}"
                row[key] = {}
                for name, qs in queries.items():
                    timing, found = timed_search(index, qs, args.k)
                    if factory == "flat":
                        exact[name] = found
                    else:
                        timing["recall_at_k"] = round(float(np.mean(
                            [len(a & e) / max(1, len(e)) for a, e in zip(found, exact[name], strict=True)])), 3)
                    row[key][name] = timing
            run["factories"][factory] = row
            print(images, factory, json.dumps(row), flush=True)
            del index, filling
        result["runs"].append(run)
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"results → {args.out}")


if __name__ == "__main__":
    main()
