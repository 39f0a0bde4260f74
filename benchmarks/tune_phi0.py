"""Wall time of a shipped sweep with what its trials share computed once, against every trial
computing its own (what `tagray tune` did before):

- `--head refine` (tune_configs/refine.yaml, `tagray.tune.sweep.shared_phi0`): the sweep's λ1, λ2
  and α do not change ϕ0 (PHI0_SETTINGS), so every trial used to repeat the same
  `min_init_steps` Adam steps before its first refinement epoch;
- `--head neighbors` (tune_configs/neighbors.yaml, `shared_neighbors`): m × M × τ, 8 trials, whose
  Jaccard neighbours depend only on τ (M: the first M columns of the widest) — every trial used to
  search them itself.

This runs the sweep in one process on one local Ray with each setting in turn (A B A B), and
prints wall seconds and each trial's best validation mAP (the same with both: the shared part is
the same computation). `--fixed KEY=VALUE` overrides the config's fixed settings (fewer epochs,
to see the shared part's share at a size where full trials take long).

    .venv/bin/python benchmarks/tune_phi0.py --repeat 2
    .venv/bin/python benchmarks/tune_phi0.py --head neighbors --images 20000 --fixed epochs=2 --repeat 1
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
    p.add_argument("--head", choices=("refine", "neighbors"), default="refine")
    p.add_argument("--fixed", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of the config's fixed settings")
    p.add_argument("--out", default=None, help="default benchmarks/results/tune_phi0.json (refine), "
                                               "tune_neighbors_shared.json (neighbors)")
    args = p.parse_args()
    import yaml

    import tagray.tune.sweep as sweep
    from tagray import cli
    from tagray.config import parse_overrides
    from tagray.runtime import init_ray

    name = "shared_phi0" if args.head == "refine" else "shared_neighbors"
    shared = getattr(sweep, name)
    config = f"tagray/tune_configs/{args.head}.yaml"
    out_file = args.out or f"benchmarks/results/{'tune_phi0' if args.head == 'refine' else 'tune_neighbors_shared'}.json"
    result: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), Python {platform.python_version()}",
                    "images": args.images, "config": config, "fixed": args.fixed, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        spec = yaml.safe_load(Path(config).read_text())
        spec["fixed"] = {**spec.get("fixed", {}), **parse_overrides(args.fixed)}
        (work / "sweep.yaml").write_text(yaml.safe_dump(spec))
        swept = list(spec["search_space"])
        manifest, features = corpus(work, args.images)
        init_ray(num_cpus=2)
        n = 0
        for r in range(args.repeat):
            for mode in ("per_trial", "shared"):
                n += 1
                setattr(sweep, name, shared if mode == "shared" else (lambda *a, **k: None if args.head == "refine" else {}))
                out, buf = work / f"run{n}", io.StringIO()
                t0 = time.perf_counter()
                with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                    rc = cli.main(["tune", "--config", str(work / "sweep.yaml"), "--manifest", manifest,
                                   "--features", features, "--out", str(out)])
                wall = time.perf_counter() - t0
                if rc != 0:
                    raise SystemExit(f"tagray tune failed:\n{buf.getvalue()[-3000:]}")
                table = pd.read_csv(out / "results.csv").sort_values(swept)
                row = {"mode": mode, "repeat": r + 1, "wall_s": round(wall, 1),
                       "trials_s": round(json.loads((out / "sweep.json").read_text())["trials_seconds"], 1),
                       "best_val_map": round(float(table["best_val_map"].max()), 4),
                       "per_trial_best_val_map": [round(v, 4) for v in table["best_val_map"]],
                       # ASHA stops trials by the order they report in (2 at once): a trial's epochs may differ
                       "per_trial_epochs_run": [int(v) for v in table["epochs_run"]]}
                print(json.dumps(row), flush=True)
                result["runs"].append(row)
    Path(out_file).write_text(json.dumps(result, indent=1) + "\n")
    print(f"→ {out_file}")


if __name__ == "__main__":
    main()
