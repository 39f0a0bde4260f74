"""Do the shipped defaults learn? Every head trained in-process with its config dataclass's
defaults (`HeadConfig(head="lr")`, `HeadConfig()`, `EmbedConfig()`, `NeighborsConfig()`,
`RefineConfig()`) on the default synthetic corpus (`tagray synth --features-only --images N`,
split by `SplitConfig()`), scored on the test split beside the baselines its own report prints
(issue 14, "Defaults that learn"):

- lr, rlr, embed (`eval/report.py`): annotation mAP per label (labels as truth) and tag
  prediction F1@5 (user tags as truth) against random, prior, user_tags (annotation only), kNN;
- neighbors (`eval/neighbors_report.py`, seed 003 Table 2): mAP per label against visual-only,
  kNN voting, neighbourhood voting; the best epoch on validation mAP is kept (as `tagray train`);
- refine (`eval/refine_report.py`, seed 002): annotation mAP per label against random guess,
  kNN and ϕ0 (multi_cnn); refinement (train split) against user tags, TagCooccur, TagVote.

`--rule` applies the step-scaled schedule drafted in /tmp/drafts/defaults-learn.md (see
`scaled()`) to the configs before training, so one run prints before and after.

    python benchmarks/defaults_learn.py --images 3000 20000 [--heads lr rlr ...] [--rule]

Prints JSON and writes benchmarks/results/defaults_learn[_rule].json. Seeded (SynthConfig.seed,
SplitConfig.seed, each config's seed): two runs print the same figures. One torch thread.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tagray import jsonio
from tagray.config import coerce_fields, load_config, parse_overrides
from tagray.data.normalize import NormalizerConfig, TagNormalizer
from tagray.data.schema import read_manifest, write_manifest
from tagray.data.split import SplitConfig, assign_splits
from tagray.data.synth import SynthConfig, synthesize
from tagray.features.store import read_features
from tagray.heads.split_arrays import SplitsData, metadata_lists, metadata_neighbors
from tagray.heads.targets import build_targets, multi_hot

HEADS = ("lr", "rlr", "embed", "neighbors", "refine")
RESULTS = Path(__file__).resolve().parent / "results"

# --- the rule (draft for the lead's recipe; see /tmp/drafts/defaults-learn.md) -----------------
MIN_STEPS = 4000  # optimiser steps a run takes at least: epochs = max(epochs, ceil(MIN_STEPS / steps per epoch))
MAX_EPOCHS = 200  # … but never more than this many epochs (tiny corpora: early stopping ends them)
PATIENCE = 5  # early stopping: epochs without a better validation mAP before the run stops


def min_epochs(epochs: int, rows: int, batch_size: int, min_steps: int = MIN_STEPS, max_epochs: int = MAX_EPOCHS) -> int:
    """epochs = max(epochs, ⌈min_steps / steps_per_epoch⌉), capped at max(epochs, max_epochs)."""
    per_epoch = max(1, rows // max(1, min(batch_size, rows)))
    return max(epochs, min(max(epochs, max_epochs), math.ceil(min_steps / per_epoch)))


# --- corpus ---------------------------------------------------------------------------------
def corpus(images: int, root: Path, synth: dict | None = None) -> dict:
    """`tagray synth --features-only --images N` (SynthConfig defaults otherwise, or `synth`'s
    fields), split by user (SplitConfig defaults), read as the trainers read it."""
    cfg = dataclasses.replace(SynthConfig(images=images), **coerce_fields(SynthConfig, synth or {}, "--synth"))
    written = synthesize(cfg, str(root / "corpus"), features_only=True)
    manifest_uri = str(root / "manifest.parquet")
    write_manifest(assign_splits(read_manifest(written["manifest"]), SplitConfig()), manifest_uri)
    normalizer = TagNormalizer(load_config(NormalizerConfig, "normalize.yaml"))
    data = SplitsData(manifest_uri, written["features"], normalizer)
    targets = build_targets(data.manifest, normalizer, data.vocab)
    features, _ = read_features(written["features"])
    return {"data": data, "targets": targets, "features": features, "normalizer": normalizer,
            "features_uri": written["features"]}


# --- heads ---------------------------------------------------------------------------------
def configured(default, overrides: dict):
    """`default` with `--set` overrides typed as the CLI types them (`l2=3e-4` is a YAML string)."""
    return dataclasses.replace(default, **coerce_fields(type(default), overrides, "--set"))


def _run(recipe, rule: bool, rows: int, batch: int):
    """`run_recipe` in this process; with the rule, the recipe's epochs scaled to the corpus and
    early stopping on its validation metric (where it has one)."""
    from tagray.heads.recipe import LocalSession, run_recipe

    if rule:
        recipe.epochs = min_epochs(recipe.epochs, rows, batch)
        if recipe.val_metric:
            recipe.patience = PATIENCE
    return run_recipe(recipe, LocalSession())


def summary(report: dict) -> dict:
    """The one report shape's (tagray.eval.shape) headline: annotation mAP_L of the model and of
    every baseline the report prints, tag prediction F1@5 beside it, and the report's verdict."""
    from tagray.eval.shape import main_metric

    k = next((key for key in report.get("tag_prediction") or {} if key.startswith("f1@")), "f1@5")
    return {
        "metric": "annotation.map_label",
        "model": main_metric(report),
        "baselines": {name: main_metric(block) for name, block in report["baselines"].items()},
        f"tag_prediction_{k}": {"model": (report.get("tag_prediction") or {}).get(k),
                                **{name: block["tag_prediction"][k] for name, block in report["baselines"].items()
                                   if block.get("tag_prediction")}},
        "verdict": report["verdict"]["message"],
    }


def run_linear(c: dict, head: str, rule: bool, overrides: dict) -> dict:
    from tagray.eval.report import EvalConfig, evaluate_head
    from tagray.heads.fit import HeadConfig
    from tagray.heads.recipes.linear import LinearRecipe

    data = c["data"]
    train = data.parts["train"]
    cfg = configured(HeadConfig(head=head), overrides)
    y = multi_hot(train.tag_ids, data.tags)
    recipe = LinearRecipe(cfg, train.x.shape[1], data.tags, y.mean(0), len(train), train={"x": torch.from_numpy(train.x), "y": y})
    history = _run(recipe, rule, len(train), cfg.batch_size)
    report, _ = evaluate_head(recipe.model, c["targets"], c["features"], EvalConfig(), "test", with_baselines=True)
    return {**summary(report), "epochs": recipe.epochs, "steps": history[-1]["step"], "lr": cfg.lr}


def train_embed(c: dict, rule: bool, overrides: dict):
    """EmbedConfig's defaults (with `overrides`) trained on the corpus's tagged training images:
    (cfg, recipe, word table, tag counts, history)."""
    from tagray.data.word_vectors import word_table_init
    from tagray.heads.embedding import EmbedConfig
    from tagray.heads.recipes.embed import EmbedRecipe
    from tagray.heads.word_table import WordTable

    data = c["data"]
    train = data.parts["train"]
    tagged = (train.tag_ids >= 0).any(1)  # the embed head trains on tagged images only (tagged_only=True)
    cfg = configured(EmbedConfig(), overrides)
    words, init, _ = word_table_init(data.vocab.tags, None, cfg.word_dim, cfg.init_scale, cfg.seed)
    counts = data.counts.astype(np.float64)
    table = WordTable(init, cfg.word_optimizer, cfg.word_lr)
    n = int(tagged.sum())
    # as `tagray train`: validation after every epoch (every val image: fewer than val_images here), the
    # best epoch's h and words at the end
    val = data.validation("val") if cfg.val_images else None
    recipe = EmbedRecipe(cfg, train.x.shape[1], table.shape[1], counts, table, n,
                         train={"x": torch.from_numpy(train.x[tagged]), "tag_ids": train.tag_ids[tagged]}, val=val)
    history = _run(recipe, rule, n, cfg.batch_size)
    recipe.restore_best()
    return cfg, recipe, table, counts, history


def embed_tagger(c: dict, cfg, recipe, table, counts, calibrate: bool = True):
    """The trained head as `tagray train` writes it: user-tag scores Platt-scaled per tag on the
    tagged val images (`calibration_images` > 0), else σ(s + log q(t))."""
    from tagray.heads.embedding import EmbedTagger, tag_log_prior
    from tagray.heads.user_tags import fit_on_split

    vectors = table.vectors[: c["data"].tags].clone()
    if not (calibrate and cfg.calibration_images):
        return EmbedTagger(recipe.mlp.eval(), vectors, tag_log_prior(cfg, counts))
    (scale, offset), _ = fit_on_split(recipe.mlp, vectors, c["targets"], c["features_uri"], "val",
                                      cfg.calibration_images, cfg.seed, c["normalizer"].cfg.max_tags)
    return EmbedTagger(recipe.mlp.eval(), vectors, offset, scale)


def run_embed(c: dict, rule: bool, overrides: dict) -> dict:
    from tagray.eval.report import EvalConfig, evaluate_head

    cfg, recipe, table, counts, history = train_embed(c, rule, overrides)
    tagger = embed_tagger(c, cfg, recipe, table, counts)
    report, _ = evaluate_head(tagger, c["targets"], c["features"], EvalConfig(), "test", with_baselines=True)
    out = {**summary(report), "epochs": recipe.epochs, "steps": history[-1]["step"], "lr": cfg.lr}
    if recipe.val is not None:
        out.update(best_epoch=recipe.best.state["epoch"], best_val_map=round(recipe.best.state["map"], 4),
                   val_history=[round(h["val_map"], 4) for h in history])
    return out


def _val_summary(recipe, history: list[dict]) -> dict:
    return {"epochs": recipe.epochs, "epochs_run": len(history), "steps": history[-1]["step"],
            "best_epoch": recipe.best.state["epoch"], "best_val_map": round(recipe.best.state["map"], 4),
            "val_history": [round(h["val_map"], 4) for h in history if h.get("val_map") is not None]}


def run_neighbors(c: dict, rule: bool, overrides: dict, empty: bool = False) -> dict:
    """`empty`: every neighbourhood emptied (train, val and test), the model's visual path alone."""
    from tagray.eval.neighbors_report import evaluate_neighbors_model
    from tagray.heads.neighborhood import NeighborsConfig
    from tagray.heads.recipes.neighbors import NeighborsRecipe

    data = c["data"]
    cfg = configured(NeighborsConfig(), overrides)
    parts = [data.parts[s] for s in ("train", "val", "test")]
    nn = metadata_neighbors(metadata_lists(data.manifest, cfg.metadata, c["normalizer"]), data.manifest.column("split"),
                            parts, cfg, progress=False)
    if empty:
        nn = {split: np.full_like(rows, -1) for split, rows in nn.items()}
    train = data.parts["train"]
    val = {**data.validation("val"), "neighbors": nn["val"]}
    y = multi_hot(train.targets(cfg.target), data.tags)
    recipe = NeighborsRecipe(cfg, data.tags, {"x": torch.from_numpy(train.x), "y": y, "neighbors": nn["train"]}, val)
    history = _run(recipe, rule, len(train), cfg.batch_size)
    report = evaluate_neighbors_model(recipe.best_model(), data, cfg, "test", neighbors=nn)
    return {**summary(report), **_val_summary(recipe, history), "lr": cfg.lr}


def run_refine(c: dict, rule: bool, overrides: dict) -> dict:
    from tagray.data.tag_similarity import (
        cooccurrence,
        google_distance,
        tag_similarity,
        wordnet_distance,
    )
    from tagray.eval.refine_report import evaluate_refine_model
    from tagray.heads.recipes.refine import RefineRecipe
    from tagray.heads.refine import RefineConfig

    data = c["data"]
    cfg = configured(RefineConfig(), overrides)
    train = data.parts["train"]
    counts, co = cooccurrence(train.tag_ids, data.tags)
    ctx, kb = google_distance(counts, co, len(train)), wordnet_distance(list(data.vocab.tags), counts)
    xi = torch.from_numpy(tag_similarity(ctx, kb, cfg.alpha)).float()
    g = multi_hot(train.tag_ids, data.tags)
    recipe = RefineRecipe(cfg, data.tags, {"x": torch.from_numpy(train.x), "y": g, "xi": xi}, data.validation("val"))
    history = _run(recipe, rule, len(train) // cfg.m, cfg.batch_size // cfg.m)  # a step: s/m groups (anchors)
    report = evaluate_refine_model(recipe.best_model(), recipe.phi0_model(), data)
    refinement = report["extras"]["seed002"].get("refinement") or {}
    return {**summary(report), **_val_summary(recipe, history), "lr": cfg.lr,
            "refinement_map_label": {k: v["map_label"] for k, v in (refinement.get("methods") or {}).items()}}


def run_head(c: dict, head: str, rule: bool, overrides: dict | None = None, empty_neighbourhoods: bool = False) -> dict:
    """One head on corpus `c`: its metric, the baselines, whether it beats each. `overrides`:
    config fields to change (experiments; the benchmark's own runs change none)."""
    t0 = time.perf_counter()
    overrides = overrides or {}
    run = {"lr": run_linear, "rlr": run_linear, "embed": run_embed, "neighbors": run_neighbors, "refine": run_refine}[head]
    with contextlib.redirect_stdout(sys.stderr):  # the loops' per-epoch lines (also the baselines'): stdout is JSON
        if head in ("lr", "rlr"):
            out = run(c, head, rule, overrides)
        elif head == "neighbors":
            out = run(c, rule, overrides, empty_neighbourhoods)
        else:
            out = run(c, rule, overrides)
    out["beats"] = {k: out["model"] > v for k, v in out["baselines"].items() if v is not None}
    out["learns"] = all(out["beats"].values())
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, nargs="+", default=[3000, 20000])
    p.add_argument("--heads", nargs="+", choices=HEADS, default=list(HEADS))
    p.add_argument("--rule", action="store_true", help="apply the step-scaled epochs + early stopping rule")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="change config fields of every head run (experiments; none by default)")
    p.add_argument("--synth", nargs="*", default=[], metavar="KEY=VALUE",
                   help="SynthConfig fields of the corpus besides images (another corpus; none by default)")
    p.add_argument("--empty-neighbourhoods", action="store_true",
                   help="neighbors: train and score with every neighbourhood emptied (the model's visual path alone)")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/defaults_learn[_rule].json)")
    args = p.parse_args(argv)
    if "images" in parse_overrides(args.synth):
        p.error("--synth images=…: give the corpus sizes with --images")
    torch.set_num_threads(1)
    results: dict = {"set": args.set, "synth": args.synth, "empty_neighbourhoods": args.empty_neighbourhoods, "rule": {"min_steps": MIN_STEPS, "max_epochs": MAX_EPOCHS, "patience": PATIENCE} if args.rule
                     else None, "sizes": {}}
    for images in args.images:
        with tempfile.TemporaryDirectory(prefix="defaults-learn-") as d:
            t0 = time.perf_counter()
            c = corpus(images, Path(d), parse_overrides(args.synth))
            size = {"train_images": len(c["data"].parts["train"]), "tags": c["data"].tags,
                    "corpus_seconds": round(time.perf_counter() - t0, 1), "heads": {}}
            for head in args.heads:
                size["heads"][head] = run_head(c, head, args.rule, parse_overrides(args.set), args.empty_neighbourhoods)
                print(json.dumps({"images": images, "head": head, **size["heads"][head]}), flush=True)
            results["sizes"][str(images)] = size
    out = Path(args.out) if args.out else RESULTS / f"defaults_learn{'_rule' if args.rule else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(jsonio.dumps(results, str(out), indent=1))
    print(jsonio.dumps(results, "defaults_learn", indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
