"""How a run uses the Ray cluster (TrainRunConfig: workers, CPUs, GPUs, failures; the check that the
cluster holds the request is tagray.resources.require_resources), and where Ray Train keeps a run (MODEL/_ray/<run name>)."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

from tagray.config import ConfigError, to_dict
from tagray.data import storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainRunConfig:
    workers: int = 1  # Ray Train data-parallel workers
    worker_cpus: float = 1.0  # CPUs per worker (leave some for the data pipeline)
    gpu: bool = False  # one GPU per worker
    data_cpus: float = 0.25  # CPUs per feature-reading actor
    readers: int = 1  # feature-reading actors (raise on clusters where reading is the bottleneck)
    materialize: bool = True  # the driver reads the train split once into the object store (workers slice it zero-copy); false: stream it from Ray Data every epoch (sets larger than the object store)
    max_failures: int = 0  # Ray Train restarts the workers from the last checkpoint this many times after a worker dies
    torch_threads: int = 1  # intra-op threads per worker (CPU)
    shards: int = 2  # embed head: embedding shard actors holding the word vectors (CPU memory)
    shard_cpus: float = 0.1  # embed head: CPUs reserved per shard actor
    resources_wait_s: float | None = None  # wait this long for the cluster to hold the request (None: 600 s if it autoscales, else fail at once)

    def __post_init__(self) -> None:
        if self.workers < 1 or self.shards < 1:
            raise ConfigError(f"workers and shards must be ≥ 1, got {self.workers} and {self.shards}")
        if not (self.worker_cpus > 0 and self.data_cpus > 0 and self.shard_cpus > 0):  # NaN fails too
            raise ConfigError(f"worker_cpus, data_cpus and shard_cpus must be > 0, got {self.worker_cpus}, "
                              f"{self.data_cpus}, {self.shard_cpus}")
        if self.max_failures < -1:
            raise ConfigError(f"max_failures must be ≥ 0 (or -1: retry for ever), got {self.max_failures}")
        if self.readers < 1 or self.torch_threads < 1:
            raise ConfigError(f"readers and torch_threads must be ≥ 1, got {self.readers} and {self.torch_threads}")
        if self.resources_wait_s is not None and not self.resources_wait_s >= 0:
            raise ConfigError(f"resources_wait_s must be ≥ 0 (or null), got {self.resources_wait_s}")

    def request(self, head: str) -> tuple[float, float]:
        """(CPUs, GPUs) a run of `head` holds at once: the workers, the embed head's shard actors,
        and a feature reader when the data streams beside training (materialize: false)."""
        cpus = self.workers * self.worker_cpus
        if head == "embed":
            cpus += self.shards * self.shard_cpus
        if head in ("lr", "rlr", "embed") and not self.materialize:
            cpus += self.data_cpus
        return cpus, float(self.workers if self.gpu else 0)


def run_name(prefix: str, cfg, exclude: tuple[str, ...], *parts) -> str:
    """One Ray run per (settings that shape the model, data): re-running the same command
    resumes it, even with more epochs; changing the head or data starts a new one."""
    shaping = {k: v for k, v in to_dict(cfg).items() if k not in exclude}
    key = json.dumps([shaping, *parts], sort_keys=True, default=str)
    return f"{prefix}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def ray_storage(out: str, endpoint_url: str | None):
    """(filesystem, path) of MODEL/_ray, where Ray Train keeps runs and checkpoints."""
    fs, base = storage.filesystem_for(storage.join(out, "_ray"), endpoint_url)
    if not storage.is_remote(out):
        storage.makedirs(storage.join(out, "_ray"))
    return fs, base


def scaling(run: TrainRunConfig):
    from ray.train import ScalingConfig

    return ScalingConfig(num_workers=run.workers, use_gpu=run.gpu,
                         resources_per_worker={"CPU": run.worker_cpus, **({"GPU": 1} if run.gpu else {})})
