"""What the Ray Train loops of the neighbourhood heads (neighbors, refine) share: their inputs
are split arrays in the object store (split_arrays.py), they validate and checkpoint
once per epoch on rank 0, and keep the best epoch's weights.

`fit_array_loop` is the driver side (TorchTrainer, MODEL/_ray/<run name>, the final state);
`worker_inputs`, `restored_state`, `BestEpoch` and `report_epoch` the worker side.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable

import torch

STATE_FILE = "state.pt"


def load_state(directory: str) -> dict:
    return torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)


def worker_inputs(config: dict) -> tuple[int, int, dict, dict, torch.Tensor]:
    """(world size, rank, train arrays, validation arrays, train features as a tensor)."""
    import ray
    import ray.train

    ctx = ray.train.get_context()
    torch.set_num_threads(config.get("torch_threads", 1))
    train, val = ray.get(config["train_ref"]), ray.get(config["val_ref"])
    with warnings.catch_warnings():  # the object store's arrays are read-only; nothing writes to them
        warnings.simplefilter("ignore", UserWarning)
        x_all = torch.from_numpy(train["x"])
    return ctx.get_world_size(), ctx.get_world_rank(), train, val, x_all


def restored_state() -> dict | None:
    """The state of the run's last checkpoint (a resumed run), or None."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return load_state(d)


class BestEpoch:
    """The epoch of highest validation mAP and a copy of its weights (seed 003 §3.4)."""

    def __init__(self, saved: dict | None = None) -> None:
        self.state = saved or {"map": -1.0, "epoch": 0, "model": None}

    def update(self, epoch: int, val_map: float, model: torch.nn.Module) -> float:
        if val_map > self.state["map"]:
            self.state = {"map": val_map, "epoch": epoch,
                          "model": {k: v.detach().clone() for k, v in model.state_dict().items()}}
        return self.state["map"]


def report_epoch(metrics: dict, rank: int, state: Callable[[], dict]) -> None:
    """Every worker reports (a barrier); rank 0 attaches a checkpoint of `state()`."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(state(), os.path.join(d, STATE_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def fit_array_loop(loop: Callable[[dict], None], config: dict, run, out: str, name: str,
                   endpoint_url: str | None = None) -> dict:
    """Runs `loop` on Ray Train under MODEL/_ray/`name` (resuming a run of that name) and returns
    the state of its last checkpoint."""
    from ray.train import CheckpointConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from tagray.train.run import ray_storage, scaling

    fs, base = ray_storage(out, endpoint_url)
    trainer = TorchTrainer(
        loop, train_loop_config={**config, "torch_threads": run.torch_threads}, scaling_config=scaling(run),
        run_config=RunConfig(name=name, storage_path=base, storage_filesystem=fs,
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint (see {out}/_ray)")
    with result.checkpoint.as_directory() as d:
        return load_state(d)
