"""`tagray train --head neighbors` (seed 003): metadata neighbourhoods per split, the Ray Train
loop, the best epoch on validation saved as a model directory, and the test split's report
with the paper's baselines (report.json, Table 2's columns).

Checkpoints live in MODEL/_ray/<run name>; re-running the same command resumes.
"""

from __future__ import annotations

import logging
import time

from tagray import jsonio
from tagray.config import to_dict
from tagray.data import schema, storage
from tagray.data.normalize import TagNormalizer
from tagray.eval.neighbors_report import evaluate_neighbors_model
from tagray.eval.shape import summary_lines
from tagray.eval.training_plot import plot_epochs
from tagray.features import store
from tagray.heads.neighborhood import NeighborsConfig
from tagray.heads.net_artifact import SavedNetHead, save_net_head
from tagray.heads.recipes.neighbors import build_neighbors
from tagray.heads.split_arrays import SplitArrays, SplitsData, metadata_lists, metadata_neighbors
from tagray.train.driver import fit_on_ray
from tagray.train.run_config import TrainRunConfig, run_name

log = logging.getLogger(__name__)

RUN_NAME = "neighbors"
REPORT_FILE = "report.json"


class NeighborsData(SplitsData):
    """The three splits' arrays and their metadata neighbours (seed 003 §3.1)."""

    def __init__(self, manifest_uri: str, features_uri: str, cfg: NeighborsConfig, normalizer: TagNormalizer,
                 endpoint_url: str | None = None, vocab=None) -> None:
        super().__init__(manifest_uri, features_uri, normalizer, endpoint_url, vocab=vocab)
        if cfg.target == "labels" and not self.parts["train"].labelled.any():
            raise schema.SchemaError(f"{manifest_uri}: target=labels but no training image carries labels (use target=tags)")
        lists = metadata_lists(self.manifest, cfg.metadata, normalizer)
        self.neighbors = metadata_neighbors(lists, self.manifest.column("split"), list(self.parts.values()), cfg)

    def shared(self, split: str, target: str) -> dict:
        """What the loop reads of a split: x and neighbours, with target ids (train) or truth (val)."""
        part = self.parts[split]
        extra = {"target_ids": part.targets(target), "x": part.x} if split == "train" else self.validation(split)
        return {**extra, "neighbors": self.neighbors[split]}


def neighbors_data(manifest_uri: str, features_uri: str, cfg: NeighborsConfig, normalizer: TagNormalizer,
                   endpoint_url: str | None = None) -> NeighborsData:
    """The splits and their neighbours, checked (no Ray needed: `tagray train` calls it before Ray starts)."""
    data = NeighborsData(manifest_uri, features_uri, cfg, normalizer, endpoint_url)
    if len(data.parts["train"]) < cfg.batch_size:
        raise schema.SchemaError(f"only {len(data.parts['train'])} training images have features; "
                                 f"need at least batch_size={cfg.batch_size}")
    return data


def train_neighbors(
    manifest_uri: str, features_uri: str, out: str, cfg: NeighborsConfig, run: TrainRunConfig,
    normalizer: TagNormalizer, endpoint_url: str | None = None, data: NeighborsData | None = None,
) -> dict:
    """Trains the neighbourhood model; returns the metrics also saved in `out` (with report.json).
    `data`: what `neighbors_data` read, when the caller checked it before starting Ray."""
    import ray

    t0 = time.perf_counter()
    data = data or neighbors_data(manifest_uri, features_uri, cfg, normalizer, endpoint_url)
    train: SplitArrays = data.parts["train"]
    print(f"[train] neighbors head: {len(train)} training images, {data.tags} tags, neighbourhoods by {cfg.metadata} "
          f"(m={cfg.m} of M={cfg.max_rank}), {run.workers} worker(s)", flush=True)
    name = run_name(RUN_NAME, cfg, ("epochs", "checkpoint_every", "test_samples"), data.vocab.version,
                    store.comparable(data.identity), run.workers)
    inputs = {"tags": data.tags, "train": ray.put(data.shared("train", cfg.target)),
              "val": ray.put(data.shared("val", cfg.target))}
    state = fit_on_ray("neighbors", cfg, inputs, run, out, name, endpoint_url)
    recipe, history = state["recipe"], state["history"]
    model = build_neighbors(cfg, train.x.shape[1], data.tags)
    model.load_state_dict(recipe["best"]["model"] or recipe["model"])
    model.eval()
    metrics = {"head": "neighbors", "train_images": len(train), "tags": data.tags, "workers": run.workers, "device": history[-1].get("device") if history else None,
               "best_epoch": recipe["best"]["epoch"], "best_val_map": recipe["best"]["map"],
               "final_loss": history[-1]["loss"] if history else None, "history": history,
               "neighbors_found": {s: float((nn >= 0).sum(1).mean()) for s, nn in data.neighbors.items()},
               "seconds": time.perf_counter() - t0, "run": to_dict(run), "checkpoints": storage.join(out, "_ray", name)}
    report = evaluate_neighbors_model(model, data, cfg, "test")
    metrics["verdict"] = report["verdict"]  # in words: did it beat the baselines of its own report?
    save_net_head(SavedNetHead(model, data.vocab, cfg, data.identity, data.counts, metrics), out, endpoint_url)
    plot_epochs(history, out, f"neighbourhood model ({cfg.metadata})")
    storage.write_text(storage.join(out, REPORT_FILE), jsonio.dumps(report, REPORT_FILE, indent=1), endpoint_url)
    print("\n".join(summary_lines(report)), flush=True)
    return metrics
