"""The embedding shard server (seed 004 §3.2, SPEC §3.2): the V × d word-vector matrix lives
in CPU memory across K Ray actors; training workers hold only the MLP.

Word id w belongs to shard w mod K, at row w div K, so every shard gets a slice of the
frequent words (ids follow tag frequency) and the load stays even. Each step a worker
pulls the rows its batch sampled and pushes their gradients back; a shard sums gradients of
repeated ids and applies SGD or Adagrad (tagray.heads.word_table.WordTable). Pushes are
acknowledged before the next pull, so a worker never reads rows older than its own update.
"""

from __future__ import annotations

import os
import uuid

import numpy as np

from tagray.data import storage
from tagray.heads.word_table import WordTable

NAMESPACE = "tagray"


class EmbeddingShard:
    """One shard's rows (a Ray actor; see ShardedWordTable.create)."""

    def __init__(self, vectors: np.ndarray, optimizer: str, lr: float, endpoint_url: str | None = None) -> None:
        self.table = WordTable(vectors, optimizer, lr)
        self.endpoint_url = endpoint_url

    def pull(self, ids: np.ndarray) -> np.ndarray:
        return self.table.pull(ids)

    def push(self, ids: np.ndarray, grads: np.ndarray) -> int:
        self.table.push(ids, grads)
        return len(ids)

    def snapshot(self, uri: str) -> str:
        storage.write_bytes(uri, self.table.state_bytes(), self.endpoint_url)
        return uri

    def restore(self, uri: str) -> None:
        self.table.load_bytes(storage.read_bytes(uri, self.endpoint_url))

    def vectors(self) -> np.ndarray:
        return self.table.vectors.numpy()

    def stats(self) -> dict:
        import psutil

        memory = psutil.Process(os.getpid()).memory_full_info()
        return {
            "rows": self.table.shape[0],
            "dim": self.table.shape[1],
            "bytes": self.table.nbytes(),
            "rows_pulled": self.table.rows_pulled,
            "rows_pushed": self.table.rows_pushed,
            "rss_bytes": memory.rss,  # includes pages of Ray's shared object store it mapped
            "uss_bytes": memory.uss,  # memory this process alone holds
            "pid": os.getpid(),
        }


def shard_file(directory: str, shard: int, shards: int) -> str:
    return storage.join(directory, f"shard-{shard:03d}-of-{shards:03d}.npz")


class ShardedWordTable:
    """Client of the shard actors, with WordTable's interface (pull / push / shape)."""

    def __init__(self, handles: list, words: int, dim: int, names: list[str] | None = None) -> None:
        self.handles = handles
        self.words, self.dim = words, dim
        self.names = names or []

    @property
    def shape(self) -> tuple[int, int]:
        return self.words, self.dim

    @property
    def shards(self) -> int:
        return len(self.handles)

    @classmethod
    def create(
        cls,
        vectors: np.ndarray,
        shards: int,
        optimizer: str = "adagrad",
        lr: float = 0.05,
        num_cpus: float = 0.1,
        endpoint_url: str | None = None,
        name: str | None = None,
    ) -> ShardedWordTable:
        """Starts `shards` named actors holding `vectors` (rows w with w mod K = k on actor k)."""
        import ray

        if shards < 1:
            raise ValueError(f"shards must be ≥ 1, got {shards}")
        name = name or f"words-{uuid.uuid4().hex[:8]}"
        actor = ray.remote(EmbeddingShard)
        handles = [
            actor.options(name=f"{name}-{k}", namespace=NAMESPACE, num_cpus=num_cpus, max_concurrency=1).remote(
                ray.put(np.ascontiguousarray(vectors[k::shards])), optimizer, lr, endpoint_url
            )
            for k in range(shards)
        ]
        ray.get([h.stats.remote() for h in handles])  # started, or raise here
        return cls(handles, len(vectors), vectors.shape[1], [f"{name}-{k}" for k in range(shards)])

    @classmethod
    def connect(cls, names: list[str], words: int, dim: int) -> ShardedWordTable:
        """The table from inside another process (a Ray Train worker), by actor names."""
        import ray

        return cls([ray.get_actor(n, namespace=NAMESPACE) for n in names], words, dim, names)

    def _route(self, ids: np.ndarray):
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.words):
            raise IndexError(f"word ids must be in [0, {self.words}), got {ids.min()}…{ids.max()}")
        owner = ids % self.shards
        for k in range(self.shards):
            where = np.nonzero(owner == k)[0]
            if len(where):
                yield k, where, ids[where] // self.shards

    def pull(self, ids: np.ndarray) -> np.ndarray:
        import ray

        parts = [(where, self.handles[k].pull.remote(local)) for k, where, local in self._route(ids)]
        out = np.empty((len(np.asarray(ids).reshape(-1)), self.dim), np.float32)
        for (where, _), rows in zip(parts, ray.get([ref for _, ref in parts]), strict=True):
            out[where] = rows
        return out

    def push(self, ids: np.ndarray, grads: np.ndarray) -> None:
        import ray

        grads = np.asarray(grads, dtype=np.float32)
        ray.get([self.handles[k].push.remote(local, grads[where]) for k, where, local in self._route(ids)])

    def snapshot(self, directory: str, endpoint_url: str | None = None) -> str:
        """Every shard writes its rows and optimiser state under `directory` (local or s3://)."""
        import ray

        storage.makedirs(directory, endpoint_url)
        ray.get([h.snapshot.remote(shard_file(directory, k, self.shards)) for k, h in enumerate(self.handles)])
        return directory

    def restore(self, directory: str) -> None:
        import ray

        ray.get([h.restore.remote(shard_file(directory, k, self.shards)) for k, h in enumerate(self.handles)])

    def gather(self) -> np.ndarray:
        """The whole (V, d) matrix, in word-id order."""
        import ray

        return interleave(ray.get([h.vectors.remote() for h in self.handles]), self.words)

    def stats(self) -> list[dict]:
        import ray

        return ray.get([h.stats.remote() for h in self.handles])

    def kill(self) -> None:
        import ray

        for h in self.handles:
            ray.kill(h)


def interleave(parts: list[np.ndarray], words: int) -> np.ndarray:
    """Shard k's rows back to ids k, k+K, k+2K, …"""
    out = np.empty((words, parts[0].shape[1]), np.float32)
    for k, rows in enumerate(parts):
        out[k :: len(parts)] = rows
    return out


def read_snapshot(directory: str, shards: int, words: int, endpoint_url: str | None = None) -> np.ndarray:
    """The (V, d) vectors of a snapshot, read in this process (no actors)."""
    import io

    parts = []
    for k in range(shards):
        with np.load(io.BytesIO(storage.read_bytes(shard_file(directory, k, shards), endpoint_url))) as z:
            parts.append(z["vectors"])
    return interleave(parts, words)
