"""Wall time of `tagray train` against Ray Train's controller poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S).

Ray Train's controller drains each worker's one-slot result queue when it polls, so every report
(tagray reports at each epoch's end and every `checkpoint_every` steps) after the first can wait
up to one poll. tagray.runtime sets the poll to TRAIN_POLL_S unless the environment names one;
this runs the same `tagray train --head rlr` as a fresh process (its own local Ray, as a user's
first run) with Ray's default 2 s and with tagray's setting, interleaved (A B A B: the machine's
hour moves both alike), at several epoch counts, and prints wall seconds and seconds per epoch.

    .venv/bin/python benchmarks/train_poll.py --epochs 3 30 --repeat 2
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

from tagray.runtime import TRAIN_POLL_S

BIN = Path(sys.executable).parent


def corpus(work: Path, images: int) -> tuple[str, str]:
    """`tagray synth --features-only` and `tagray split`: (manifest, features)."""
    subprocess.run([str(BIN / "tagray"), "synth", "--out", str(work / "c"), "--images", str(images), "--features-only",
                    "feature_dim=32"], check=True, capture_output=True)
    subprocess.run([str(BIN / "tagray"), "split", "--manifest", str(work / "c" / "manifest.parquet"), "--out",
                    str(work / "split.parquet")], check=True, capture_output=True)
    return str(work / "split.parquet"), str(work / "c" / "features.parquet")


def train(manifest: str, features: str, out: Path, epochs: int, poll: str) -> dict:
    env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": poll}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    done = subprocess.run([str(BIN / "tagray"), "train", "--head", "rlr", "--manifest", manifest, "--features", features,
                           "--out", str(out), f"epochs={epochs}"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"tagray train failed:\n{done.stderr[-3000:]}")
    history = json.loads((out / "metrics.json").read_text())["history"]
    return {"wall_s": round(wall, 1), "compute_s": round(sum(h["epoch_seconds"] for h in history), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=1500)
    p.add_argument("--epochs", type=int, nargs="+", default=[3, 30])
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/train_poll.json")
    args = p.parse_args()
    settings = {"ray_default": "2.0", "tagray": TRAIN_POLL_S}
    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), Python {platform.python_version()}",
                    "images": args.images, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        manifest, features = corpus(work, args.images)
        for r in range(args.repeat):
            for epochs in args.epochs:
                for name, poll in settings.items():
                    row = {"epochs": epochs, "setting": name, "poll_s": float(poll), "repeat": r + 1,
                           **train(manifest, features, work / f"m-{r}-{epochs}-{name}", epochs, poll)}
                    print(json.dumps(row), flush=True)
                    result["runs"].append(row)
    summary = {}
    for epochs in args.epochs:
        for name in settings:
            walls = sorted(x["wall_s"] for x in result["runs"] if x["epochs"] == epochs and x["setting"] == name)
            summary[f"{epochs}_{name}"] = {"wall_s_median": walls[len(walls) // 2], "wall_s_all": walls}
    result["summary"] = summary
    print(json.dumps(summary, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"→ {args.out}")


if __name__ == "__main__":
    main()
