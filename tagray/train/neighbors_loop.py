"""The per-worker loop of `tagray train --head neighbors` (Ray Train, data-parallel, seed 003).

The train and validation splits' arrays (features, target ids, metadata neighbours) are in
the object store; every worker reads them zero-copy. Each epoch is a seeded permutation of
the training images dealt out by rank; a step samples one m-subset neighbourhood per image
and runs `neighbors_step` (DDP averages the gradients). After every epoch rank 0 scores the
validation split (mean over `test_samples` neighbourhoods, eq. 1), reports its mAP and
checkpoints, keeping the best epoch's weights (seed 003 §3.4: "keeping the model snapshot that
performs the best on the validation set"). A restarted run continues after the last epoch.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from tagray.config import from_dict
from tagray.eval.metrics import mean_average_precision
from tagray.heads.neighborhood import (
    NeighborhoodNet,
    NeighborsConfig,
    gather_neighborhood,
    make_optimizer,
    neighborhood_scores,
    neighbors_step,
    sample_neighborhoods,
)
from tagray.heads.targets import multi_hot
from tagray.jsonio import check_loss
from tagray.train.array_loops import BestEpoch, report_epoch, restored_state, worker_inputs


def validation_map(model: NeighborhoodNet, val: dict, cfg: NeighborsConfig) -> float:
    """mAP per label on the validation split: the truth columns `val["truth"]` of its `val["rows"]`."""
    scores = neighborhood_scores(model, torch.from_numpy(val["x"]), val["neighbors"], cfg.m, cfg.test_samples, cfg.seed)
    return mean_average_precision(scores.numpy()[val["rows"]][:, val["cols"]], val["truth"])["map_label"]


def neighbors_train_loop(config: dict) -> None:
    import ray.train.torch

    cfg = from_dict(NeighborsConfig, config["head"], "head config")
    world, rank, train, val, x_all = worker_inputs(config)
    tags, n = config["tags"], len(train["x"])
    torch.manual_seed(cfg.seed)
    model = NeighborhoodNet(x_all.shape[1], tags, cfg.hidden, cfg.dropout)
    opt = make_optimizer(model, cfg)
    start_epoch, history, best = 0, [], BestEpoch()
    state = restored_state()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start_epoch, history, best = state["epoch"], list(state["history"]), BestEpoch(state["best"])
        if rank == 0:
            print(f"[neighbors] resuming after epoch {start_epoch}", flush=True)
    forward = ray.train.torch.prepare_model(model) if world > 1 else model
    per_worker = max(1, cfg.batch_size // world)
    steps = max(1, n // (per_worker * world))
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, epoch, rank])
        mine = np.random.default_rng([cfg.seed, epoch]).permutation(n)[rank::world]
        losses = []
        for step in range(steps):
            idx = mine[step * per_worker : (step + 1) * per_worker]
            z, mask = gather_neighborhood(x_all, sample_neighborhoods(train["neighbors"][idx], cfg.m, rng))
            y = multi_hot(train["target_ids"][idx], tags)
            loss = neighbors_step(model, forward, opt, x_all[idx], z, mask, y, cfg.l2)
            losses.append(check_loss(loss, epoch + 1, epoch * steps + step + 1))  # before the epoch's checkpoint
        metrics = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "epoch_seconds": time.perf_counter() - t0}
        if rank == 0:
            metrics["val_map"] = validation_map(model, val, cfg)
            metrics["best_val_map"] = best.update(epoch + 1, metrics["val_map"], model)
            print(f"[neighbors] epoch {epoch + 1}/{cfg.epochs} loss {metrics['loss']:.4f} "
                  f"val mAP {metrics['val_map']:.4f} ({metrics['epoch_seconds']:.1f}s)", flush=True)
        history.append(metrics)
        report_epoch(metrics, rank, lambda e=epoch: {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                                     "epoch": e + 1, "history": history, "best": best.state})
