"""What a changed serving setting costs a running app (tagray/serve/app.py READS): redeploying with
new API keys (read by the Ingress alone: the Tagger keeps running) against a new Tagger setting
(`batch_size`: the Tagger replica is replaced, rebuilding its backbone — what any setting cost before
each deployment was versioned by the settings it reads), alternating, each timed from `serve.run`
to ready. Then what the Ingress replica's process pays for its imports: `import tagray.serve.app`
(no torch) against the same with torch imported first (what it paid before), alternating, in fresh
interpreters: seconds and peak RSS.

    .venv/bin/python benchmarks/serve_redeploy.py [--rounds 3] [--parts redeploy imports]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_load import IDENTITY, make_model  # noqa: E402

# peak RSS from VmHWM (ru_maxrss of an exec'd child carries its parent's peak on Linux)
IMPORT = ("import re, sys, time; t = time.perf_counter(); {first}import tagray.serve.app; "
          "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1); "
          "print(time.perf_counter() - t, int(hwm) / 1024, 'torch' in sys.modules)")


def alive_pid(kind: str) -> int:
    import ray
    from ray.util.state import list_actors

    pids = [a.pid for a in list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")])
            if (a.class_name or "").endswith(f":{kind}")]
    return pids[0] if len(pids) == 1 else -1


def redeploys(model: str, rounds: int, port: int) -> list[dict]:
    from ray import serve

    from tagray.commands.serve import start
    from tagray.serve.app import build_app
    from tagray.serve.auth import entry_for, new_key

    args = {"model": model, "index": None, "tagger_cpus": 1.0}
    start(args, "127.0.0.1", port)
    rows = []
    for r in range(rounds):  # each redeploy changes one setting of what runs
        for what, change in (("api_keys (Ingress only)", {"api_keys": [entry_for(new_key(), ["read"])]}),
                             ("batch_size (Tagger replaced)", {"batch_size": 8 + r})):
            tagger = alive_pid("Tagger")
            args = {**args, **change}
            t = time.perf_counter()
            serve.run(build_app(args), name="tagray", route_prefix="/")
            row = {"round": r, "change": what, "seconds": round(time.perf_counter() - t, 2),
                   "tagger_replaced": alive_pid("Tagger") != tagger}
            print(json.dumps(row), flush=True)
            rows.append(row)
    serve.shutdown()
    return rows


def imports(rounds: int) -> list[dict]:
    rows = []
    for r in range(rounds):
        for label, first in (("tagray.serve.app", ""), ("torch, then tagray.serve.app", "import torch; ")):
            out = subprocess.run([sys.executable, "-c", IMPORT.format(first=first)], capture_output=True, text=True,
                                 check=True, timeout=300).stdout.split()
            row = {"round": r, "imports": label, "seconds": round(float(out[0]), 2), "peak_rss_mb": round(float(out[1])),
                   "torch_loaded": out[2] == "True"}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--parts", nargs="+", choices=["redeploy", "imports"], default=["redeploy", "imports"])
    p.add_argument("--port", type=int, default=8313)
    p.add_argument("--out", default="benchmarks/results/serve_redeploy.json")
    args = p.parse_args()
    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"}
    if "redeploy" in args.parts:
        from tagray.runtime import init_ray

        init_ray()
        with tempfile.TemporaryDirectory() as workdir:
            result["redeploy"] = redeploys(make_model(f"{workdir}/model", 512, IDENTITY), args.rounds, args.port)
    if "imports" in args.parts:
        result["imports"] = imports(args.rounds)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"results → {args.out}")


if __name__ == "__main__":
    main()
