"""What Serve's replica lifecycle settings cost a running app (ServeConfig's health_check_period_s
and graceful_shutdown_wait_loop_s, passed to every deployment by tagray/serve/app.py): seconds from
SIGKILLing a replica's process to a new replica answering, and seconds to `serve.delete` a
one-replica app, with Serve's defaults (10 s, 2 s) against tagray's (2 s, 0.5 s), alternating.
A bare deployment, so the figures are Serve's alone (a Tagger replica adds its backbone's start).

    .venv/bin/python benchmarks/serve_lifecycle.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import time
from pathlib import Path

from ray import serve

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "serve_defaults": {"health_check_period_s": 10.0, "graceful_shutdown_wait_loop_s": 2.0},
    "tagray_defaults": {"health_check_period_s": 2.0, "graceful_shutdown_wait_loop_s": 0.5},
}


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.1})
class Pid:
    def __call__(self) -> int:
        return os.getpid()


def _pid(handle, deadline: float, not_this: int | None = None) -> int:
    """The replica's pid once one other than `not_this` answers (bounded by `deadline`)."""
    while True:
        try:
            pid = handle.remote().result(timeout_s=2)
            if pid != not_this:
                return pid
        except Exception:  # the replica is dead or being replaced: ask again
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("no new replica answered in time")
        time.sleep(0.05)


def one_round(name: str, options: dict) -> dict:
    handle = serve.run(Pid.options(**options).bind(), name=name, route_prefix=None)
    pid = _pid(handle, time.monotonic() + 60)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    _pid(handle, time.monotonic() + 120, not_this=pid)
    replaced = time.monotonic() - t0
    t0 = time.monotonic()
    serve.delete(name)
    return {"replaced_s": round(replaced, 2), "delete_s": round(time.monotonic() - t0, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_lifecycle.json"))
    args = p.parse_args()
    from tagray.runtime import init_ray

    init_ray(num_cpus=os.cpu_count())
    serve.start(http_options={"host": "127.0.0.1", "port": 0})
    rows = []
    for r in range(args.rounds):
        for label, options in SETTINGS.items():
            row = {"round": r + 1, "settings": label, **options, **one_round(f"lifecycle-{label}", options)}
            rows.append(row)
            print(row, flush=True)
    serve.shutdown()
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
              "command": "benchmarks/serve_lifecycle.py " + f"--rounds {args.rounds}", "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"results → {args.out}")


if __name__ == "__main__":
    main()
