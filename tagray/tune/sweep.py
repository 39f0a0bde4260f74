"""`tagray tune`: a Ray Tune sweep over a neighbourhood head's settings (SPEC §4).

The driver reads the splits once (features, targets, metadata lists; for refine also the tag
distances dist_ctx and dist_KB, which do not depend on α) and hands them to every trial
through the object store (`tune.with_parameters`). A trial trains one configuration in its
own process with the head's recipe under `run_recipe` — the loop the Ray Train worker runs,
on the same arrays, so `tagray train` with the best settings is the same computation — reports
validation mAP per label every epoch with a checkpoint, and ASHA stops the weak ones early. Trials run concurrently, as many as the cluster's CPUs (and GPUs) hold.
A refine sweep over settings ϕ0 does not depend on trains ϕ0 once and every trial starts from it;
a neighbours sweep computes the Jaccard neighbours once per distinct NEIGHBOR_SETTINGS (at the
largest M swept) and every trial takes its first M columns.

Outputs under OUT: results.csv (one row per trial: its settings, best validation mAP, epochs
run), mAP against each swept setting (sweep.png), best_model/ (a model directory that
`tagray evaluate` and, for refine, `tagray serve` load; report.json beside it), and _ray/ (Tune's
experiment: re-running the same command resumes an interrupted sweep).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import tempfile
import time

import numpy as np
import torch

from tagray import jsonio
from tagray.config import ConfigError, from_dict, to_dict
from tagray.data import storage
from tagray.data.normalize import TagNormalizer
from tagray.heads.recipe import run_recipe
from tagray.heads.recipes import build_recipe
from tagray.heads.recipes.neighbors import build_neighbors
from tagray.heads.recipes.refine import build_refine
from tagray.heads.split_arrays import SplitsData, metadata_lists, metadata_neighbors
from tagray.train.run_config import ray_storage
from tagray.train.worker import load_state, quiet_trial_checkpoint_lines, save_state
from tagray.tune.space import TuneConfig, head_config_class

log = logging.getLogger(__name__)

RESULTS_FILE = "results.csv"
# per trial, by the sweep's metric; its latest checkpoint is kept besides. Tune also forces a snapshot
# of the whole experiment's state (and waits for its upload) every `num_to_keep` checkpoints of a
# trial: at 1 that is every epoch of every trial, and the shipped sweep with its output on S3 took
# 1.18-1.29x its time at 3 (no difference on local disk; BENCHMARKS, *Sweeps: trial checkpoints kept*)
TRIAL_CHECKPOINTS_KEPT = 3
# Tune warns whenever two forced snapshots fall within this many seconds: every few epochs of a
# small corpus's sub-second epochs. The rhythm above is chosen and measured; a user's setting wins.
EXCESSIVE_SYNC_WARNING_S = "0"


class SweepData(SplitsData):
    """SplitsData plus what trials of one head need and the driver computes once."""

    def __init__(self, manifest_uri: str, features_uri: str, sweep: TuneConfig, normalizer: TagNormalizer,
                 endpoint_url: str | None = None) -> None:
        super().__init__(manifest_uri, features_uri, normalizer, endpoint_url)
        self.head = sweep.head
        self.lists, self.distances = {}, None
        if sweep.head == "neighbors":
            spec = sweep.search_space.get("metadata", {})
            kinds = next(iter(spec.values())) if spec else [sweep.fixed.get("metadata", "tags")]
            self.lists = {k: metadata_lists(self.manifest, k, normalizer) for k in kinds}
        else:
            from tagray.train.refine_run import tag_distance_parts

            self.distances = tag_distance_parts(self)
        self.manifest = self.manifest.select(["image_id", "split"])  # trials need only the split column


class SweepFailed(RuntimeError):
    """Every trial of a sweep errored: the message names the results table and the first error."""


class TuneSession:
    """A Ray Tune trial's session (tagray/heads/recipe.Session): one process — the trial's — on its
    GPU when the sweep gives trials one (trial_gpus), else the CPU; checkpoints through
    `tune.report` at the end of every epoch (ASHA counts reports as iterations, so mid-epoch
    checkpoints are skipped), restored from `tune.get_checkpoint()` on a resumed sweep."""

    world, rank = 1, 0

    def __init__(self) -> None:
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def prepare(self, model, **ddp):
        return model.to(self.device)

    def all_reduce(self, t):
        return t

    def broadcast(self, t, src: int = 0):
        return t

    def barrier(self) -> None:
        return None

    def restore(self) -> dict | None:
        from ray import tune

        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            return load_state(d)

    def report(self, metrics: dict, state: dict | None, epoch_end: bool = True) -> None:
        from ray import tune

        if not epoch_end:
            return
        with tempfile.TemporaryDirectory() as d:
            save_state(state, d)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    def stream(self, per_worker: int, seed: int, epoch: int):
        return None


def neighbor_key(cfg) -> tuple:
    """What a configuration's Jaccard neighbours depend on besides the data and M (NEIGHBOR_SETTINGS)."""
    from tagray.heads.neighborhood import NEIGHBOR_SETTINGS

    return tuple(getattr(cfg, k) for k in NEIGHBOR_SETTINGS)


def trial_neighbors(cfg, data: SweepData, shared: dict | None = None) -> dict[str, np.ndarray]:
    """The train and val splits' M nearest of one configuration: the first M columns of the sweep's
    shared neighbours of its NEIGHBOR_SETTINGS (`shared_neighbors`), or computed here."""
    found = (shared or {}).get(neighbor_key(cfg))
    if found is not None and all(a.shape[1] >= cfg.max_rank for a in found.values()):
        return {s: np.ascontiguousarray(a[:, : cfg.max_rank]) for s, a in found.items()}
    parts = [data.parts["train"], data.parts["val"]]
    return metadata_neighbors(data.lists[cfg.metadata], data.manifest.column("split"), parts, cfg, progress=False)


def trial_inputs(head: str, cfg, data: SweepData, neighbors: dict | None = None) -> dict:
    """The recipe inputs of one configuration — the same arrays `tagray train --head …` gives its
    workers (tagray/train/neighbors_run.py, refine_run.py), so a trial is the same computation.
    `neighbors`: the sweep's shared Jaccard neighbours (`shared_neighbors`)."""
    train = data.parts["train"]
    if head == "neighbors":
        nn = trial_neighbors(cfg, data, neighbors)
        return {"tags": data.tags,
                "train": {"target_ids": train.targets(cfg.target), "x": train.x, "neighbors": nn["train"]},
                "val": {**data.validation("val"), "neighbors": nn["val"]}}
    from tagray.data.tag_similarity import tag_similarity

    xi = tag_similarity(*data.distances, cfg.alpha).astype(np.float32)
    return {"tags": data.tags, "train": {"x": train.x, "tag_ids": train.tag_ids, "xi": xi}, "val": data.validation("val")}


def trial(config: dict, data: SweepData, phi0: dict | None = None, neighbors: dict | None = None) -> None:
    """One configuration of the sweep: the head's recipe under `run_recipe`, as `tagray train` runs
    it (`phi0`: the refine sweep's shared ϕ0, `shared_phi0`; `neighbors`: a neighbours sweep's
    shared Jaccard neighbours, `shared_neighbors`)."""
    quiet_trial_checkpoint_lines()
    torch.set_num_threads(1)
    cfg = from_dict(head_config_class(data.head), config, "trial")
    inputs = trial_inputs(data.head, cfg, data, neighbors)
    if phi0 is not None:
        inputs["phi0"] = phi0
    run_recipe(build_recipe(data.head, cfg, inputs), TuneSession())


def shared_phi0(sweep: TuneConfig, data: SweepData) -> dict | None:
    """A refine sweep that varies none of the settings ϕ0 depends on (PHI0_SETTINGS: λ1, λ2, α, M,
    m, the refinement's lr…) trains ϕ0 once, in a Ray task with one trial's resources, and every
    trial starts from it: the same ϕ0, optimiser steps and epoch-0 row each would have trained
    (tests/test_recipes.py), without N trials repeating the same Adam epochs. None otherwise."""
    import ray

    from tagray.heads.recipes.refine import PHI0_SETTINGS

    if sweep.head != "refine" or set(sweep.search_space) & set(PHI0_SETTINGS):
        return None
    cfg = from_dict(head_config_class("refine"), dict(sweep.fixed), "fixed")
    t0 = time.perf_counter()
    task = ray.remote(_train_phi0).options(num_cpus=sweep.trial_cpus, num_gpus=sweep.trial_gpus)
    try:
        phi0 = ray.get(task.remote(cfg, data))
    except ray.exceptions.RayTaskError as e:  # every trial would fail the same way: say so once, before any runs
        cause = e.cause if isinstance(getattr(e, "cause", None), Exception) else e
        raise SweepFailed(f"training the sweep's shared ϕ0 (once, for every trial) failed: {cause}") from None
    print(f"[tune] ϕ0 trained once for every trial ({phi0['steps']} steps, {time.perf_counter() - t0:.1f}s): "
          f"no swept setting changes it", flush=True)
    return phi0


def shared_neighbors(sweep: TuneConfig, data: SweepData) -> dict:
    """A neighbours sweep's Jaccard neighbours, computed once for each distinct NEIGHBOR_SETTINGS
    among its configurations, at the largest `max_rank` swept: {neighbor_key: {"train", "val": (N, M)}}.
    Each is a Ray task with one trial's resources, all at once; trials take their first M columns
    (`trial_neighbors`) instead of each repeating the same search (minutes to hours at 10^5–10^6
    images: BENCHMARKS, *Jaccard*). Empty when a setting they depend on is swept by a continuous
    distribution (each trial then computes its own, as before)."""
    import ray

    from tagray.heads.neighborhood import NEIGHBOR_SETTINGS

    if sweep.head != "neighbors":
        return {}
    values: dict[str, list] = {}
    for key, spec in sweep.search_space.items():
        if key in (*NEIGHBOR_SETTINGS, "max_rank"):
            kind, options = next(iter(spec.items()))
            if kind not in ("grid", "choice"):
                return {}
            values[key] = list(options)
    base = from_dict(head_config_class("neighbors"), dict(sweep.fixed), "fixed")
    widest = max(values.pop("max_rank", [base.max_rank]))
    configs = {}
    for combo in itertools.product(*values.values()):
        try:
            cfg = dataclasses.replace(base, **dict(zip(values, combo, strict=True)), max_rank=widest)
        except ConfigError:  # a combination no trial can run (its trials fail with this error themselves)
            continue
        configs.setdefault(neighbor_key(cfg), cfg)
    t0 = time.perf_counter()
    task = ray.remote(_neighbors_of).options(num_cpus=sweep.trial_cpus)
    ref = ray.put(data)
    found = dict(zip(configs, ray.get([task.remote(cfg, ref) for cfg in configs.values()]), strict=True))
    print(f"[tune] Jaccard neighbours computed once for {len(found)} setting(s) of {', '.join(NEIGHBOR_SETTINGS[:2])}… "
          f"at M={widest} ({time.perf_counter() - t0:.1f}s): every trial takes its first M", flush=True)
    return found


def _neighbors_of(cfg, data: SweepData) -> dict[str, np.ndarray]:
    return trial_neighbors(cfg, data)


def _train_phi0(cfg, data: SweepData) -> dict:
    from tagray.heads.recipe import LocalSession
    from tagray.heads.recipes.refine import train_phi0

    torch.set_num_threads(1)  # as a trial: the same arithmetic, so the same ϕ0 a trial would train
    inputs = trial_inputs("refine", cfg, data)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return train_phi0(cfg, inputs["tags"], inputs["train"], LocalSession(device=device))


def concurrency(sweep: TuneConfig) -> int:
    """Trials at once: the configured number, else what the cluster's CPUs (and GPUs) hold."""
    import ray

    if sweep.max_concurrent:
        return sweep.max_concurrent
    resources = ray.cluster_resources()
    n = int(resources.get("CPU", 1) // sweep.trial_cpus)
    if sweep.trial_gpus:
        n = min(n, int(resources.get("GPU", 0) // sweep.trial_gpus))
    return max(1, n)


def experiment_name(sweep: TuneConfig, data: SweepData) -> str:
    """One Tune experiment per (sweep settings, data): re-running resumes it."""
    from tagray.features import store

    key = json.dumps([to_dict(sweep), data.vocab.version, store.comparable(data.identity)], sort_keys=True, default=str)
    return f"tune-{sweep.head}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def run_sweep(manifest_uri: str, features_uri: str, out: str, sweep: TuneConfig, normalizer: TagNormalizer,
              endpoint_url: str | None = None, data: SweepData | None = None) -> dict:
    """Runs (or resumes) the sweep, writes the results table, the plot and the best model.
    `data`: the SweepData, when the caller read (and so checked) it before starting Ray."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    t0 = time.perf_counter()
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", EXCESSIVE_SYNC_WARNING_S)
    data = data or SweepData(manifest_uri, features_uri, sweep, normalizer, endpoint_url)
    fs, base = ray_storage(out, endpoint_url)
    name = experiment_name(sweep, data)
    path = f"{base.rstrip('/')}/{name}"
    concurrent = concurrency(sweep)
    resources = {"cpu": sweep.trial_cpus, "gpu": sweep.trial_gpus}
    if tune.Tuner.can_restore(path, storage_filesystem=fs):
        print(f"[tune] resuming the sweep in {path}", flush=True)
        # trials resume from their checkpoints (which hold their ϕ0); one not yet started trains its own
        trainable = tune.with_resources(tune.with_parameters(trial, data=data), resources)
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs)
    else:
        trainable = tune.with_resources(tune.with_parameters(trial, data=data, phi0=shared_phi0(sweep, data),
                                                             neighbors=shared_neighbors(sweep, data)), resources)
        epochs = sweep.epochs() + (1 if sweep.head == "refine" else 0)  # refine reports ϕ0 as an epoch
        tuner = tune.Tuner(
            trainable,
            param_space=sweep.param_space(),
            tune_config=tune.TuneConfig(
                metric=sweep.metric, mode="max", num_samples=sweep.num_samples,
                scheduler=ASHAScheduler(time_attr="training_iteration", max_t=epochs, grace_period=sweep.grace_period,
                                        reduction_factor=sweep.reduction_factor),
                search_alg=_seeded_search(sweep, concurrent),
            ),
            run_config=tune.RunConfig(name=name, storage_path=base, storage_filesystem=fs,
                                      checkpoint_config=checkpoint_config(sweep)),
        )
    print(f"[tune] {sweep.head} sweep: {concurrent} trial(s) at once; experiment → {path}", flush=True)
    t_fit = time.perf_counter()
    results = tuner.fit()
    fit_seconds = time.perf_counter() - t_fit
    errors = [r for r in results if r.error is not None]
    table = results_table(results, sweep)
    storage.makedirs(out, endpoint_url)
    storage.write_text(storage.join(out, RESULTS_FILE), table.to_csv(index=False), endpoint_url)
    if table["best_val_map"].isna().all():
        first = next((e for e in table["error"] if e), "no trial reported a validation mAP")
        raise SweepFailed(f"every trial of the sweep failed (see {storage.join(out, RESULTS_FILE)} and {path}): {first}")
    plot = plot_sweep(table, sweep, out)
    best = results.get_best_result(metric=sweep.metric, mode="max", scope="all")
    summary = {"head": sweep.head, "trials": len(table), "errored_trials": len(errors), "concurrent_trials": concurrent,
               "best_val_map": float(table["best_val_map"].max()), "best_config": _settings(best.config, sweep),
               "results": storage.join(out, RESULTS_FILE), "plot": plot, "experiment": path,
               "trials_seconds": fit_seconds, "seconds": time.perf_counter() - t0}
    summary["best_model"] = export_best(best, data, sweep, storage.join(out, "best_model"), endpoint_url)
    storage.write_text(storage.join(out, "sweep.json"), jsonio.dumps(summary, "sweep.json", indent=1, default=str), endpoint_url)
    return summary


def checkpoint_config(sweep: TuneConfig):
    """Each trial keeps its TRIAL_CHECKPOINTS_KEPT best checkpoints by the sweep's metric (the
    best epoch, which `export_best` exports, among them) plus, always, its latest (Ray's checkpoint manager
    never deletes that one: a resumed trial restarts from it); not one per epoch per trial."""
    from ray import tune

    return tune.CheckpointConfig(num_to_keep=TRIAL_CHECKPOINTS_KEPT, checkpoint_score_attribute=sweep.metric,
                                 checkpoint_score_order="max")


def _seeded_search(sweep: TuneConfig, concurrent: int):
    """Grid and random variants in a seeded order, at most `concurrent` trials at once (Tune's
    max_concurrent_trials does not apply to a variant generator; its own max_concurrent does)."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=concurrent, random_state=sweep.seed)


def _settings(config: dict, sweep: TuneConfig) -> dict:
    return {k: config[k] for k in sweep.search_space}


def results_table(results, sweep: TuneConfig):
    """One row per trial: swept settings, best and last validation mAP, epochs run, status."""
    import pandas as pd

    rows = []
    for r in results:
        history = r.metrics_dataframe
        maps = history[sweep.metric].to_numpy() if history is not None and sweep.metric in history else np.array([])
        rows.append({**_settings(r.config, sweep), "best_val_map": float(maps.max()) if len(maps) else math.nan,
                     "last_val_map": float(maps[-1]) if len(maps) else math.nan, "epochs_run": int(len(maps)),
                     "error": None if r.error is None else _error_line(r.error), "trial": r.path})
    return pd.DataFrame(rows).sort_values("best_val_map", ascending=False, na_position="last")


def _error_line(error: BaseException) -> str:
    """The trial's own exception ("ValueError: …"): the last line of Ray's wrapped traceback."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


def plot_sweep(table, sweep: TuneConfig, out: str) -> str | None:
    """Best validation mAP of each trial against each swept setting (one panel per setting)."""
    if storage.is_remote(out) or table.empty:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(sweep.search_space)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        values = table[key].to_numpy()
        numeric = all(isinstance(v, (int, float)) for v in values)
        x = values if numeric else [str(v) for v in values]
        ax.scatter(x, table["best_val_map"], s=20)
        if numeric and sweep.search_space[key].get("loguniform"):
            ax.set_xscale("log")
        ax.set(xlabel=key, ylabel="best validation mAP", title=f"{sweep.head}: {key}")
    fig.tight_layout()
    path = storage.join(out, "sweep.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def export_best(best, data: SweepData, sweep: TuneConfig, out: str, endpoint_url: str | None) -> str:
    """The best trial's best epoch as a model directory (with its report.json)."""
    from tagray.heads.net_artifact import SavedNetHead, save_net_head

    checkpoint = best.get_best_checkpoint(sweep.metric, "max") or best.checkpoint
    with checkpoint.as_directory() as d:
        state = load_state(d)
    cfg = from_dict(head_config_class(sweep.head), best.config, "best trial")
    train, recipe = data.parts["train"], state["recipe"]
    build = build_neighbors if sweep.head == "neighbors" else build_refine
    model = build(cfg, train.x.shape[1], data.tags)
    model.load_state_dict(recipe["best"]["model"] or recipe["model"])
    model.eval()
    metrics = {"head": sweep.head, "train_images": len(train), "tags": data.tags,
               "best_val_map": float(recipe["best"]["map"]), "best_epoch": int(recipe["best"]["epoch"]),
               "sweep_settings": _settings(best.config, sweep), "trial": best.path}
    save_net_head(SavedNetHead(model, data.vocab, cfg, data.identity, data.counts, metrics), out, endpoint_url)
    report = _best_report(model, recipe, cfg, data, sweep)
    storage.write_text(storage.join(out, "report.json"), jsonio.dumps(report, "report.json", indent=1), endpoint_url)
    return out


def _best_report(model, state: dict, cfg, data: SweepData, sweep: TuneConfig) -> dict:
    if sweep.head == "neighbors":
        from tagray.eval.neighbors_report import evaluate_neighbors_model

        parts = list(data.parts.values())
        nn = metadata_neighbors(data.lists[cfg.metadata], data.manifest.column("split"), parts, cfg, progress=False)
        return evaluate_neighbors_model(model, data, cfg, "test", neighbors=nn)
    from tagray.eval.refine_report import evaluate_refine_model

    phi0 = build_refine(cfg, model.dim, model.tags)
    phi0.load_state_dict(state["phi0"])
    return evaluate_refine_model(model, phi0, data)
