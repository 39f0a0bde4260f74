"""The per-worker loop of `tagray train` (Ray Train, data-parallel).

Each worker streams its shard of the training set, densifies tag ids into multi-hot y, and
runs `em_step`: gradients are averaged by DDP, the EM's minibatch statistics are summed
with an all-reduce, so all replicas hold the same W and the same π. Rank 0 checkpoints
every `checkpoint_every` steps and at the end; a restarted run continues from the last
checkpoint (at the start of the epoch it was in, with the step count it had reached).
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import torch

from tagray.config import from_dict
from tagray.heads.fit import HeadConfig, make_optimizer, make_scheduler, new_model
from tagray.heads.linear import LinearTagger, em_step
from tagray.heads.targets import multi_hot
from tagray.jsonio import check_loss
from tagray.train.data import epoch_batches

STATE_FILE = "state.pt"


def _save(model: LinearTagger, opt, schedule, epoch: int, history: list[dict], directory: str) -> None:
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "schedule": schedule.state_dict(),
                "epoch": epoch, "history": history}, os.path.join(directory, STATE_FILE))


def load_state(directory: str) -> dict:
    return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)


def train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    cfg = from_dict(HeadConfig, config["head"], "head config")
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    torch.set_num_threads(config.get("torch_threads", 1))
    tags, dim = config["tags"], config["dim"]
    model = new_model(dim, tags, cfg, torch.tensor(config["tag_rate"], dtype=torch.float32))
    opt = make_optimizer(model, cfg)
    per_worker = max(1, cfg.batch_size // world)
    schedule = make_scheduler(opt, cfg, cfg.epochs * (config["train_images"] // (per_worker * world)))
    start_epoch = 0
    history: list[dict] = []  # one row per finished epoch; travels in the checkpoints
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_state(d)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start_epoch = state["epoch"]
        history = list(state.get("history", []))
        if rank == 0:
            print(f"[train] resuming at epoch {start_epoch}, step {int(model.steps)}", flush=True)
    device = ray.train.torch.get_device()
    ddp = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False}) if world > 1 else model
    reduce = None
    if world > 1:
        def reduce(t: torch.Tensor) -> torch.Tensor:
            dist.all_reduce(t)
            return t

    shard = ray.train.get_dataset_shard("train")
    steps_at_start = int(model.steps)
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        losses = []
        for batch in epoch_batches(shard, per_worker, cfg.seed, epoch, rank):
            x = torch.from_numpy(batch["feature"]).to(device)
            y = multi_hot(batch["tag_ids"], tags).to(device)
            result = em_step(model, opt, x, y, reduce, n_total=per_worker * world, forward=ddp)
            step = int(model.steps)
            losses.append(check_loss(result.loss, epoch + 1, step))  # before any report: no NaN checkpoint
            schedule.step()
            if step % cfg.checkpoint_every == 0 and step > steps_at_start:
                _report(model, (opt, schedule), epoch, step, losses, rank, history, checkpoint_now=True, last_epoch_done=epoch)
        loss = float(np.mean(losses)) if losses else float("nan")
        metrics = {"epoch": epoch + 1, "step": int(model.steps), "loss": loss, "mean_pi": float(model.pi().mean()),
                   "epoch_seconds": time.perf_counter() - t0, "steps_in_epoch": len(losses),
                   "run_started_at_step": steps_at_start}
        if rank == 0:
            print(f"[train] epoch {epoch + 1}/{cfg.epochs} step {metrics['step']} loss {loss:.4f} "
                  f"mean π {metrics['mean_pi']:.3f} ({metrics['epoch_seconds']:.1f}s)", flush=True)
        final = epoch + 1 == cfg.epochs
        if world > 1:  # the EM keeps every replica's π identical; measure it
            gathered = [torch.empty_like(model.pi()) for _ in range(world)]
            dist.all_gather(gathered, model.pi().contiguous())
            metrics["replica_pi_max_diff"] = float(torch.stack(gathered).sub(model.pi()).abs().max())
        history.append(metrics)
        _report(model, (opt, schedule), epoch + 1, int(model.steps), losses, rank, history, checkpoint_now=final, metrics=metrics,
                last_epoch_done=epoch + 1)


def _report(model, optimizers, epoch, step, losses, rank, history, checkpoint_now: bool, metrics: dict | None = None,
            last_epoch_done: int = 0) -> None:
    """Every worker reports (a barrier); rank 0 attaches the checkpoint. A mid-epoch
    checkpoint records the epoch it is in, so a restart repeats that epoch's data."""
    import ray.train

    metrics = metrics or {"epoch": epoch, "step": step, "loss": float(np.mean(losses[-50:])),
                          "mean_pi": float(model.pi().mean())}
    if checkpoint_now and rank == 0:
        with tempfile.TemporaryDirectory() as d:
            _save(model, *optimizers, last_epoch_done, history, d)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    else:
        ray.train.report(metrics)
