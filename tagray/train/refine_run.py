"""`tagray train --head refine` (seed 002): the tag similarity ξ, the Ray Train loop
(ϕ0, candidates, Algorithm 1 epochs), the best epoch on validation saved as a model
directory, and the report of refinement (training images) and annotation (test images)
with the paper's baselines (report.json).

Checkpoints live in MODEL/_ray/<run name>; re-running the same command resumes.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from tagray import jsonio
from tagray.config import to_dict
from tagray.data import schema, storage
from tagray.data.normalize import TagNormalizer
from tagray.data.tag_similarity import (
    cooccurrence,
    google_distance,
    tag_similarity,
    wordnet_distance,
)
from tagray.eval.refine_report import evaluate_refine_model
from tagray.eval.shape import summary_lines
from tagray.eval.training_plot import plot_epochs
from tagray.features import store
from tagray.heads.net_artifact import SavedNetHead, save_net_head
from tagray.heads.recipes.refine import build_refine
from tagray.heads.refine import RefineConfig
from tagray.heads.split_arrays import SplitsData
from tagray.train.driver import fit_on_ray
from tagray.train.run_config import TrainRunConfig, run_name

log = logging.getLogger(__name__)

RUN_NAME = "refine"
REPORT_FILE = "report.json"


def tag_distance_parts(data: SplitsData) -> tuple[np.ndarray, np.ndarray]:
    """(dist_ctx, dist_KB) over the vocabulary from the training images' user tags (eq. 3, WordNet)."""
    train = data.parts["train"]
    counts, co = cooccurrence(train.tag_ids, data.tags)
    return google_distance(counts, co, len(train)), wordnet_distance(list(data.vocab.tags), counts)


def refine_data(manifest_uri: str, features_uri: str, cfg: RefineConfig, normalizer: TagNormalizer,
                endpoint_url: str | None = None) -> SplitsData:
    """The splits' arrays, checked (no Ray needed: `tagray train` calls it before Ray starts)."""
    data = SplitsData(manifest_uri, features_uri, normalizer, endpoint_url)
    if len(data.parts["train"]) < cfg.batch_size:
        raise schema.SchemaError(f"only {len(data.parts['train'])} training images have features; "
                                 f"need at least batch_size={cfg.batch_size}")
    return data


def train_refine(
    manifest_uri: str, features_uri: str, out: str, cfg: RefineConfig, run: TrainRunConfig,
    normalizer: TagNormalizer, endpoint_url: str | None = None, data: SplitsData | None = None,
    distances: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict:
    """Trains the refinement network; returns the metrics also saved in `out` (with report.json)."""
    import ray

    t0 = time.perf_counter()
    data = data or refine_data(manifest_uri, features_uri, cfg, normalizer, endpoint_url)
    train = data.parts["train"]
    ctx, kb = distances or tag_distance_parts(data)
    xi = tag_similarity(ctx, kb, cfg.alpha).astype(np.float32)
    print(f"[train] refine head: {len(train)} training images, {data.tags} tags, ξ with α={cfg.alpha} "
          f"({100 * (xi > 0).mean():.0f}% of tag pairs related), {run.workers} worker(s)", flush=True)
    name = run_name(RUN_NAME, cfg, ("epochs", "checkpoint_every"), data.vocab.version, store.comparable(data.identity),
                    run.workers)
    inputs = {"tags": data.tags, "train": ray.put({"x": train.x, "tag_ids": train.tag_ids, "xi": xi}),
              "val": ray.put(data.validation("val"))}
    state = fit_on_ray("refine", cfg, inputs, run, out, name, endpoint_url)
    recipe, history = state["recipe"], state["history"]
    model, phi0 = (build_refine(cfg, train.x.shape[1], data.tags) for _ in range(2))
    model.load_state_dict(recipe["best"]["model"] or recipe["model"])
    phi0.load_state_dict(recipe["phi0"])
    metrics = {"head": "refine", "train_images": len(train), "tags": data.tags, "workers": run.workers, "device": history[-1].get("device") if history else None,
               "best_epoch": recipe["best"]["epoch"], "best_val_map": recipe["best"]["map"],
               "phi0_val_map": history[0].get("val_map") if history else None,
               "final_loss": history[-1]["loss"] if history else None, "history": history,
               "seconds": time.perf_counter() - t0, "run": to_dict(run), "checkpoints": storage.join(out, "_ray", name)}
    report = evaluate_refine_model(model, phi0, data)
    metrics["verdict"] = report["verdict"]  # in words: did it beat the baselines of its own report?
    save_net_head(SavedNetHead(model.eval(), data.vocab, cfg, data.identity, data.counts, metrics), out, endpoint_url)
    plot_epochs(history, out, "refinement (epoch 0 = ϕ0)")
    storage.write_text(storage.join(out, REPORT_FILE), jsonio.dumps(report, REPORT_FILE, indent=1), endpoint_url)
    print("\n".join(summary_lines(report)), flush=True)
    return metrics
