"""The one Ray Train driver: a TorchTrainer running tagray/train/worker.train_worker for any head.

It builds the ScalingConfig (workers, CPUs, a GPU each with `gpu`), the RunConfig (storage
under MODEL/_ray/<run name>, so re-running the same command resumes; FailureConfig with the
run's `max_failures`; CheckpointConfig keeping 2) and nothing else: data preparation,
evaluation and plots belong to the callers (tagray/train/*_run.py, tagray/eval).
"""

from __future__ import annotations

from tagray.config import to_dict
from tagray.train.run_config import TrainRunConfig, ray_storage, scaling
from tagray.train.worker import load_state, train_worker

CHECKPOINTS_KEPT = 2


def fit_on_ray(head: str, cfg, inputs: dict, run: TrainRunConfig, out: str, name: str,
               endpoint_url: str | None = None, datasets: dict | None = None, extra: dict | None = None) -> dict:
    """Trains `head` with `cfg` on `inputs` (arrays as object refs, scalars) under MODEL/_ray/`name`
    (resuming a run of that name) and returns the state of its last checkpoint: {"recipe",
    "history", "next_epoch"}."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    fs, base = ray_storage(out, endpoint_url)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"head": head, "cfg": to_dict(cfg), "inputs": inputs, "torch_threads": run.torch_threads,
                           **(extra or {})},
        scaling_config=scaling(run),
        run_config=RunConfig(name=name, storage_path=base, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=run.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT)),
        datasets=datasets,
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint (see {out}/_ray)")
    with result.checkpoint.as_directory() as d:
        return load_state(d)
