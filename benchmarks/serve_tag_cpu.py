"""Where the CPU of `POST /v1/tag` goes at concurrency 16 (issue 15 item 6): CPU ms per request of
every process on the machine (psutil, before/after the load), with Serve's access log on and off
(A/B/A/B), against the model-bound ceiling of the same run — the app and load of
`benchmarks/serve_load.py` (ResNet-18 random weights + RLR head, 256-px JPEGs, batch_size 16,
Tagger 1 CPU, a 16-thread `requests` client on the same cores).

    .venv/bin/python benchmarks/serve_tag_cpu.py [--requests 240]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import serve_load  # noqa: E402


def cpu_seconds() -> dict[int, tuple[str, float]]:
    out = {}
    for p in psutil.process_iter(["pid", "cmdline", "name", "cpu_times"]):
        try:
            t = p.info["cpu_times"]
            out[p.info["pid"]] = ((" ".join(p.info["cmdline"] or []) or p.info["name"])[:80], t.user + t.system)
        except (psutil.Error, TypeError):
            continue
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=240)
    p.add_argument("--port", type=int, default=8319)
    p.add_argument("--out", default="benchmarks/results/serve_tag_cpu.json")
    args = p.parse_args()
    from ray import serve

    from tagray.data.render import encode_jpeg, make_signatures, render_image
    from tagray.runtime import init_ray
    from tagray.serve.app import build_app

    init_ray()
    rng = np.random.default_rng(0)
    signatures = make_signatures(40, rng)
    jpegs = [encode_jpeg(render_image(list(rng.choice(40, 2, replace=False)), signatures, 256, rng), 90)
             for _ in range(64)]
    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
                    "command": " ".join(sys.argv), "runs": []}
    with tempfile.TemporaryDirectory() as d:
        model = serve_load.make_model(f"{d}/model", 512, serve_load.IDENTITY)
        result["ceiling_images_per_s"] = serve_load.model_ceiling(model, jpegs, [16], 1)["images_per_s_batch_16"]
        for access in (True, False, True, False):
            logging = {"enable_access_log": access}
            serve.start(http_options={"host": "127.0.0.1", "port": args.port}, logging_config=logging)
            serve.run(build_app({"model": model, "index": None, "batch_size": 16, "tagger_cpus": 1.0}), name="tagray",
                      route_prefix="/", logging_config=logging)
            url = f"http://127.0.0.1:{args.port}/"
            serve_load.load(url, jpegs, 16, 32)  # warm-up
            before, t0 = cpu_seconds(), time.perf_counter()
            row = serve_load.load(url, jpegs, 16, args.requests)
            wall, after = time.perf_counter() - t0, cpu_seconds()
            per_process = sorted(((1000 * (c - before[pid][1]) / args.requests, name) for pid, (name, c) in after.items()
                                  if pid in before and c - before[pid][1] > 0.02), reverse=True)
            row.update({"access_log": access, "share_of_ceiling": row["images_per_s"] / result["ceiling_images_per_s"],
                        "cpu_ms_per_request": {name: round(ms, 2) for ms, name in per_process[:12]},
                        "cpu_ms_per_request_total": round(sum(ms for ms, _ in per_process), 1),
                        "core_ms_per_request_available": round(1000 * wall * (os.cpu_count() or 1) / args.requests, 1)})
            print(json.dumps(row), flush=True)
            result["runs"].append(row)
            serve.shutdown()
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"results → {args.out}")


if __name__ == "__main__":
    main()
