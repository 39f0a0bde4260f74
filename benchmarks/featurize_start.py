"""Featurize's start-up before the first image (issue 15): the pipeline's input built the old way
(`ray.data.from_arrow` of one table per `block_rows` manifest rows: one 1-CPU metadata task per
table) against the new one (`tagray.features.pipeline.manifest_rows`: the rows put once, a
`from_items` of start rows built in the driver), at 1× and 10× the rows, on a local Ray.

    .venv/bin/python benchmarks/featurize_start.py --images 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import pyarrow as pa


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--block-rows", type=int, default=32)
    p.add_argument("--out", default="benchmarks/results/featurize_start.json")
    args = p.parse_args()

    import ray

    from tagray.features.pipeline import manifest_rows

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    rows = []
    for n in args.images:
        table = pa.table({"image_id": [f"img{i:09d}" for i in range(n)], "uri": [f"s3://b/{i}.jpg" for i in range(n)]})
        t0 = time.perf_counter()
        blocks = [table.slice(i, args.block_rows) for i in range(0, n, args.block_rows)]
        ray.data.from_arrow(blocks)
        old = time.perf_counter() - t0
        t0 = time.perf_counter()
        ds = manifest_rows(table, args.block_rows, float(os.cpu_count()), 0.25)
        new = time.perf_counter() - t0
        assert ds.count() == n  # the new input yields every row once
        rows.append({"images": n, "blocks": len(blocks), "from_arrow_s": round(old, 2), "manifest_rows_s": round(new, 3),
                     "ratio": round(old / new, 1)})
        print(rows[-1], flush=True)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}", "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"results → {args.out}")


if __name__ == "__main__":
    main()
