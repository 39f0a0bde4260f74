"""`tagray import yfcc100m` throughput and peak memory against a plain `csv`-module read.

Generates a YFCC100M-like dataset file (25 tab-separated columns, URL-encoded user tags
with `+` for a space, 1 % videos), then runs, each in its own process so that peak RSS is
its own: (a) `tagray import yfcc100m FILE --out M` (the whole command: parse, check,
decode tags, write the Parquet manifest) and (b) `csv.reader(f, delimiter="\\t")` over the
same file, counting photos by the marker column (the floor a Python reader cannot beat).

    .venv/bin/python benchmarks/import_yfcc.py --rows 1000000 --out runs/bench_import_yfcc

Writes benchmarks/results/import_yfcc.json (or --results).
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
from urllib.parse import quote_plus

import numpy as np


def generate(path: Path, rows: int, seed: int = 0) -> None:
    """A dataset file: Zipf-distributed tags from a 50,000-word vocabulary (some multi-word,
    some non-ASCII), 0–15 tags a photo (a third untagged), 10,000 users, 1 % videos."""
    rng = np.random.default_rng(seed)
    words = [f"word{i}" for i in range(50_000)]
    for i in range(0, 50_000, 7):
        words[i] = f"new york {i}"
    for i in range(3, 50_000, 101):
        words[i] = f"東京{i}"
    vocab = np.array([quote_plus(w) for w in words], dtype=object)
    chunk = 50_000
    with open(path, "w", encoding="utf-8") as f:
        for lo in range(0, rows, chunk):
            k = min(rows, lo + chunk) - lo
            n_tags = np.where(rng.random(k) < 0.33, 0, rng.integers(1, 16, k))
            tag_ids = (rng.zipf(1.3, int(n_tags.sum())) - 1) % len(vocab)
            users = rng.integers(0, 10_000, k)
            video = rng.random(k) < 0.01
            lines, t = [], 0
            for j in range(k):
                i = lo + j
                pid = 100_000_000 + i
                tags = ",".join(vocab[tag_ids[t : t + n_tags[j]]])
                t += n_tags[j]
                lines.append(
                    f"{i}\t{pid}\t{pid:032x}\t{users[j]}@N0{users[j] % 9}\tnick+{users[j]}\t2010-07-04 12:00:00.0\t"
                    f"1278259200\tCanon+EOS+400D\ta+title+{i}\tsome+description\t{tags}\t\t-0.1\t51.5\t16\t"
                    f"http://www.flickr.com/photos/u/{pid}/\thttp://farm6.staticflickr.com/5/{pid}_abc.jpg\t"
                    f"Attribution License\thttp://creativecommons.org/licenses/by/2.0/\t5\t6\tabc\tdef\tjpg\t"
                    f"{int(video[j])}\n"
                )
            f.write("".join(lines))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_import(path: str, out: str) -> dict:
    from tagray.commands.importer import main

    t0 = time.perf_counter()
    rc = main(["yfcc100m", path, "--out", out])
    seconds = time.perf_counter() - t0
    summary = json.loads(Path(out[: -len(".parquet")] + ".summary.json").read_text())
    return {"rc": rc, "seconds": seconds, "photos": summary["rows"], "skipped": summary["skipped"]}


def run_csv(path: str) -> dict:
    import csv

    t0 = time.perf_counter()
    photos = rows = 0
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            rows += 1
            photos += row[24] == "0"
    return {"seconds": time.perf_counter() - t0, "photos": photos, "rows": rows}


def _child(kind: str, path: str, out: str) -> dict:
    """Runs one reader in a fresh interpreter; its own peak RSS comes back with the result."""
    cmd = [sys.executable, __file__, "--child", kind, "--file", path, "--manifest", out]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=3600)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--out", default="runs/bench_import_yfcc", help="directory for the generated file and manifest")
    p.add_argument("--results", default="benchmarks/results/import_yfcc.json")
    p.add_argument("--child", choices=("import", "csv"), help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    p.add_argument("--manifest", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        start_rss = _peak_rss_mb()
        result = run_import(args.file, args.manifest) if args.child == "import" else run_csv(args.file)
        result.update(peak_rss_mb=round(_peak_rss_mb(), 1), rss_before_mb=round(start_rss, 1))
        print(json.dumps(result))
        return

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"yfcc100m_dataset-{args.rows}"
    if not data.exists():
        t0 = time.perf_counter()
        generate(data, args.rows)
        print(f"generated {data} ({data.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f} s")
    size = data.stat().st_size
    manifest = str(out / "manifest.parquet")
    results = {}
    for kind in ("csv", "import"):
        r = _child(kind, str(data), manifest)
        r["rows_per_second"] = round(args.rows / r["seconds"])
        r["mb_per_second"] = round(size / 1e6 / r["seconds"], 1)
        r["seconds"] = round(r["seconds"], 2)
        results[kind] = r
        print(kind, json.dumps(r))
    report = {
        "rows": args.rows,
        "file_mb": round(size / 1e6, 1),
        "manifest_mb": round(os.path.getsize(manifest) / 1e6, 1),
        "csv_module": results["csv"],
        "tagray_import": results["import"],
        "import_vs_csv_speed": round(results["import"]["rows_per_second"] / results["csv"]["rows_per_second"], 2),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
