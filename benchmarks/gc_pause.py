"""A full cyclic-GC collection in a process holding what a Serve replica of tagray imports (Ray,
Serve, FastAPI, pydantic, torch, pyarrow, faiss, tagray's app), before and after
`tagray.serve.app.settle_gc` (gc.freeze): the pause a request meets when a full collection runs
on the replica's thread. The fastest of 5 collections each.

    .venv/bin/python benchmarks/gc_pause.py
"""

from __future__ import annotations

import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def full_collection_ms(repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        gc.collect()
        best = min(best, 1000 * (time.perf_counter() - t))
    return round(best, 2)


def main() -> None:
    import faiss  # noqa: F401
    import fastapi  # noqa: F401
    import pyarrow  # noqa: F401
    import torch  # noqa: F401
    from ray import serve  # noqa: F401

    from tagray.serve import app, service  # noqa: F401

    out = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
           "tracked_objects": len(gc.get_objects()), "full_collection_ms_before": full_collection_ms()}
    out["frozen"] = app.settle_gc()
    out["full_collection_ms_after"] = full_collection_ms()
    print(json.dumps(out))
    Path("benchmarks/results/gc_pause.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
