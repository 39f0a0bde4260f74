"""Issue 6's figures: Jaccard M-nearest-neighbour search (seed 003) against brute force as the
corpus grows, and Ray Tune sweep wall time with 1 vs 2 concurrent trials.

1. `jaccard`: synthetic metadata of two kinds (`synthetic_metadata`): tag-like (a fixed
   vocabulary, Zipf, so postings grow with N) and set-like (the vocabulary grows with N).
   The inverted index (`tagray.data.jaccard.jaccard_neighbors`) against brute force (every
   pair, the same tie-breaking), both timed on
   the same Q sampled query images against all N; the whole-corpus time is per-query time × N
   (measured outright where `--full-up-to` allows). At 10k both are also run on every image and
   compared for equality. For tag-like metadata also MinHash LSH (`jaccard_neighbors_lsh`,
   approximate) on the whole corpus, with its recall against brute force on the Q queries. Brute force scans every image's values for every query (a sparse
   (N × V)·(V × Q) product: O(nnz · Q)), with no index.
2. `sweep`: `tagray tune`'s run_sweep on a synthetic corpus (4 trials of the neighbours model,
   no early stopping), max_concurrent 1 against 2, same local Ray (2 CPUs): wall time of the
   whole command and of the trials alone (Tuner.fit).

    .venv/bin/python benchmarks/neighbors.py             # both; JSON to benchmarks/results/neighbors.json
    .venv/bin/python benchmarks/neighbors.py --parts jaccard --sizes 10000 100000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from tagray.data.jaccard import jaccard_neighbors
from tagray.data.jaccard_lsh import jaccard_neighbors_lsh


def synthetic_metadata(n: int, values: int, rng: np.random.Generator, kind: str = "tags") -> sp.csr_matrix:
    """tags: 1–12 values per image, Zipf(1) over a fixed vocabulary (postings grow ∝ N);
    sets: 1–3 values per image, uniform over N/3 values (postings stay ≈ 6 images, as
    NUS-WIDE's sets: 2.3 images per set, and groups grow with the corpus)."""
    if kind == "sets":
        values = max(1, n // 3)
        counts = rng.integers(1, 4, n)
        rows = np.repeat(np.arange(n), counts)
        cols = rng.integers(0, values, len(rows))
    else:
        p = 1.0 / np.arange(1, values + 1)
        p /= p.sum()
        counts = rng.integers(1, 13, n)
        rows = np.repeat(np.arange(n), counts)
        cols = rng.choice(values, size=len(rows), p=p)
    a = sp.csr_matrix((np.ones(len(rows), np.int32), (rows, cols)), shape=(n, values))
    a.sum_duplicates()
    a.data[:] = 1
    return a


def brute_force(a: sp.csr_matrix, queries: np.ndarray, m: int, block: int = 200_000) -> tuple[np.ndarray, np.ndarray]:
    """Every (query, image) pair: a scan of every image's values for each query (a · q, dense
    over images), Jaccard of all N, top m by (similarity, lower index)."""
    sizes = np.asarray(a.sum(1)).ravel().astype(np.float64)
    q = a[queries].T.toarray().astype(np.float32)  # (V, Q)
    best_sim = np.full((len(queries), m), -1.0)
    best_idx = np.full((len(queries), m), -1, np.int64)
    for lo in range(0, a.shape[0], block):
        hi = min(lo + block, a.shape[0])
        shared = np.asarray(a[lo:hi] @ q).T.astype(np.float64)  # (Q, B): every image of the block
        sim = shared / (sizes[queries][:, None] + sizes[lo:hi][None, :] - shared)
        sim[np.nan_to_num(sim) <= 0] = -1.0
        own = (queries >= lo) & (queries < hi)
        sim[np.nonzero(own)[0], queries[own] - lo] = -1.0
        idx = np.broadcast_to(np.arange(lo, hi), sim.shape)
        all_sim = np.concatenate([best_sim, sim], 1)
        all_idx = np.concatenate([best_idx, idx], 1)
        # stable: among equal similarities the earlier (lower) index stays first, as the inverted index breaks ties
        order = np.argsort(-all_sim, 1, kind="stable")[:, :m]
        best_sim = np.take_along_axis(all_sim, order, 1)
        best_idx = np.take_along_axis(all_idx, order, 1)
    nn = np.where(best_sim > 0, best_idx, -1).astype(np.int32)
    return nn, np.where(best_sim > 0, 1 - best_sim, 1.0).astype(np.float32)


def bench_jaccard(sizes: list[int], values: int, m: int, queries: int, full_up_to: int, kind: str,
                  cap_share: float = 0.0, lsh: bool = False) -> list[dict]:
    rows = []
    for n in sizes:
        rng = np.random.default_rng(0)
        a = synthetic_metadata(n, values, rng, kind)
        q = np.sort(rng.choice(n, size=min(queries, n), replace=False))
        t0 = time.perf_counter()
        inv_nn, _ = jaccard_neighbors(a, m, queries=q)
        t_inv = time.perf_counter() - t0
        t0 = time.perf_counter()
        bf_nn, _ = brute_force(a, q, m)
        t_bf = time.perf_counter() - t0
        _, bf_dist = brute_force(a, q, m)
        if cap_share:  # approximate: frequent values do not generate candidates
            t0 = time.perf_counter()
            cap_nn, cap_dist = jaccard_neighbors(a, m, queries=q, max_posting=int(cap_share * n))
            t_cap = time.perf_counter() - t0
            capped = {"max_posting": int(cap_share * n), "s_per_query": t_cap / len(q), "all_s": t_cap / len(q) * n,
                      "speedup_vs_brute": t_bf / t_cap,
                      "similarity_recall": float((1 - cap_dist).sum() / max((1 - bf_dist).sum(), 1e-12)),
                      "same_neighbours_share": float((cap_nn == bf_nn).mean())}
        row = {"metadata": kind, "images": n, "values": a.shape[1], "values_per_image": float(a.sum() / n), "queries": len(q),
               "inverted_index_s_per_query": t_inv / len(q), "brute_force_s_per_query": t_bf / len(q),
               "inverted_index_all_s": t_inv / len(q) * n, "brute_force_all_s": t_bf / len(q) * n,
               "speedup": t_bf / t_inv, "same_neighbours": bool((inv_nn == bf_nn).all())}
        if n <= full_up_to:
            t0 = time.perf_counter()
            jaccard_neighbors(a, m)
            row["inverted_index_all_s_measured"] = time.perf_counter() - t0
        if cap_share:
            row["capped"] = capped
        if lsh:  # approximate: MinHash LSH over the whole corpus (it has no per-query mode)
            t0 = time.perf_counter()
            lsh_nn, lsh_dist = jaccard_neighbors_lsh(a, m)
            t_lsh = time.perf_counter() - t0
            row["lsh"] = {"all_s_measured": t_lsh, "speedup_vs_brute_all": t_bf / len(q) * n / t_lsh,
                          "similarity_recall": float((1 - lsh_dist[q]).sum() / max((1 - bf_dist).sum(), 1e-12)),
                          "same_neighbours_share": float((lsh_nn[q] == bf_nn).mean())}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def bench_sweep(images: int, epochs: int) -> list[dict]:
    from tagray.config import load_config
    from tagray.data.normalize import NormalizerConfig, TagNormalizer
    from tagray.data.schema import read_manifest, write_manifest
    from tagray.data.split import SplitConfig, assign_splits
    from tagray.data.synth import SynthConfig, synthesize
    from tagray.runtime import init_ray
    from tagray.tune.space import TuneConfig
    from tagray.tune.sweep import run_sweep

    init_ray(num_cpus=2)
    normalizer = TagNormalizer(load_config(NormalizerConfig, "normalize.yaml"))
    rows = []
    with tempfile.TemporaryDirectory() as d:
        synth = SynthConfig(images=images, seed=1, feature_dim=128, feature_noise=6.0, group_join_rate=0.6,
                            pi_median=0.6, free_tags_mean=1.0)  # the corpus of tests/test_neighbors_cli.py
        written = synthesize(synth, f"{d}/corpus", features_only=True)
        corpus = {"manifest": f"{d}/manifest.parquet", "features": written["features"]}
        write_manifest(assign_splits(read_manifest(written["manifest"]), SplitConfig(seed=0)), corpus["manifest"])
        for concurrent in (1, 2):
            sweep = TuneConfig(head="neighbors", fixed={"epochs": epochs, "lr": 0.003, "hidden": 128, "target": "labels"},
                               search_space={"m": {"grid": [2, 3]}, "max_rank": {"grid": [4, 8]}},
                               grace_period=epochs, max_concurrent=concurrent)  # no early stopping: equal work
            t0 = time.perf_counter()
            summary = run_sweep(corpus["manifest"], corpus["features"], f"{d}/sweep{concurrent}", sweep, normalizer)
            rows.append({"concurrent_trials": concurrent, "trials": summary["trials"], "epochs": epochs,
                         "images": images, "wall_s": time.perf_counter() - t0, "trials_s": summary["trials_seconds"], "best_val_map": summary["best_val_map"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["jaccard", "sweep"])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--values", type=int, default=5000, help="tags: metadata vocabulary V (τ)")
    p.add_argument("--metadata", nargs="+", default=["tags", "sets"], help="synthetic metadata kinds (see synthetic_metadata)")
    p.add_argument("--m", type=int, default=6, help="neighbours per image (M)")
    p.add_argument("--queries", type=int, default=100, help="sampled query images timed at each size")
    p.add_argument("--cap-share", type=float, default=0.002,
                   help="tags: also run with max_posting = this share of N (approximate) and report its recall")
    p.add_argument("--no-lsh", action="store_true", help="tags: skip MinHash LSH (whole corpus, default settings)")
    p.add_argument("--full-up-to", type=int, default=10_000, help="also time the whole corpus up to this size")
    p.add_argument("--sweep-images", type=int, default=8000)
    p.add_argument("--sweep-epochs", type=int, default=15)
    p.add_argument("--out", default="benchmarks/results/neighbors.json")
    args = p.parse_args()
    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}"}
    if "jaccard" in args.parts:
        result["jaccard"] = [row for kind in args.metadata
                             for row in bench_jaccard(args.sizes, args.values, args.m, args.queries, args.full_up_to, kind,
                                                      args.cap_share if kind == "tags" else 0.0,
                                                      lsh=kind == "tags" and not args.no_lsh)]
    if "sweep" in args.parts:
        result["sweep"] = bench_sweep(args.sweep_images, args.sweep_epochs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"results → {args.out}")


if __name__ == "__main__":
    main()
