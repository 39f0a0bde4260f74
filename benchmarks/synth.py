"""Synthetic-corpus throughput: `synth --features-only` and `stats` at scale.

Compares, in the same run, the full features-only corpus (latent tags + features +
manifest + truth) against a floor that only draws an N × D float32 Gaussian matrix and
writes it as the same Parquet features column — the unavoidable part of the work.

    .venv/bin/python benchmarks/synth.py --images 1000000 --dim 512 --out runs/bench_synth
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tagray.data.normalize import TagNormalizer
from tagray.data.schema import features_schema, read_manifest
from tagray.data.stats import tag_statistics
from tagray.data.synth import SynthConfig, synthesize


def floor(n: int, d: int, path: str) -> float:
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    with pq.ParquetWriter(path, features_schema(d)) as w:
        for lo in range(0, n, 65_536):
            k = min(n, lo + 65_536) - lo
            x = rng.standard_normal((k, d), dtype=np.float32)
            ids = pa.array([f"img{i:07d}" for i in range(lo, lo + k)])
            w.write_table(pa.table({"image_id": ids, "feature": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), d)},
                                   schema=features_schema(d)))
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--concepts", type=int, default=40)
    p.add_argument("--out", default="runs/bench_synth")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tagray-bench-"))
    try:
        t_floor = floor(args.images, args.dim, str(work / "floor.parquet"))
        cfg = SynthConfig(images=args.images, feature_dim=args.dim, concepts=args.concepts)
        t0 = time.perf_counter()
        out = synthesize(cfg, str(work / "corpus"), features_only=True)
        t_synth = time.perf_counter() - t0
        manifest = read_manifest(out["manifest"])
        normalizer = TagNormalizer()
        normalizer.normalize_tag("warm")  # WordNet load is not part of the measurement
        t0 = time.perf_counter()
        stats = tag_statistics(manifest, normalizer)
        t_stats = time.perf_counter() - t0
        result = {
            "images": args.images,
            "dim": args.dim,
            "concepts": args.concepts,
            "synth_features_only_s": round(t_synth, 1),
            "floor_gaussian_plus_parquet_s": round(t_floor, 1),
            "synth_over_floor": round(t_synth / t_floor, 2),
            "stats_s": round(t_stats, 1),
            "stats_images_per_s": round(args.images / t_stats),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "median_tagging_likelihood": stats["labels"]["median_tagging_likelihood"],
            "machine": f"{platform.processor() or platform.machine()}, {__import__('os').cpu_count()} CPUs",
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "synth.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
