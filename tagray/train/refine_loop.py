"""The per-worker loop of `tagray train --head refine` (Ray Train, data-parallel, seed 002).

Algorithm 2 on every worker, in lock-step through DDP:
1. ϕ0: `init_epochs` of multi-label logistic loss on the user tags (Adam);
2. candidates: rank 0 searches the M nearest training images in ϕ0's visual-feature space
   (exact faiss) and broadcasts them;
3. `epochs` of Algorithm 1 batches on L_vis + λ1 L_sem + λ2 L_err (SGD, ÷10 every
   `lr_step_epochs`): each worker builds its s/m/world groups from its share of a seeded
   permutation of the anchors, with its (identical) replica of the current ϕ.

Rank 0 reports the validation mAP after ϕ0 (epoch 0) and after every epoch, keeps the best
epoch's weights and checkpoints (ϕ0's weights travel in the checkpoint, the candidates are
recomputed from them). A restarted run continues after the last finished epoch.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from tagray.config import from_dict
from tagray.eval.metrics import mean_average_precision
from tagray.heads.refine import (
    RefineConfig,
    RefineNet,
    dynamic_batch,
    init_step,
    make_optimizers,
    refine_features,
    refine_scores,
    refine_step,
    tag_laplacian,
    visual_candidates,
)
from tagray.heads.targets import multi_hot
from tagray.jsonio import check_loss
from tagray.train.array_loops import BestEpoch, report_epoch, restored_state, worker_inputs


def validation_map(model: RefineNet, val: dict) -> float:
    scores = refine_scores(model, torch.from_numpy(val["x"])).numpy()
    return mean_average_precision(scores[val["rows"]][:, val["cols"]], val["truth"])["map_label"]


def _candidates(model: RefineNet, x: torch.Tensor, cfg: RefineConfig, world: int, rank: int) -> np.ndarray:
    import torch.distributed as dist

    if rank == 0:
        cand = torch.from_numpy(visual_candidates(refine_features(model, x), cfg.max_rank))
    else:
        cand = torch.empty(len(x), cfg.max_rank, dtype=torch.int32)
    if world > 1:
        dist.broadcast(cand, 0)
    return cand.numpy()


def refine_train_loop(config: dict) -> None:
    import ray.train.torch

    cfg = from_dict(RefineConfig, config["head"], "head config")
    world, rank, train, val, x_all = worker_inputs(config)
    tags, n = config["tags"], len(train["x"])
    g_all = multi_hot(train["tag_ids"], tags)
    laplacian = tag_laplacian(torch.from_numpy(train["xi"]).float())
    torch.manual_seed(cfg.seed)
    model = RefineNet(x_all.shape[1], tags, cfg.hidden, cfg.dropout)
    init_opt, opt, schedule = make_optimizers(model, cfg)
    done, history, best, phi0 = 0, [], BestEpoch(), None  # done: last finished epoch (0: ϕ0)
    state = restored_state()
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        done, history, best, phi0 = state["epoch"], list(state["history"]), BestEpoch(state["best"]), state["phi0"]
        if rank == 0:
            print(f"[refine] resuming after epoch {done}", flush=True)
    forward = ray.train.torch.prepare_model(model) if world > 1 else model

    def finish_epoch(epoch: int, metrics: dict) -> None:
        if rank == 0:
            metrics["val_map"] = validation_map(model, val)
            metrics["best_val_map"] = best.update(epoch, metrics["val_map"], model)
            print(f"[refine] epoch {epoch}/{cfg.epochs} " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                                                     if k not in ("epoch",)), flush=True)
        history.append(metrics)
        report_epoch(metrics, rank, lambda: {"model": model.state_dict(), "optimizer": opt.state_dict(),
                                             "schedule": schedule.state_dict(), "epoch": epoch, "history": history,
                                             "best": best.state, "phi0": phi0})

    if phi0 is None:  # Algorithm 2, step 1
        t0 = time.perf_counter()
        per_worker = max(1, cfg.init_batch_size // world)
        steps = max(1, n // (per_worker * world))
        losses = []
        for e in range(cfg.init_epochs):
            mine = np.random.default_rng([cfg.seed, 10_000 + e]).permutation(n)[rank::world]
            for step in range(steps):
                idx = mine[step * per_worker : (step + 1) * per_worker]
                loss = init_step(model, forward, init_opt, x_all[idx], g_all[idx])
                losses.append(check_loss(loss, 0, len(losses) + 1, "lower init_lr"))  # epoch 0: ϕ0
        phi0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
        finish_epoch(0, {"epoch": 0, "loss": float(np.mean(losses[-steps:])), "epoch_seconds": time.perf_counter() - t0})
    phi0_model = RefineNet(x_all.shape[1], tags, cfg.hidden, cfg.dropout)
    phi0_model.load_state_dict(phi0)
    candidates = _candidates(phi0_model, x_all, cfg, world, rank)  # step 2
    groups = max(1, cfg.batch_size // cfg.m // world)
    steps = max(1, n // (groups * world))
    for epoch in range(done + 1, cfg.epochs + 1):  # steps 3–5
        t0 = time.perf_counter()
        mine = np.random.default_rng([cfg.seed, epoch]).permutation(n)[rank::world]
        rows = []
        for step in range(steps):
            batch = dynamic_batch(model, x_all, mine[step * groups : (step + 1) * groups], candidates, cfg.m)
            rows.append(refine_step(model, forward, opt, x_all[batch], g_all[batch], laplacian, cfg, world))
            check_loss(rows[-1]["loss"], epoch, (epoch - 1) * steps + step + 1)  # before the epoch's checkpoint
        schedule.step()
        metrics = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        finish_epoch(epoch, {"epoch": epoch, **metrics, "epoch_seconds": time.perf_counter() - t0})
