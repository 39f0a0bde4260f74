"""The one Ray Train worker: runs any head's recipe (tagray/heads/recipes) with `run_recipe`.

`TrainSession` is what Ray Train gives the loop: the device Ray assigned this worker
(`ray.train.torch.get_device()`), `prepare_model` (moves the model there; DDP when there are
several workers), the process group's all-reduce / broadcast / barrier, the run's last
checkpoint to resume from, `ray.train.report` with a checkpoint directory (rank 0), and this
worker's shard of a streamed training set (Ray Data). Nothing here is specific to a head.

Inputs arrive in `train_loop_config`: {"head", "cfg" (the config as a dict), "inputs" (arrays
as object refs, read zero-copy, and scalars), "torch_threads", and for the embed head
"shard_names" (the word shard actors to connect to)}.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from typing import Any

import torch
from torch import nn

from tagray.heads.recipe import run_recipe
from tagray.heads.recipes import build_recipe

STATE_FILE = "state.pt"


def save_state(state: dict, directory: str) -> None:
    torch.save(state, os.path.join(directory, STATE_FILE))


def load_state(directory: str) -> dict:
    return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)


class TrainSession:
    """A Ray Train worker's session (see tagray/heads/recipe.Session)."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.world, self.rank = ctx.get_world_size(), ctx.get_world_rank()
        self.device = ray.train.torch.get_device()

    def prepare(self, model: nn.Module, **ddp: Any) -> nn.Module:
        import ray.train.torch

        if self.world == 1:
            return model.to(self.device)
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp or None)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if self.world > 1:
            dist.all_reduce(t)
        return t

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        import torch.distributed as dist

        if self.world > 1:
            dist.broadcast(t, src)
        return t

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.world > 1:
            dist.barrier()

    def restore(self) -> dict | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            return load_state(d)

    def report(self, metrics: dict, state: dict | None, epoch_end: bool = True) -> None:
        import ray.train

        if state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            save_state(state, d)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    def stream(self, per_worker: int, seed: int, epoch: int):
        import ray.train

        from tagray.train.data import epoch_batches

        return epoch_batches(ray.train.get_dataset_shard("train"), per_worker, seed, epoch, self.rank)


def resolve_inputs(inputs: dict) -> dict:
    """Object refs (one level, or a dict of them) → their values; numpy arrays from the object
    store are read-only and shared: nothing writes to them."""
    import ray

    out = {}
    for k, v in inputs.items():
        out[k] = ray.get(v) if isinstance(v, ray.ObjectRef) else v
    return out


# Ray Train (2.60) logs two INFO lines to the console for every checkpoint, on every worker: the
# storage path it was copied to and the report with its metrics. tagray checkpoints every epoch (and
# every `checkpoint_every` steps), so they outnumbered the loop's own progress line 2-4 to 1 and
# buried it. They stay in Ray Train's log files (ray-train-sys-worker-*.log in the session's logs);
# every other Ray Train line (worker group start, failures and retries) still reaches the console.
PER_CHECKPOINT_LINES = ("Checkpoint successfully created at", "Reporting training result")


class _NoPerCheckpointLines(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(PER_CHECKPOINT_LINES)


def quiet_checkpoint_lines() -> None:
    """Drops PER_CHECKPOINT_LINES from the console handler Ray Train gave this worker's
    `ray.train` logger (its files keep them)."""
    for handler in logging.getLogger("ray.train").handlers:
        if handler.get_name() == "console" and not any(isinstance(f, _NoPerCheckpointLines) for f in handler.filters):
            handler.addFilter(_NoPerCheckpointLines())


def quiet_trial_checkpoint_lines() -> None:
    """The same line in a Ray Tune trial's process, where it has no file of its own (the trial's
    stderr is what reaches the console): dropped at its logger; Tune's experiment state lists the
    trial's checkpoints."""
    storage_log = logging.getLogger("ray.train._internal.storage")
    if not any(isinstance(f, _NoPerCheckpointLines) for f in storage_log.filters):
        storage_log.addFilter(_NoPerCheckpointLines())


def train_worker(config: dict) -> None:
    """Ray Train's train_loop_per_worker for every head."""
    quiet_checkpoint_lines()
    torch.set_num_threads(config.get("torch_threads", 1))
    session = TrainSession()
    with warnings.catch_warnings():  # torch.as_tensor over the object store's read-only arrays
        warnings.simplefilter("ignore", UserWarning)
        inputs = resolve_inputs(config["inputs"])
        if config["head"] == "embed":
            from tagray.train.shards import ShardedWordTable

            inputs["table"] = ShardedWordTable.connect(config["shard_names"], config["words"], config["word_dim"])
        run_recipe(build_recipe(config["head"], config["cfg"], inputs), session)
