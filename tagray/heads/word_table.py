"""Rows of a word-vector matrix with sparse SGD / Adagrad updates (seed 004 §3.2).

`WordTable` is the whole V × d matrix in one process (tests, benchmarks, small runs); each
embedding shard actor (tagray/train/shards.py) holds one of these over its rows. Both
answer `pull(ids)` and `push(ids, grads)`, so the training step does not know which it has.
"""

from __future__ import annotations

import io

import numpy as np
import torch

OPTIMIZERS = ("sgd", "adagrad")


class WordTable:
    """A (V, d) float32 matrix updated a few rows at a time.

    push: gradients of repeated ids are summed first, then
        sgd:     v ← v − lr·g
        adagrad: G ← G + g²;  v ← v − lr·g / (√G + eps)     (per element, as torch.optim.Adagrad)
    """

    def __init__(self, vectors: np.ndarray, optimizer: str = "adagrad", lr: float = 0.05, eps: float = 1e-10) -> None:
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"word optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
        self.vectors = torch.from_numpy(np.array(vectors, dtype=np.float32, copy=True))
        self.optimizer, self.lr, self.eps = optimizer, lr, eps
        self.accumulator = torch.zeros_like(self.vectors) if optimizer == "adagrad" else None
        self.rows_pulled = 0
        self.rows_pushed = 0

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.vectors.shape)

    def pull(self, ids: np.ndarray) -> np.ndarray:
        ids = _check_ids(ids, len(self.vectors))
        self.rows_pulled += len(ids)
        return self.vectors[torch.from_numpy(ids)].numpy()

    def push(self, ids: np.ndarray, grads: np.ndarray) -> None:
        ids = _check_ids(ids, len(self.vectors))
        grads = torch.as_tensor(np.asarray(grads, dtype=np.float32))
        if grads.shape != (len(ids), self.vectors.shape[1]):
            raise ValueError(f"push: {len(ids)} ids but gradients of shape {tuple(grads.shape)}")
        unique, inverse = np.unique(ids, return_inverse=True)
        g = torch.zeros(len(unique), self.vectors.shape[1]).index_add_(0, torch.from_numpy(inverse.reshape(-1)), grads)
        rows = torch.from_numpy(unique)
        if self.accumulator is None:
            self.vectors.index_add_(0, rows, g, alpha=-self.lr)
        else:
            acc = self.accumulator[rows] + g * g
            self.accumulator[rows] = acc
            self.vectors.index_add_(0, rows, g / (acc.sqrt() + self.eps), alpha=-self.lr)
        self.rows_pushed += len(ids)

    def state_bytes(self) -> bytes:
        """The vectors and optimiser state as one .npz blob (snapshot)."""
        buf = io.BytesIO()
        arrays = {"vectors": self.vectors.numpy()}
        if self.accumulator is not None:
            arrays["accumulator"] = self.accumulator.numpy()
        np.savez(buf, **arrays)
        return buf.getvalue()

    def load_bytes(self, blob: bytes) -> None:
        with np.load(io.BytesIO(blob)) as z:
            if z["vectors"].shape != tuple(self.vectors.shape):
                raise ValueError(f"snapshot holds {z['vectors'].shape} vectors, this table {tuple(self.vectors.shape)}")
            self.vectors.copy_(torch.from_numpy(z["vectors"]))
            if self.accumulator is not None:
                self.accumulator.copy_(torch.from_numpy(z["accumulator"]) if "accumulator" in z else torch.zeros_like(self.vectors))

    def nbytes(self) -> int:
        return self.vectors.numel() * 4 * (2 if self.accumulator is not None else 1)


def _check_ids(ids: np.ndarray, rows: int) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if len(ids) and (ids.min() < 0 or ids.max() >= rows):
        raise IndexError(f"word ids must be in [0, {rows}), got {ids.min()}…{ids.max()}")
    return ids
