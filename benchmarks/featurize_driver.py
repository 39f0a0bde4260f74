"""The featurize driver's CPU per image: before (the driver pulled every feature vector
through `iter_batches` into a `ShardWriter`) and after (issue 15 item 1: the workers write
the shards, the driver iterates bookkeeping records only), in the same run.

Each run is its own process (`--child`) with its own local Ray cluster, importing tagray from
a given source tree: this checkout ("after") or `git archive OLD_REF` unpacked into a
temporary directory ("before"), so the old path is measured from its own code, not a copy of
it kept in the package. Driver CPU is `resource.getrusage(RUSAGE_SELF)` (user + system, every
thread of the driver process: the script, Ray Data's streaming executor, the core worker's IO
threads) and `time.process_time()` around `featurize()` only; the backbone is prepared before
(a cheap one: random weights, small crops, so the actors are not the whole cost). Workers,
raylet and GCS are other processes and are not counted.

    .venv/bin/python benchmarks/featurize_driver.py --images 200 --scales 1,10,100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OLD_REF = "6c9111e"  # the last commit whose featurize wrote shards in the driver


def child(root: str, manifest: str, out: str, cfg_json: str) -> None:
    """One measured run in this process, with tagray imported from `root` (PYTHONPATH)."""
    import ray

    import tagray
    from tagray.features.pipeline import FeaturizeConfig, featurize, prepare_backbone
    from tagray.runtime import init_ray

    assert Path(tagray.__file__).resolve().is_relative_to(Path(root).resolve()), (tagray.__file__, root)
    known = FeaturizeConfig.__dataclass_fields__  # the old code lacks fields added since (write_cpus)
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(cfg_json).items() if k in known}
    cfg = FeaturizeConfig(**fields)
    prepared = prepare_backbone(cfg)
    init_ray(num_cpus=os.cpu_count() or 1)

    @ray.remote
    def where() -> str:
        import tagray as t

        return t.__file__

    worker_tagray = ray.get(where.remote())
    assert Path(worker_tagray).resolve().is_relative_to(Path(root).resolve()), (worker_tagray, root)
    t0 = resource.getrusage(resource.RUSAGE_THREAD)
    r0, c0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
    summary = featurize(manifest, out, cfg, prepared=prepared)
    r1, c1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
    t1 = resource.getrusage(resource.RUSAGE_THREAD)
    print("RESULT " + json.dumps({
        "images": summary["processed"], "featurized": summary["featurized"], "errors": summary["errors"],
        "shards": len(summary["shards"]), "dim": summary["backbone"]["dim"],
        "driver_cpu_s": round((r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), 3),
        "driver_user_s": round(r1.ru_utime - r0.ru_utime, 3), "driver_sys_s": round(r1.ru_stime - r0.ru_stime, 3),
        "driver_process_time_s": round(c1 - c0, 3), "wall_s": round(w1 - w0, 2),
        # the thread that runs featurize(): the old path's ShardWriter (concatenate, Arrow, Parquet, upload)
        "driver_main_thread_cpu_s": round((t1.ru_utime - t0.ru_utime) + (t1.ru_stime - t0.ru_stime), 3),
        "driver_max_rss_mb": round(r1.ru_maxrss / 1024, 1),  # peak of the whole process (Linux: KiB)
        "driver_record_bytes": summary.get("driver_record_bytes"),
        "tagray": str(Path(tagray.__file__).parent), "worker_tagray": str(Path(worker_tagray).parent),
    }), flush=True)
    ray.shutdown()


def run_child(root: Path, manifest: str, out: str, cfg: dict, timeout_s: float, tries: int = 3) -> dict:
    """One measured run in a fresh process; tried again (into a fresh directory) only when its
    local Ray did not start (Ray gives a raylet 30 s, which a loaded machine can miss)."""
    env = {**os.environ, "PYTHONPATH": str(root), "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    for attempt in range(tries):
        where = f"{out}-try{attempt}"
        proc = subprocess.run([sys.executable, __file__, "--child", str(root), manifest, where, json.dumps(cfg)],
                              env=env, cwd=str(root), capture_output=True, text=True, timeout=timeout_s)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode == 0 and lines:
            return json.loads(lines[-1][len("RESULT "):])
        if "timed out during startup" not in proc.stderr:
            break
    raise RuntimeError(f"run in {root} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


def old_tree(ref: str, dest: Path) -> Path:
    """`git archive ref` unpacked into dest (read-only use of the repository)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=200, help="images at scale 1")
    p.add_argument("--scales", default="1,10,100", help="multiples of --images, each run before and after")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--image-size", type=int, default=32, help="crop fed to the backbone (small: cheap actors)")
    p.add_argument("--jpeg-size", type=int, default=64, help="side of the generated images")
    p.add_argument("--shard-rows", type=int, default=1000)
    p.add_argument("--old-ref", default=OLD_REF, help="git ref of the 'before' code")
    p.add_argument("--timeout-s", type=float, default=900, help="per run")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/featurize_driver.json"))
    args = p.parse_args()
    scales = [int(s) for s in args.scales.split(",")]
    sys.path.insert(0, str(ROOT))
    from tagray.config import to_dict
    from tagray.data.schema import read_manifest, write_manifest
    from tagray.data.synth import SynthConfig, synthesize
    from tagray.features.pipeline import FeaturizeConfig

    work = Path(tempfile.mkdtemp(prefix="tagray-bench-featdriver-"))
    before_root = old_tree(args.old_ref, work / "before")
    n_max = args.images * max(scales)
    corpus = synthesize(SynthConfig(images=n_max, image_size=args.jpeg_size, seed=7), str(work / "corpus"))
    manifest = read_manifest(corpus["manifest"])
    import ray

    ray.shutdown()  # synthesize's renderer started one; each measured run starts its own
    cfg = FeaturizeConfig(backbone=args.backbone, weights="random", image_size=args.image_size,
                          resize_size=args.image_size, shard_rows=args.shard_rows)
    cfg_dict = json.loads(json.dumps(to_dict(cfg)))
    results = []
    for scale in scales:
        n = args.images * scale
        m = str(work / f"m-{n}.parquet")
        write_manifest(manifest.slice(0, n), m)
        row: dict = {"scale": scale, "images": n}
        for label, root in (("before", before_root), ("after", ROOT)):
            r = run_child(root, m, str(work / f"f-{label}-{n}"), cfg_dict, args.timeout_s)
            assert r["featurized"] == n, r
            r["driver_cpu_ms_per_image"] = round(1000 * r["driver_cpu_s"] / n, 4)
            r["driver_main_thread_cpu_ms_per_image"] = round(1000 * r["driver_main_thread_cpu_s"] / n, 4)
            row[label] = r
        row["feature_bytes_through_driver_before"] = n * r["dim"] * 4  # every vector, float32
        row["cpu_per_image_after_over_before"] = round(row["after"]["driver_cpu_s"] / row["before"]["driver_cpu_s"], 3)
        results.append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".partial").write_text(json.dumps(results, indent=1) + "\n")
    # Marginal cost per image between the two largest scales (the fixed start-up cost cancels).
    marginal: dict = {}
    if len(scales) > 1:
        lo, hi = results[-2], results[-1]
        for label in ("before", "after"):
            marginal[label] = {k: round(1000 * (hi[label][k] - lo[label][k]) / (hi["images"] - lo["images"]), 4)
                               for k in ("driver_cpu_s", "driver_main_thread_cpu_s")}
    import torch

    out = {
        "command": "benchmarks/featurize_driver.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs), Python "
                   f"{platform.python_version()}, torch {torch.__version__}",
        "before": f"git {args.old_ref} (driver: iter_batches of features → ShardWriter)",
        "after": "this checkout (workers write shards; driver: bookkeeping records)",
        "config": {"backbone": args.backbone, "weights": "random", "image_size": args.image_size,
                   "jpeg_size": args.jpeg_size, "shard_rows": args.shard_rows, "batch_size": cfg.batch_size},
        "results": results,
        "marginal_ms_per_image_between_two_largest_scales": marginal,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:6])
    else:
        main()
