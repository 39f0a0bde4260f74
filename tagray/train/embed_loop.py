"""The per-worker loop of `tagray train --head embed` (Ray Train, data-parallel h; word
vectors in the embedding shard server).

Each worker holds a replica of the MLP h (gradients averaged by DDP) and no word vectors:
every step it pulls the rows of the words its batch sampled from the shard actors and
pushes their gradients back (tagray.heads.embedding.embed_step). A checkpoint is the MLP's
state in Ray Train's checkpoint plus a snapshot of every shard written under the run's
storage; restoring puts both back, so a killed run resumes with h and the word vectors of
the same step.
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import torch

from tagray.config import from_dict
from tagray.data import storage
from tagray.heads.embedding import EmbedConfig, embed_step, make_optimizer, make_scheduler, new_mlp
from tagray.heads.samplers import make_sampler
from tagray.jsonio import check_loss
from tagray.train.data import epoch_batches
from tagray.train.shards import ShardedWordTable

STATE_FILE = "state.pt"
SNAPSHOTS_KEPT = 3  # CheckpointConfig keeps 2 checkpoints; each names one snapshot


def load_state(directory: str) -> dict:
    return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)


def snapshot_dir(root: str, step: int) -> str:
    return storage.join(root, f"step-{step:09d}")


def _prune_snapshots(root: str, endpoint_url: str | None) -> None:
    import pyarrow.fs as pafs

    fs, path = storage.filesystem_for(root, endpoint_url)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    steps = sorted(i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("step-"))
    for old in steps[:-SNAPSHOTS_KEPT]:
        fs.delete_dir(old)


def embed_train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    cfg = from_dict(EmbedConfig, config["head"], "head config")
    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    torch.set_num_threads(config.get("torch_threads", 1))
    words, word_dim = config["words"], config["word_dim"]
    table = ShardedWordTable.connect(config["shard_names"], words, word_dim)
    endpoint_url = config.get("endpoint_url")
    mlp = new_mlp(config["dim"], word_dim, cfg)
    opt = make_optimizer(mlp, cfg)
    per_worker = max(1, cfg.batch_size // world)
    schedule = make_scheduler(opt, cfg, cfg.epochs * (config["train_images"] // (per_worker * world)))
    sampler = make_sampler(cfg.sampler, np.asarray(config["counts"]), cfg.sampler_power, cfg.pool_size)
    start_epoch, step = 0, 0
    history: list[dict] = []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_state(d)
        mlp.load_state_dict(state["mlp"])
        opt.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start_epoch, step, history = state["epoch"], state["step"], list(state.get("history", []))
        if rank == 0:
            table.restore(state["words"])
            print(f"[train] resuming at epoch {start_epoch}, step {step}; word vectors from {state['words']}", flush=True)
    if world > 1:
        dist.barrier()  # no worker pulls before the shards are restored
    device = ray.train.torch.get_device()
    forward = ray.train.torch.prepare_model(mlp) if world > 1 else mlp.to(device)
    shard = ray.train.get_dataset_shard("train")
    steps_at_start = step

    def report(metrics: dict, epochs_done: int, final: bool) -> None:
        """Every worker reports (a barrier); at a checkpoint rank 0 first snapshots the shards
        while the others wait, so the snapshot is of one step."""
        if not final and step % cfg.checkpoint_every:
            ray.train.report(metrics)
            return
        if world > 1:
            dist.barrier()
        if rank != 0:
            ray.train.report(metrics)
            return
        words_uri = table.snapshot(snapshot_dir(config["snapshot_root"], step), endpoint_url)
        with tempfile.TemporaryDirectory() as d:
            torch.save({"mlp": mlp.state_dict(), "optimizer": opt.state_dict(), "schedule": schedule.state_dict(),
                        "epoch": epochs_done, "step": step, "history": history, "words": words_uri},
                       os.path.join(d, STATE_FILE))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        _prune_snapshots(config["snapshot_root"], endpoint_url)

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        rng = np.random.default_rng([cfg.seed, epoch, rank])
        sampler.new_epoch(rng)
        mlp.train()
        losses = []
        for batch in epoch_batches(shard, per_worker, cfg.seed, epoch, rank):
            x = torch.from_numpy(batch["feature"]).to(device)
            loss = embed_step(forward, opt, x, batch["tag_ids"], table, cfg, sampler, rng, words, world)
            step += 1
            losses.append(check_loss(loss, epoch + 1, step, "lower lr / word_lr"))  # before any report or snapshot
            schedule.step()
            if step % cfg.checkpoint_every == 0:
                report({"epoch": epoch, "step": step, "loss": float(np.mean(losses[-50:]))}, epoch, final=False)
        loss = float(np.mean(losses)) if losses else float("nan")
        metrics = {"epoch": epoch + 1, "step": step, "loss": loss, "epoch_seconds": time.perf_counter() - t0,
                   "steps_in_epoch": len(losses), "run_started_at_step": steps_at_start}
        if rank == 0:
            print(f"[train] epoch {epoch + 1}/{cfg.epochs} step {step} loss {loss:.4f} "
                  f"({metrics['epoch_seconds']:.1f}s)", flush=True)
        history.append(metrics)
        report(metrics, epoch + 1, final=epoch + 1 == cfg.epochs)
