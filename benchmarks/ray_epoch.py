"""The Ray Train epoch of a linear head against the in-process epoch, same run, same recipe.

Three ways to run one `LinearRecipe` (tagray/heads/recipes/linear.py) over the same training
split: in-process (`run_recipe` under a LocalSession: no Ray), on Ray Train with one worker and
the split materialised as arrays in the object store (`materialize: true`, the default: the
worker slices them zero-copy — the same batches as in-process), and on Ray Train streaming the
split from Ray Data (`materialize: false`, for sets larger than the object store). Same torch
threads everywhere; epoch seconds are the loop's own `epoch_seconds` (first epoch excluded as
warm-up when there are more).

    .venv/bin/python benchmarks/ray_epoch.py --images 200000 --dim 512 --tags 1000 --epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tagray.config import load_config
from tagray.data.normalize import NormalizerConfig, TagNormalizer
from tagray.data.schema import read_manifest, write_manifest
from tagray.data.split import SplitConfig, assign_splits
from tagray.data.synth import SynthConfig, synthesize
from tagray.heads.fit import HeadConfig
from tagray.heads.recipe import LocalSession, run_recipe
from tagray.heads.recipes.linear import LinearRecipe
from tagray.train.run import train_arrays, train_head, training_inputs
from tagray.train.run_config import TrainRunConfig


def steady(history: list[dict]) -> float:
    seconds = [h["epoch_seconds"] for h in history]
    return float(np.median(seconds[1:] if len(seconds) > 1 else seconds))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--tags", type=int, default=1000, help="vocabulary size (normaliser's max_vocab)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--head", default="rlr")
    p.add_argument("--out", default="benchmarks/results/ray_epoch.json")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tagray-bench-ray-epoch-"))
    t0 = time.perf_counter()
    # benchmarks/heads.py's corpus: `--tags` concepts, false-tag rates scaled to that many concepts
    synth_cfg = SynthConfig(images=args.images, concepts=args.tags, feature_dim=args.dim, seed=3,
                            false_rate_min=1e-4, false_rate_max=1e-3)
    written = synthesize(synth_cfg, str(work / "corpus"), features_only=True)
    manifest = str(work / "manifest.parquet")
    write_manifest(assign_splits(read_manifest(written["manifest"]), SplitConfig(seed=0)), manifest)
    normalizer = TagNormalizer(load_config(NormalizerConfig, "normalize.yaml", {"top_k": args.tags}))
    cfg = HeadConfig(head=args.head, epochs=args.epochs, batch_size=500)
    inputs = training_inputs(manifest, written["features"], normalizer, cfg.batch_size)
    print(f"corpus: {inputs.n_train} training images × {inputs.dim} features × {len(inputs.vocab)} tags "
          f"({time.perf_counter() - t0:.0f}s)", flush=True)
    results: dict = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
                     "command": "benchmarks/ray_epoch.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
                     "train_images": inputs.n_train, "dim": inputs.dim, "tags": len(inputs.vocab), "head": args.head}

    torch.set_num_threads(args.threads)
    arrays = train_arrays(inputs, written["features"], normalizer.cfg.max_tags)
    recipe = LinearRecipe(cfg, inputs.dim, len(inputs.vocab), inputs.counts / inputs.train.num_rows, inputs.n_train,
                          train=arrays)
    history = run_recipe(recipe, LocalSession())
    results["in_process"] = {"epoch_seconds": [round(h["epoch_seconds"], 2) for h in history], "steady": steady(history),
                             "final_loss": history[-1]["loss"]}
    print("in-process", json.dumps(results["in_process"]), flush=True)
    del arrays, recipe

    from tagray.runtime import init_ray

    init_ray(num_cpus=os.cpu_count())
    for name, materialize in (("ray_train_arrays", True), ("ray_train_ray_data", False)):
        run = TrainRunConfig(workers=1, worker_cpus=1.0, torch_threads=args.threads, materialize=materialize,
                             data_cpus=0.5)
        t = time.perf_counter()
        metrics = train_head(manifest, written["features"], str(work / name), cfg, run, normalizer, inputs=inputs)
        results[name] = {"epoch_seconds": [round(h["epoch_seconds"], 2) for h in metrics["history"]],
                         "steady": steady(metrics["history"]), "final_loss": metrics["final_loss"],
                         "whole_call_seconds": round(time.perf_counter() - t, 1)}
        results[name]["ratio_to_in_process"] = round(results[name]["steady"] / results["in_process"]["steady"], 3)
        print(name, json.dumps(results[name]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
