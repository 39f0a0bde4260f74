"""Wall time of `tagray tune` against the checkpoints each trial keeps (`TRIAL_CHECKPOINTS_KEPT`).

Ray Tune forces a snapshot of the experiment's state, and waits for its upload, every
`CheckpointConfig(num_to_keep)` checkpoints of a trial (so that the state never names a
checkpoint already deleted). tagray's trials checkpoint every epoch, so at num_to_keep=1 every
epoch of every trial waits for one. This runs the shipped neighbours sweep
(tune_configs/neighbors.yaml: 8 trials, 10 epochs, ASHA) in one process on one local Ray, with its
output on local disk and on an S3 endpoint (a moto server on loopback), at each `--keep`,
interleaved, and prints wall seconds and how many "excessive snapshot" warnings Tune logged.

    .venv/bin/python benchmarks/tune_checkpoints.py --keep 1 3 --repeat 2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def corpus(work: Path, images: int) -> tuple[str, str]:
    subprocess.run([str(BIN / "tagray"), "synth", "--out", str(work / "c"), "--images", str(images), "--features-only"],
                   check=True, capture_output=True)
    subprocess.run([str(BIN / "tagray"), "split", "--manifest", str(work / "c" / "manifest.parquet"), "--out",
                    str(work / "split.parquet")], check=True, capture_output=True)
    return str(work / "split.parquet"), str(work / "c" / "features.parquet")


def moto(work: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(work / "moto.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while True:
        try:
            opener.open(url, timeout=5)
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("moto server did not start") from None
            time.sleep(0.2)
    return proc, url


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--keep", type=int, nargs="+", default=[1, 3])
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--storage", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    p.add_argument("--out", default="benchmarks/results/tune_checkpoints.json")
    args = p.parse_args()
    for key, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(key, value)
    os.environ.pop("AWS_ENDPOINT_URL", None)
    import boto3

    import tagray.tune.sweep as sweep
    from tagray import cli
    from tagray.runtime import init_ray

    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), Python {platform.python_version()}",
                    "images": args.images, "config": "tune_configs/neighbors.yaml", "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        manifest, features = corpus(work, args.images)
        server, endpoint = moto(work)
        try:
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="sweeps")
            init_ray(num_cpus=2)
            n = 0
            for r in range(args.repeat):
                for where in args.storage:
                    for keep in args.keep:
                        n += 1
                        sweep.TRIAL_CHECKPOINTS_KEPT = keep
                        extra = ["--out", f"s3://sweeps/run{n}", "--endpoint-url", endpoint] if where == "s3" else \
                            ["--out", str(work / f"run{n}")]
                        buf = io.StringIO()
                        os.environ["TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S"] = "5"  # Ray's: count them
                        t0 = time.perf_counter()
                        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                            rc = cli.main(["tune", "--config", "tune_configs/neighbors.yaml", "--manifest", manifest,
                                           "--features", features, *extra])
                        wall = time.perf_counter() - t0
                        if rc != 0:
                            raise SystemExit(f"tagray tune failed:\n{buf.getvalue()[-3000:]}")
                        row = {"storage": where, "keep": keep, "repeat": r + 1, "wall_s": round(wall, 1),
                               "excessive_snapshot_warnings": buf.getvalue().count("triggered multiple times")}
                        print(json.dumps(row), flush=True)
                        result["runs"].append(row)
        finally:
            server.terminate()
    summary = {}
    for where in args.storage:
        for keep in args.keep:
            walls = sorted(x["wall_s"] for x in result["runs"] if x["storage"] == where and x["keep"] == keep)
            summary[f"{where}_keep{keep}"] = {"wall_s_all": walls}
    result["summary"] = summary
    print(json.dumps(summary, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"→ {args.out}")


if __name__ == "__main__":
    main()
