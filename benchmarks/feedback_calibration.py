"""Recalibration from users' feedback (`tagray calibrate --feedback`) against the number of
corrections, beside seed 001's Fig. 7 (calibration on a small labelled set).

Corpus: `synth --features-only` (default settings: 40 concepts, 512-D features) with N
images, split by user (80/10/10); an RLR head trained in process (`tagray.heads.fit`, the
em_step Ray Train runs). Simulated users judge the uncalibrated model's top-5 suggestions
(label tags ranked by P(z=1|x)) on the val split, with the truth (`labels`):

    honest        a uniform sample of the suggestions, verdict present iff the tag is a label
    noisy         honest, with 10 % of the verdicts flipped
    lazy          confirms every correct suggestion they judge, rejects a wrong one 1 time in 5
    confirm_only  confirms correct suggestions and never rejects (only present verdicts)
    confirm_only_unguarded   the same verdicts with min_absent=0: what the per-kind minimum prevents

Each set of n verdicts goes through a real FeedbackStore (SQLite) and `recalibrate`; the model
is evaluated on the test split (annotation F1@5, mAP_L, mAP_I), against the uncalibrated model,
calibration on the full labelled val split, and (seed 001 Fig. 7) calibration on n/5 labelled
val images (a labelled image judges every label tag; 5 verdicts judge 5 pairs). Seeds vary the
corpus, the training order and the users. Writes JSON and a PNG under benchmarks/results/.

    .venv/bin/python benchmarks/feedback_calibration.py --images 20000 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from tagray import jsonio
from tagray.commands.calibrate import calibrate
from tagray.config import load_config
from tagray.data.feedback import FeedbackStore, Verdict
from tagray.data.normalize import NormalizerConfig, TagNormalizer
from tagray.data.schema import read_manifest, write_manifest
from tagray.data.split import SplitConfig, assign_splits
from tagray.data.synth import SynthConfig, synthesize
from tagray.eval.inputs import Inputs
from tagray.eval.report import EvalConfig, evaluate_head
from tagray.features.store import read_features
from tagray.heads.artifact import SavedHead
from tagray.heads.calibrate import CalibrateConfig, recalibrate
from tagray.heads.fit import HeadConfig, align
from tagray.heads.linear import LinearTagger
from tagray.heads.recipes.linear import fit
from tagray.heads.targets import build_targets, dense, label_vocabulary, prepare_vocabulary

USERS = ("honest", "noisy", "lazy", "confirm_only", "confirm_only_unguarded")
METRICS = ("f1@5", "map_label", "map_image", "nll")


def corpus(out: Path, images: int, seed: int) -> dict:
    written = synthesize(SynthConfig(images=images, seed=seed), str(out / "corpus"), features_only=True)
    manifest = assign_splits(read_manifest(written["manifest"]), SplitConfig(seed=seed))
    write_manifest(manifest, str(out / "manifest.parquet"))
    normalizer = TagNormalizer(load_config(NormalizerConfig, "normalize.yaml"))
    vocab = prepare_vocabulary(manifest, normalizer)
    targets = build_targets(manifest, normalizer, vocab)
    features, _ = read_features(written["features"])
    return {"vocab": vocab, "normalizer": normalizer, "targets": targets, "features": features}


def suggestions(model: LinearTagger, c: dict, k: int = 5) -> dict:
    """The model's top-k label tags by P(z=1|x) on each val image, with the truth of each pair."""
    targets = c["targets"]
    val = targets.filter(pc.and_(pc.equal(targets.column("split"), "val"), targets.column("labelled")))
    x, found = align(c["features"], val.column("image_id"))
    val = val.take(pa.array(found))
    cols = label_vocabulary(targets, model.tags)
    with torch.inference_mode():
        s = model.p_content(x)[:, cols]
    top = torch.topk(s, k, dim=1).indices.numpy()  # (N, k) into cols
    z = dense(val.column("label_ids"), model.tags)[:, cols].numpy()
    rows = np.repeat(np.arange(len(top)), k)
    tag_cols = cols[top.ravel()]
    return {"image_id": np.asarray(val.column("image_id").to_pylist(), object)[rows], "tag": tag_cols,
            "truth": z[rows, top.ravel()] > 0}


def simulate(pairs: dict, user: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(indices into the suggestion pairs, verdicts) of n corrections by `user`."""
    truth = pairs["truth"]
    if user in ("confirm_only", "confirm_only_unguarded"):
        pool = np.nonzero(truth)[0]
    elif user == "lazy":
        pool = np.nonzero(truth | (rng.random(len(truth)) < 0.2))[0]
    else:
        pool = np.arange(len(truth))
    take = rng.choice(pool, size=min(n, len(pool)), replace=False)
    verdict = truth[take].copy()
    if user == "noisy":
        verdict ^= rng.random(len(take)) < 0.1
    return take, verdict


def feedback_table(pairs: dict, take: np.ndarray, verdict: np.ndarray, vocab: list[str], db: str) -> pa.Table:
    """The verdicts written to a real SQLite store and read back resolved (policy latest)."""
    store = FeedbackStore(db)
    try:
        store.add("bench", [Verdict(str(pairs["image_id"][i]), vocab[pairs["tag"][i]], bool(v), user=f"u{j % 50}",
                                    model="uncalibrated") for j, (i, v) in enumerate(zip(take, verdict, strict=True))])
        return store.resolved("latest")
    finally:
        store.close()


def annotation(model: LinearTagger, c: dict) -> dict:
    """Annotation F1@5, mAP_L, mAP_I on test, and the mean cross-entropy of P(z=1|x) against the
    labels over every (test image, label tag): how well calibrated the probabilities are."""
    report, arrays = evaluate_head(model, c["targets"], c["features"], EvalConfig(max_query_terms=1), "test",
                                   with_baselines=False)
    log_p = np.minimum(arrays["label_scores"].astype(np.float64), -1e-12)
    z = arrays["labels"] > 0
    nll = -float(np.mean(np.where(z, log_p, np.log(-np.expm1(log_p)))))
    return {**{m: report["annotation"][m] for m in METRICS if m != "nll"}, "nll": nll}


def with_beta(model: LinearTagger, beta: torch.Tensor) -> LinearTagger:
    out = copy.deepcopy(model)
    with torch.no_grad():
        out.beta.copy_(beta)
    return out


def run_seed(seed: int, images: int, sizes: list[int], epochs: int, cfg: CalibrateConfig, work: Path) -> dict:
    t0 = time.perf_counter()
    c = corpus(work / f"seed{seed}", images, seed)
    vocab = list(c["vocab"].tags)
    train = c["targets"].filter(pc.equal(c["targets"].column("split"), "train"))
    x, found = align(c["features"], train.column("image_id"))
    y = dense(train.column("tag_ids").take(pa.array(found)), len(vocab))
    model = fit(x, y, HeadConfig(head="rlr", epochs=epochs, lr=0.01, weight_decay=1e-4, seed=seed))
    trained = time.perf_counter() - t0
    base = annotation(model, c)
    head = SavedHead(model=copy.deepcopy(model), vocab=c["vocab"], config=HeadConfig(), backbone=None,
                     positives=np.zeros(len(vocab), np.int64), calibrated=np.zeros(len(vocab), bool))
    full_inputs = Inputs(head, c["normalizer"], c["targets"], c["features"])
    full_info = calibrate(full_inputs, "val", None, cfg.l2, seed)
    full = annotation(full_inputs.head.model, c)
    pairs = suggestions(model, c)
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        labelled = Inputs(copy.deepcopy(head), c["normalizer"], c["targets"], c["features"])
        calibrate(labelled, "val", max(1, n // 5), cfg.l2, seed)
        rows.append({"user": "labelled_images", "requested": n, "corrections": n, "images": max(1, n // 5),
                     **annotation(labelled.head.model, c)})
        for user in USERS:
            take, verdict = simulate(pairs, user, n, rng)
            ucfg = CalibrateConfig(**{**cfg.__dict__, "min_absent": 0}) if user == "confirm_only_unguarded" else cfg
            with tempfile.TemporaryDirectory(dir=work) as tmp:
                table = feedback_table(pairs, take, verdict, vocab, os.path.join(tmp, "feedback.db"))
            result = recalibrate(model, vocab, c["features"], table, ucfg)
            rows.append({"user": user, "requested": n, "corrections": int(len(take)), "present": int(verdict.sum()),
                         "absent": int((~verdict).sum()), "tags_refitted": int(result.refitted.sum()),
                         **annotation(with_beta(model, result.beta), c)})
            print(json.dumps({"seed": seed, **rows[-1]}), flush=True)
    return {"seed": seed, "val_images": int(len(set(pairs["image_id"]))), "suggestion_pairs": int(len(pairs["truth"])),
            "correct_suggestions": int(pairs["truth"].sum()), "full_val": {"images": full_info["images"], **full},
            "uncalibrated": base, "rows": rows, "train_seconds": trained, "seconds": time.perf_counter() - t0}


def summarise(runs: list[dict], sizes: list[int]) -> dict:
    def ms(values: list[float]) -> dict:
        return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}

    out = {"uncalibrated": {m: ms([r["uncalibrated"][m] for r in runs]) for m in METRICS},
           "full_val": {m: ms([r["full_val"][m] for r in runs]) for m in METRICS}, "curves": {}}
    for user in ("labelled_images", *USERS):
        curve = []
        for n in sizes:
            got = [row for r in runs for row in r["rows"] if row["user"] == user and row["requested"] == n]
            entry = {"requested": n, "corrections": ms([g["corrections"] for g in got])["mean"],
                     **{m: ms([g[m] for g in got]) for m in METRICS}}
            if "tags_refitted" in got[0]:
                entry["tags_refitted"] = ms([g["tags_refitted"] for g in got])["mean"]
            curve.append(entry)
        out["curves"][user] = curve
    return out


def plot(summary: dict, sizes: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    styles = {"honest": "o-", "noisy": "^-", "lazy": "v-", "confirm_only": "s-", "confirm_only_unguarded": "x:",
              "labelled_images": "D--"}
    names = {"labelled_images": "labelled images (n/5, Fig. 7)", "confirm_only_unguarded": "confirm-only, min_absent=0"}
    for ax, metric, title in zip(axes, METRICS, ("annotation F1@5", "mAP_L (per label)", "mAP_I (per image)",
                                                        "cross-entropy of P(z) (lower is better)"),
                                 strict=True):
        for user, curve in summary["curves"].items():
            ax.errorbar(sizes, [p[metric]["mean"] for p in curve], yerr=[p[metric]["sd"] for p in curve],
                        fmt=styles[user], capsize=2, ms=4, label=names.get(user, user.replace("_", "-")))
        for key, colour, label in (("uncalibrated", "gray", "uncalibrated"), ("full_val", "black", "full labelled val")):
            ax.axhline(summary[key][metric]["mean"], color=colour, ls="--", lw=1, label=label)
        ax.set(xscale="log", xlabel="corrections (verdicts)", ylabel=title, title=title)
    axes[0].legend(fontsize=7)
    fig.text(0.5, 0.005, "Seed 001 Fig. 7: calibrating on a small labelled set matches full annotation at 1/200 of the "
             "labels. Here the clean set is users' verdicts on suggestions; mAP_L is invariant to β by construction.",
             ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--sizes", default="10,100,1000,10000")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--out", default="benchmarks/results/feedback_calibration.json")
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    sizes = [int(s) for s in args.sizes.split(",")]
    cfg = CalibrateConfig()
    with tempfile.TemporaryDirectory(prefix="recal-bench-") as tmp:
        runs = [run_seed(int(s), args.images, sizes, args.epochs, cfg, Path(tmp)) for s in args.seeds.split(",")]
    summary = summarise(runs, sizes)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"command": f"benchmarks/feedback_calibration.py --images {args.images} --seeds {args.seeds} "
                         f"--sizes {args.sizes} --epochs {args.epochs}",
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "settings": cfg.__dict__, "summary": summary, "runs": runs}
    out.write_text(jsonio.dumps(result, str(out), indent=1))
    plot(summary, sizes, out.with_suffix(".png"))
    print(json.dumps(summary, indent=1))
    print(f"→ {out}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
