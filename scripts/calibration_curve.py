"""Annotation F1@5 against calibration-set size (seed 001 Fig. 7).

For each N in --sizes: the model calibrated on N labelled images of --split (what
`tagray calibrate --max-images N` does), against an LR trained on the labels of the
same N images only (the costly manual-annotation route). Writes curve.json and curve.png.

    .venv/bin/python scripts/calibration_curve.py --model runs/demo/model_rlr \\
        --manifest runs/demo/manifest_split.parquet --features runs/demo/features --out runs/fig7
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tagray.commands.calibrate import calibrate
from tagray.eval.inputs import load_inputs
from tagray.eval.report import EvalConfig, evaluate_head
from tagray.heads.fit import HeadConfig, align, fit
from tagray.heads.linear import LinearTagger
from tagray.heads.targets import dense, label_vocabulary


def labels_only_model(inputs, split: str, n: int, seed: int) -> LinearTagger:
    """LR trained on the ground-truth labels of n labelled images (label columns only)."""
    t = inputs.targets
    part = t.filter(pc.and_(pc.equal(t.column("split"), split), t.column("labelled")))
    take = np.sort(np.random.default_rng(seed).permutation(part.num_rows)[:n])
    part = part.take(pa.array(take))
    x, found = align(inputs.features, part.column("image_id"))
    tags = inputs.head.model.tags
    z = dense(part.column("label_ids").take(pa.array(found)), tags)
    cols = label_vocabulary(t, tags)
    mask = np.zeros(tags, bool)
    mask[cols] = True
    model = fit(x, z, HeadConfig(head="lr", epochs=max(20, 20_000 // max(1, len(x))), batch_size=min(500, len(x)),
                                 lr=0.01, weight_decay=1e-3))
    model.linear.bias.data[~mask] = -30.0  # not a label tag: never predicted
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--features", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--sizes", default="10,25,50,100,250,500,1000,2500")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    inputs = load_inputs(args.model, args.manifest, args.features)
    cfg = EvalConfig()
    base = evaluate_head(inputs.head.model, inputs.targets, inputs.features, cfg, "test", with_baselines=False)[0]
    rows = []
    for n in map(int, args.sizes.split(",")):
        trial = copy.deepcopy(inputs)
        info = calibrate(trial, args.split, n, l2=1e-2, seed=args.seed)
        cal = evaluate_head(trial.head.model, trial.targets, trial.features, cfg, "test", with_baselines=False)[0]
        own = evaluate_head(labels_only_model(inputs, args.split, n, args.seed), inputs.targets, inputs.features,
                            cfg, "test", with_baselines=False)[0]
        rows.append({"images": info["images"], "calibrated_f1@5": cal["annotation"]["f1@5"],
                     "labels_only_lr_f1@5": own["annotation"]["f1@5"]})
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "uncalibrated_f1@5": base["annotation"]["f1@5"], "curve": rows}
    (out / "curve.json").write_text(json.dumps(result, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    sizes = [r["images"] for r in rows]
    ax.plot(sizes, [r["calibrated_f1@5"] for r in rows], marker="o", label="user tags + calibration")
    ax.plot(sizes, [r["labels_only_lr_f1@5"] for r in rows], marker="s", label="LR on the labels only")
    ax.axhline(base["annotation"]["f1@5"], color="gray", ls="--", label="uncalibrated")
    ax.set(xscale="log", xlabel="labelled images", ylabel="annotation F1@5", title="seed 001 Fig. 7")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=100)
    print(f"curve → {out / 'curve.json'}, {out / 'curve.png'}")


if __name__ == "__main__":
    main()
