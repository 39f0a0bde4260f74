"""One shard's tag search in process, by scale: the AND ranking (seed 001 §5.3) by summing every
image (and_scores + an exact top n), by `layout.top_and` as of an earlier commit (imported from
`git show COMMIT:tagray/index/layout.py`), and by today's `layout.top_and` with 1 and 2 threads,
bounding sums from the float16 patterns (`_scan`) and from the coarse codes a Searcher holds
(`_scan_codes`, ServeConfig.scan_codes), on the first N images of a built shard (1×, 10×, 100×),
the same queries for each, answers compared. The shard's rows are read into RAM first, as a
Searcher holds them.

    .venv/bin/python benchmarks/search_shard.py --shard DIR/k1/shard-00000 --images 100000 1000000 10000000
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tagray.index import layout  # noqa: E402


def layout_at(commit: str):
    """tagray/index/layout.py as of `commit`, as a module of its own."""
    text = subprocess.run(["git", "show", f"{commit}:tagray/index/layout.py"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / f"layout_{commit}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"layout_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sum_everything(log_p: np.ndarray, cols: list[int], n: int) -> tuple[np.ndarray, np.ndarray]:
    total = layout.and_scores(log_p, cols)
    rows = layout._exact_top(total, n)
    return rows, total[rows]


def timed(fn, queries: list[list[int]], repeat: int) -> tuple[dict, list]:
    ms, answers = [], []
    for cols in queries:
        best = np.inf
        for _ in range(repeat):
            t = time.perf_counter()
            out = fn(cols)
            best = min(best, time.perf_counter() - t)
        ms.append(1000 * best)
        answers.append((out[0].tolist(), out[1].tolist()))
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "max_ms": round(float(max(ms)), 2)}, answers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shard", required=True, help="a shard directory of `tagray index` (its log_p.npy)")
    p.add_argument("--images", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    p.add_argument("--tags", type=int, default=40, help="queries draw from the first TAGS columns")
    p.add_argument("--queries", type=int, default=100, help="queries per query size")
    p.add_argument("--repeat", type=int, default=3, help="runs per query (the fastest counts)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--before", default="092539c", help="the commit whose top_and is the baseline")
    p.add_argument("--out", default="benchmarks/results/search_shard.json")
    args = p.parse_args()

    stored = np.load(Path(args.shard) / "log_p.npy", mmap_mode="r")
    before = layout_at(args.before)
    rng = np.random.default_rng(0)
    queries = {m: [[int(c) for c in rng.choice(args.tags, m, replace=False)] for _ in range(args.queries)]
               for m in (1, 2, 3)}
    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
                    "command": " ".join(sys.argv), "shard": args.shard, "k": args.k, "before": args.before, "runs": []}
    for images in args.images:
        log_p = np.array(stored[: args.tags, :images])  # into RAM
        t0 = time.perf_counter()
        codes = layout.coarse_codes(log_p)
        methods = {"sum_every_image": lambda c, lp=log_p: sum_everything(lp, c, args.k),
                   f"top_and_{args.before}": lambda c, lp=log_p: before.top_and(lp, c, args.k),
                   "top_and_1_thread": lambda c, lp=log_p: layout.top_and(lp, c, args.k),
                   "top_and_2_threads": lambda c, lp=log_p: layout.top_and(lp, c, args.k, threads=2),
                   "codes_1_thread": lambda c, lp=log_p, cc=codes: layout.top_and(lp, c, args.k, codes=cc),
                   "codes_2_threads": lambda c, lp=log_p, cc=codes: layout.top_and(lp, c, args.k, threads=2, codes=cc)}
        run: dict = {"images": images, "codes_seconds": round(time.perf_counter() - t0, 3),
                     "codes_seconds_per_million_values": round((time.perf_counter() - t0) / log_p.size * 1e6, 4)}
        for m, qs in queries.items():
            row, answers = {}, {}
            for name, fn in methods.items():
                row[name], answers[name] = timed(fn, qs, args.repeat)
            row["same_answers"] = all(a == answers["sum_every_image"] for a in answers.values())
            run[f"{m}_tag"] = row
            print(images, f"{m}-tag", json.dumps(row), flush=True)
        result["runs"].append(run)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"results → {args.out}")


if __name__ == "__main__":
    main()
