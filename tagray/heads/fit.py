"""Training settings of the linear heads (HeadConfig), their optimiser and schedule, and `align`.

The recipe that trains them — in-process, on Ray Train, the same code — is
tagray/heads/recipes/linear.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from tagray.config import ConfigError
from tagray.heads.linear import EMConfig, LinearTagger

log = logging.getLogger(__name__)

HEADS = ("lr", "rlr")


@dataclass(frozen=True)
class HeadConfig:
    head: str = "rlr"  # lr: logistic regression (seed 001 §4.1); rlr: robust LR by stochastic EM (§4.2–4.3)
    epochs: int = 20  # passes over the training images
    batch_size: int = 500  # images per minibatch, over all workers (the paper: 500)
    optimizer: str = "adam"  # adam | sgd (momentum 0.9)
    lr: float = 0.01  # learning rate (peak, with the cosine schedule)
    schedule: str = "cosine"  # constant | cosine (to 0 over all epochs: ends near the optimum, not around it)
    weight_decay: float = 0.0  # L2 on W (decoupled for adam)
    seed: int = 0  # initial shuffle order and data order
    eta: float = 0.01  # EM: step size of the running statistics (eq. 10)
    pi_init: float = 0.3  # EM: π₀ < 1 (π = 1 is a fixed point); measured medians are 0.18–0.38 (SPEC §1)
    pi_min: float = 0.02  # EM: lower bound on π (seed 001 §3.4: smallest measured rate 2 %)
    pi_max: float = 0.99  # EM: upper bound on π
    learn_gamma: bool = False  # EM: learn γ = P(y=0|z=0) (eq. 83)
    gamma_init: float = 0.995  # EM: γ₀ < 1 when learned (γ = 1 is a fixed point)
    gamma_min: float = 0.9  # EM: lower bound on γ
    warmup_steps: int = 0  # EM: plain LR steps first
    checkpoint_every: int = 200  # Ray Train: steps between checkpoints (and on finish)
    normalizer: str = "normalize.yaml"  # tag normaliser settings (path, or name in configs/)

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise ConfigError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"schedule must be constant or cosine, got {self.schedule!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ConfigError(f"optimizer must be adam or sgd, got {self.optimizer!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ConfigError("epochs, batch_size and checkpoint_every must be ≥ 1")
        if not self.lr > 0:  # written so that NaN fails too (every comparison with NaN is false)
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not self.weight_decay >= 0 or self.warmup_steps < 0:
            raise ConfigError(f"need weight_decay ≥ 0 and warmup_steps ≥ 0, got {self.weight_decay}, {self.warmup_steps}")
        try:
            self.em()
        except ValueError as e:
            raise ConfigError(str(e)) from e

    @property
    def robust(self) -> bool:
        return self.head == "rlr"

    def em(self) -> EMConfig:
        return EMConfig(
            eta=self.eta, pi_init=self.pi_init, pi_min=self.pi_min, pi_max=self.pi_max,
            learn_gamma=self.learn_gamma, gamma_init=self.gamma_init, gamma_min=self.gamma_min, warmup_steps=self.warmup_steps,
        )


def make_optimizer(model: LinearTagger, cfg: HeadConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: HeadConfig, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule over the whole run (`total_steps` optimiser steps)."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def steps_per_epoch(rows: int, batch_size: int) -> int:
    return max(1, rows // batch_size)


def align(features: pa.Table, image_ids: pa.Array | pa.ChunkedArray) -> tuple[torch.Tensor, np.ndarray]:
    """Feature rows of `image_ids`, in that order, as (M, D) float32, and the positions
    (into image_ids) that have features; images without features are left out."""
    where = pc.index_in(image_ids, value_set=features.column("image_id"))
    found = np.nonzero(pc.is_valid(where).to_numpy(zero_copy_only=False))[0]
    rows = pc.fill_null(where, 0).to_numpy(zero_copy_only=False)[found].astype(np.int64)
    flat = features.column("feature").combine_chunks()
    dim = flat.type.list_size
    values = flat.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    return torch.from_numpy(np.ascontiguousarray(values[rows], dtype=np.float32)), found
