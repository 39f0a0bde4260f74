"""`tagray calibrate`: W frozen, one intercept β per tag fitted on images with ground-truth
labels (seed 001 §4.4, eq. 13); writes a new model directory."""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyarrow as pa
import torch

from tagray.commands.common import add_endpoint, add_model_inputs, command
from tagray.config import ConfigError
from tagray.data.schema import SchemaError
from tagray.eval.inputs import load_inputs
from tagray.heads.artifact import SavedHead, save_head
from tagray.heads.calibrate import fit_intercepts
from tagray.heads.fit import align
from tagray.heads.targets import dense, label_vocabulary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tagray calibrate", description=__doc__)
    add_model_inputs(p, "trained model directory", "manifest with labels and a split column")
    p.add_argument("--out", required=True, help="the calibrated model directory")
    p.add_argument("--split", default="val", help="split whose labelled images calibrate (default val)")
    p.add_argument("--max-images", type=int, default=None, help="use at most N labelled images (seeded sample)")
    p.add_argument("--l2", type=float, default=1e-2, help="weight of the Gaussian prior on β")
    p.add_argument("--seed", type=int, default=0)
    add_endpoint(p)
    return p


def calibrate(inputs, split: str, max_images: int | None, l2: float, seed: int) -> dict:
    """Fits β in place on `inputs.head`; returns what was done."""
    targets = inputs.targets
    head = inputs.head
    if not isinstance(head, SavedHead):
        raise SchemaError(f"calibration fits the intercepts β of a linear head (lr, rlr); this model is a "
                          f"{head.config.head!r} head")
    part = targets.filter(pa.compute.and_(pa.compute.equal(targets.column("split"), split), targets.column("labelled")))
    if part.num_rows == 0:
        raise SchemaError(f"split '{split}' has no labelled images: calibration needs a 'labels' column with values")
    if max_images is not None:
        if max_images < 1:
            raise ConfigError(f"--max-images must be ≥ 1, got {max_images}")
        take = np.sort(np.random.default_rng(seed).permutation(part.num_rows)[:max_images])
        part = part.take(pa.array(take))
    x, found = align(inputs.features, part.column("image_id"))
    if len(found) == 0:
        raise SchemaError(f"none of the {part.num_rows} labelled images of split '{split}' has features")
    cols = label_vocabulary(targets, head.model.tags)
    z = dense(part.column("label_ids").take(pa.array(found)), head.model.tags)[:, cols]
    with torch.inference_mode():
        scores = head.model(x)[:, cols]
    beta = fit_intercepts(scores, z, l2=l2)
    head.model.beta.zero_()
    head.model.beta[torch.from_numpy(cols)] = beta
    head.calibrated = np.zeros(head.model.tags, bool)
    head.calibrated[cols] = True
    return {"split": split, "images": len(found), "tags": len(cols), "l2": l2,
            "mean_beta": float(beta.mean()) if len(cols) else 0.0}


@command("calibrate")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    inputs = load_inputs(args.model, args.manifest, args.features, args.endpoint_url)
    info = calibrate(inputs, args.split, args.max_images, args.l2, args.seed)
    info["seconds"] = time.perf_counter() - t0
    inputs.head.metrics = {**inputs.head.metrics, "calibration": info, "calibrated_from": args.model}
    save_head(inputs.head, args.out, args.endpoint_url)
    print(f"calibrated {info['tags']} tags on {info['images']} labelled '{args.split}' images "
          f"(mean β {info['mean_beta']:+.2f}) in {info['seconds']:.1f}s")
    print(f"model → {args.out}")
    return 0
