"""Wall time of the shipped refine sweep with ϕ0 trained once for every trial, against every
trial training its own (what `tagray tune` did before `tagray.tune.sweep.shared_phi0`).

tune_configs/refine.yaml sweeps λ1, λ2 and α: none changes ϕ0 (PHI0_SETTINGS), so every trial
used to repeat the same `min_init_steps` Adam steps before its first refinement epoch. This runs
the sweep in one process on one local Ray with each setting in turn (A B A B), and prints wall
seconds and each trial's best validation mAP (the same with both: ϕ0 is the same computation).

    .venv/bin/python benchmarks/tune_phi0.py --repeat 2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import pandas as pd

# the same corpus as the checkpoint benchmark (this folder is on sys.path when run as a script)
from tune_checkpoints import corpus


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/tune_phi0.json")
    args = p.parse_args()
    import tagray.tune.sweep as sweep
    from tagray import cli
    from tagray.runtime import init_ray

    shared = sweep.shared_phi0
    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), Python {platform.python_version()}",
                    "images": args.images, "config": "tune_configs/refine.yaml", "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        manifest, features = corpus(work, args.images)
        init_ray(num_cpus=2)
        n = 0
        for r in range(args.repeat):
            for mode in ("per_trial", "shared"):
                n += 1
                sweep.shared_phi0 = shared if mode == "shared" else (lambda *a, **k: None)
                out, buf = work / f"run{n}", io.StringIO()
                t0 = time.perf_counter()
                with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                    rc = cli.main(["tune", "--config", "tune_configs/refine.yaml", "--manifest", manifest,
                                   "--features", features, "--out", str(out)])
                wall = time.perf_counter() - t0
                if rc != 0:
                    raise SystemExit(f"tagray tune failed:\n{buf.getvalue()[-3000:]}")
                table = pd.read_csv(out / "results.csv").sort_values(["lambda1", "lambda2", "alpha"])
                row = {"mode": mode, "repeat": r + 1, "wall_s": round(wall, 1),
                       "trials_s": round(json.loads((out / "sweep.json").read_text())["trials_seconds"], 1),
                       "best_val_map": round(float(table["best_val_map"].max()), 4),
                       "per_trial_best_val_map": [round(v, 4) for v in table["best_val_map"]]}
                print(json.dumps(row), flush=True)
                result["runs"].append(row)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"→ {args.out}")


if __name__ == "__main__":
    main()
