"""`tagray tune`: a Ray Tune sweep over the neighbors (seed 003) or refine (seed 002) head's
settings, ASHA early stopping on validation mAP, concurrent trials sized to the cluster;
writes results.csv, sweep.png, sweep.json and best_model/ under --out; re-running resumes."""

from __future__ import annotations

import argparse
import sys

from tagray.commands.common import add_endpoint, add_overrides, command
from tagray.config import load_config, parse_overrides


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tagray tune", description=__doc__)
    p.add_argument("--config", required=True, help="sweep YAML (tune_configs/neighbors.yaml, tune_configs/refine.yaml)")
    p.add_argument("--manifest", required=True, help="manifest with a split column (train, val, test)")
    p.add_argument("--features", required=True, help="features file or shard directory")
    p.add_argument("--out", required=True, help="sweep directory; re-running the same command resumes the sweep")
    p.add_argument("--ray-address", default=None, help="Ray cluster (default: RAY_ADDRESS or a local one)")
    add_endpoint(p)
    add_overrides(p, "sweep (TuneConfig)")
    return p


@command("tune")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tagray.tune.space import TuneConfig

    sweep = load_config(TuneConfig, args.config, parse_overrides(args.overrides))
    from tagray.data.normalize import NormalizerConfig, TagNormalizer

    normalizer = TagNormalizer(load_config(NormalizerConfig, sweep.normalizer))
    from tagray.resources import require_resources
    from tagray.runtime import init_ray
    from tagray.tune.sweep import SweepData, SweepFailed, run_sweep

    data = SweepData(args.manifest, args.features, sweep, normalizer, args.endpoint_url)  # checked before Ray starts
    init_ray(args.ray_address)
    require_resources(sweep.trial_cpus, sweep.trial_gpus, "each tune trial (trial_cpus, trial_gpus)", sweep.resources_wait_s)
    try:
        summary = run_sweep(args.manifest, args.features, args.out, sweep, normalizer, args.endpoint_url, data)
    except SweepFailed as e:
        print(f"tagray tune: error: {e}", file=sys.stderr)
        return 1
    print(f"{summary['trials']} trials ({summary['errored_trials']} errored, {summary['concurrent_trials']} at once) "
          f"in {summary['seconds']:.1f}s; best validation mAP {summary['best_val_map']:.4f} with {summary['best_config']}")
    print(f"results → {summary['results']}")
    print(f"best model → {summary['best_model']}")
    return 0
