"""Index build throughput and memory: the sharded Ray Data build (`tagray index --shards K`,
K = 1, 2, 4) against the old driver-only build (tagray.serve.index.build_prediction_index, all
features and predictions in the driver), in the same run, on `synth --features-only` corpora;
what int8 log-probabilities would lose against the float16 layout; the embed index flat vs
IVF-PQ (recall@20 against exact, bytes per image).

The baseline runs in its own process, so its peak RSS is that build's alone (ru_maxrss of the
driver); the sharded builds run on one local Ray cluster started once, each Ray worker reporting
its own peak RSS (the "driver_peak_rss_mb" of a sharded build is then this script's, cumulative). The models are random heads of the corpus's
vocabulary (a build's cost does not depend on the weights' values).

    .venv/bin/python benchmarks/index_build.py --images 1000000 --dim 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TAGRAY = str(Path(sys.executable).parent / "tagray")


def make_models(corpus: dict, out: Path, dim: int, seed: int) -> tuple[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from tagray.data.normalize import NormalizerConfig, TagNormalizer
    from tagray.data.schema import validate_manifest
    from tagray.features import store
    from tagray.heads.artifact import SavedHead, save_head
    from tagray.heads.embed_artifact import SavedEmbedHead, save_embed_head
    from tagray.heads.embedding import EmbedConfig, TagMLP
    from tagray.heads.fit import HeadConfig
    from tagray.heads.linear import LinearTagger
    from tagray.heads.targets import prepare_vocabulary

    sample = pq.read_table(corpus["manifest"]).slice(0, 100_000)
    validate_manifest(sample, corpus["manifest"])
    sample = sample.append_column("split", pa.array(["train"] * sample.num_rows))
    vocab = prepare_vocabulary(sample, TagNormalizer(NormalizerConfig(lemmatize=False)))
    identity = store.features_identity(corpus["features"])
    torch.manual_seed(seed)
    lin = LinearTagger(dim, len(vocab))
    with torch.no_grad():
        lin.linear.weight.normal_(0, 1.0 / dim**0.5)
        lin.linear.bias.normal_(-2, 1.0)
    save_head(SavedHead(lin, vocab, HeadConfig(head="lr"), identity, np.ones(len(vocab), np.int64),
                        np.ones(len(vocab), bool)), str(out / "lr"))
    mlp = TagMLP(dim, (64,), 32)
    save_embed_head(SavedEmbedHead(mlp, torch.randn(len(vocab), 32), list(vocab.tags), vocab,
                                   EmbedConfig(hidden=(64,), word_dim=32), identity, np.ones(len(vocab), np.int64),
                                   np.zeros(len(vocab), bool), "random"), str(out / "embed"))
    return str(out / "lr"), str(out / "embed")


def stage_baseline(model: str, features: str, manifest: str, out: str) -> dict:
    """The old build, in this process: every feature and prediction through the driver."""
    from tagray.data.schema import read_manifest
    from tagray.features.store import read_features
    from tagray.heads.models import load_model
    from tagray.serve.index import build_prediction_index, save_prediction_index

    t0 = time.perf_counter()
    head = load_model(model)
    table, _ = read_features(features)
    index = build_prediction_index(head, table, read_manifest(manifest), model)
    save_prediction_index(index, out)
    secs = time.perf_counter() - t0
    n = len(index.image_ids)
    return {"rows": n, "seconds": secs, "rows_per_s": n / secs,
            "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_json(argv: list[str], timeout: int = 3600) -> dict | list:
    t0 = time.perf_counter()
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    start = p.stdout.find("[\n {")
    result = json.loads(p.stdout[start if start >= 0 else p.stdout.index("{"):])
    if isinstance(result, dict):
        result["process_seconds"] = time.perf_counter() - t0
    return result


def sharded(model: str, corpus: dict, out: Path, k: int, *extra: str) -> dict:
    """`tagray index --shards K` in this process (Ray started once for the whole run)."""
    import contextlib
    import io

    from tagray import cli

    argv = ["index", "--model", model, "--features", corpus["features"], "--manifest", corpus["manifest"],
            "--out", str(out), "--shards", str(k), "--json", *extra]
    t0 = time.perf_counter()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(argv)
    if rc != 0:
        raise RuntimeError(f"tagray {' '.join(argv)} failed ({rc})")
    text = buf.getvalue()
    (summary,) = json.loads(text[text.find("[\n {"):])
    summary["process_seconds"] = time.perf_counter() - t0
    summary["bytes_on_disk"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    summary["workers_peak_rss_mb"] = max(w["peak_rss_mb"] for w in summary["workers"])
    # the shard tasks' own time (reading features, the head, writing the shard), without the pool's start
    busy: dict[int, float] = {}
    for w in summary["workers"]:
        busy[w["pid"]] = busy.get(w["pid"], 0.0) + w["seconds"]
    summary["actors"] = len(busy)
    summary["task_seconds_max_actor"] = max(busy.values())
    summary["rows_per_s_in_tasks"] = summary["rows"] / max(busy.values())
    return summary


def int8_loss(index_dir: Path, tags: int, seed: int) -> dict:
    from tagray.index import layout

    log_p = np.load(index_dir / "shard-00000" / "log_p.npy")
    rng = np.random.default_rng(seed)
    common = list(range(min(tags, 40)))  # queries over the 40 most frequent tags (vocabulary order)
    queries = [list(rng.choice(common, m, replace=False)) for m in (1, 2, 3) for _ in range(20)]
    return layout.quantisation_loss(log_p, queries, k=20)


def embed_compare(embed_model: str, corpus: dict, work: Path, factory: str, train_sample: int, seed: int) -> dict:
    from tagray.heads.models import load_image_tagger
    from tagray.index import open_index, search_all

    flat = sharded(embed_model, corpus, work / "embed_flat", 2)
    approx = sharded(embed_model, corpus, work / "embed_ivfpq", 2, "--factory", factory, "--train-sample", str(train_sample))
    head = load_image_tagger(embed_model)
    fi, ai = open_index(str(work / "embed_flat")), open_index(str(work / "embed_ivfpq"))
    rng = np.random.default_rng(seed)
    recalls = []
    for _ in range(30):
        q = head.vectors[rng.choice(len(head.vocab), int(rng.integers(1, 4)), replace=False)].sum(0).numpy()
        exact = {h.image_id for h in search_all(fi, head, vector=q, k=20)}
        got = {h.image_id for h in search_all(ai, head, vector=q, k=20)}
        recalls.append(len(exact & got) / 20)
    n = fi.images

    def vec_bytes(d: Path) -> int:
        return sum(p.stat().st_size for p in d.glob("shard-*/vectors.faiss"))

    return {"factory": factory, "train_sample": train_sample, "recall_at_20": float(np.mean(recalls)),
            "bytes_per_image": {"flat": vec_bytes(work / "embed_flat") / n, factory: vec_bytes(work / "embed_ivfpq") / n},
            "build_rows_per_s": {"flat": flat["rows_per_s"], factory: approx["rows_per_s"]},
            "build_seconds": {"flat": flat["seconds"], factory: approx["seconds"]}}


def bench(images: int, dim: int, concepts: int, shards: list[int], work: Path, seed: int, factory: str,
          train_sample: int, parts: set[str]) -> dict:
    from tagray.data.synth import SynthConfig, synthesize

    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    corpus = {"manifest": str(work / "corpus" / "manifest.parquet"), "features": str(work / "corpus" / "features.parquet")}
    if not (Path(corpus["features"]).exists() and Path(corpus["manifest"]).exists()):  # a rerun reuses the corpus
        synthesize(SynthConfig(images=images, concepts=concepts, seed=seed, feature_dim=dim), str(work / "corpus"),
                   features_only=True)
    synth_s = time.perf_counter() - t0
    lr, embed_model = make_models(corpus, work, dim, seed)
    from tagray.heads.models import load_image_tagger

    tags = len(load_image_tagger(lr).vocab)
    print(f"{images} images × {dim}-D, {tags} tags: corpus in {synth_s:.0f}s", flush=True)
    out: dict = {"images": images, "dim": dim, "tags": tags, "synth_seconds": synth_s}
    if "baseline" in parts:
        out["baseline_driver_only"] = run_json([sys.executable, __file__, "--stage", "baseline", "--model", lr,
                                                "--features", corpus["features"], "--manifest", corpus["manifest"],
                                                "--out", str(work / "baseline")])
        print("baseline", json.dumps(out["baseline_driver_only"]), flush=True)
    out["sharded"] = {}
    for k in shards:
        s = sharded(lr, corpus, work / f"lr_k{k}", k, "--no-similar")
        out["sharded"][f"K={k}"] = {key: s[key] for key in ("rows", "seconds", "rows_per_s", "process_seconds",
                                                            "driver_peak_rss_mb", "workers_peak_rss_mb", "bytes_on_disk",
                                                            "actors", "task_seconds_max_actor", "rows_per_s_in_tasks")}
        out["sharded"][f"K={k}"]["workers"] = s["workers"]
        print(f"K={k}", json.dumps(out["sharded"][f"K={k}"]), flush=True)
    log_p_bytes = (work / f"lr_k{shards[0]}").rglob("log_p.npy")
    out["log_p_bytes_per_image_tag"] = sum(p.stat().st_size for p in log_p_bytes) / (images * tags)
    if "similar" in parts:
        with_similar = sharded(lr, corpus, work / "lr_similar", max(shards), "--similar")
        out["similar_store"] = {"rows_per_s": with_similar["rows_per_s"],
                                "bytes_per_image": sum(p.stat().st_size for p in (work / "lr_similar").rglob("vectors.faiss")) / images}
    if "int8" in parts:
        out["int8_vs_float16"] = int8_loss(work / f"lr_k{1 if 1 in shards else shards[0]}", tags, seed)
        print("int8", json.dumps(out["int8_vs_float16"]), flush=True)
    if "embed" in parts:
        out["embed_index"] = embed_compare(embed_model, corpus, work, factory, train_sample, seed)
        print("embed", json.dumps(out["embed_index"]), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", default="1000000", help="comma-separated corpus sizes")
    p.add_argument("--dim", type=int, default=64, help="feature dimension D (64 keeps 10M within 24 GB)")
    p.add_argument("--concepts", type=int, default=40)
    p.add_argument("--shards", default="1,2,4")
    p.add_argument("--factory", default="IVF1024,PQ16")
    p.add_argument("--train-sample", type=int, default=50_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-embed", action="store_true", help="the same as leaving embed out of --parts")
    p.add_argument("--parts", default="baseline,sharded,similar,int8,embed",
                   help="what to run besides the sharded builds (comma-separated); at 10M the driver-only "
                        "baseline holds every prediction (N × T × 4 bytes) in one process")
    p.add_argument("--work", default="/tmp/indexer-bench")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "index_build.json"))
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--features", default=None, help=argparse.SUPPRESS)
    p.add_argument("--manifest", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stage == "baseline":
        print(json.dumps(stage_baseline(args.model, args.features, args.manifest, args.out)))
        return
    shards = [int(k) for k in args.shards.split(",")]
    from tagray.runtime import init_ray

    for attempt in range(3):  # one local cluster for every sharded build of the run; a loaded machine's
        try:                  # raylet may miss Ray's fixed 30 s start-up wait
            init_ray(num_cpus=os.cpu_count())
            break
        except Exception:
            import ray

            ray.shutdown()
            if attempt == 2:
                raise
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()} "
                         "(2-core VM, shared with other jobs)",
              "command": " ".join(sys.argv), "runs": []}
    for n in (int(x) for x in args.images.split(",")):
        result["runs"].append(bench(n, args.dim, args.concepts, shards, Path(args.work) / f"n{n}", args.seed,
                                    args.factory, args.train_sample,
                                    set(args.parts.split(",")) - ({"embed"} if args.skip_embed else set())))
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    import ray

    ray.shutdown()


if __name__ == "__main__":
    main()
