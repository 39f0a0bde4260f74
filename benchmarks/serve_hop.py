"""The floor of a Serve request on this machine, without tagray: a FastAPI ingress deployment that
answers at once (`/direct`), and one that awaits a trivial second deployment through a handle
(`/hop`: what every tagray search pays for its Ingress → Searcher call), each asked sequentially
over loopback HTTP, alternating, after a warm-up. What a search's p50 / p99 cannot go below here.
With --env KEY=VALUE …, a second copy of the app whose replicas run with those environment
variables (Serve's own settings, e.g. RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP=0) is asked in the
same rounds, so both meet the same hour of the machine.

    .venv/bin/python benchmarks/serve_hop.py [--requests 300] [--rounds 2] [--env KEY=VALUE ...]
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
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(env: dict[str, str]):
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()
    options = {"num_cpus": 0.25, **({"runtime_env": {"env_vars": env}} if env else {})}

    @serve.deployment(name="Back", ray_actor_options=options)
    class Back:
        def search(self, q: str) -> dict:  # a sync method, as tagray's Searcher's
            return {"hits": [{"image_id": f"img{i}", "uri": "x", "score": 0.5} for i in range(20)], "q": q}

    @serve.deployment(name="Front", ray_actor_options=options)
    @serve.ingress(api)
    class Front:
        def __init__(self, back) -> None:
            self.back = back

        @api.get("/direct")
        async def direct(self, q: str) -> dict:
            return {"q": q}

        @api.get("/hop")
        async def hop(self, q: str) -> dict:
            return await self.back.search.remote(q)

    return Front.bind(Back.bind())


def sequential(url: str, requests_: int, warmup: int = 20) -> dict:
    ms = []
    for i in range(warmup + requests_):
        t = time.perf_counter()
        requests.get(url, params={"q": "a,b"}, timeout=30).raise_for_status()
        if i >= warmup:
            ms.append(1000 * (time.perf_counter() - t))
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--rounds", type=int, default=2, help="direct, hop, direct, hop, …")
    p.add_argument("--port", type=int, default=8331)
    p.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE",
                   help="also an app whose replicas run with these environment variables")
    p.add_argument("--out", default="benchmarks/results/serve_hop.json")
    args = p.parse_args()

    from ray import serve

    from tagray.runtime import init_ray

    init_ray()
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    env = dict(kv.split("=", 1) for kv in args.env)
    apps = {"default": ""}
    serve.run(build({}), name="hop", route_prefix="/", blocking=False)
    if env:
        serve.run(build(env), name="hop_env", route_prefix="/env", blocking=False)
        apps["env"] = "env/"
    base = f"http://127.0.0.1:{args.port}/"
    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), Python {platform.python_version()}",
                    "command": " ".join(sys.argv), "requests": args.requests, "env": env, "rounds": []}
    for r in range(args.rounds):
        row = {f"{app}_{path}" if env else path: sequential(base + prefix + path, args.requests)
               for app, prefix in apps.items() for path in ("direct", "hop")}
        result["rounds"].append(row)
        print(f"round {r + 1}: {row}", flush=True)
    serve.shutdown()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"results → {args.out}")


if __name__ == "__main__":
    main()
