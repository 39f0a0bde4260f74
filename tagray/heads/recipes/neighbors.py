"""The training recipe of the metadata-neighbourhood model (seed 003 §3, SPEC §3.4).

The train split's arrays (features x, target ids, the metadata neighbours of every image) are
in memory — in the Ray object store under Ray Train, read zero-copy. An epoch is a permutation
seeded by (seed, epoch) dealt out by rank; a step samples one m-subset neighbourhood per image
(rng seeded by (seed, epoch, rank)) and runs `neighbors_step` (eq. 4–6, one-vs-all logistic
loss + L2; DDP averages the gradients). After every epoch rank 0 scores the validation split
(mean over `test_samples` neighbourhoods, eq. 1) and keeps the best epoch's weights (§3.4).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from tagray.heads.neighborhood import (
    NeighborhoodNet,
    NeighborsConfig,
    gather_neighborhood,
    make_optimizer,
    neighborhood_scores,
    neighbors_step,
    sample_neighborhoods,
)
from tagray.heads.recipe import (
    ArrayRecipe,
    BestEpoch,
    Session,
    epoch_indices,
    global_batch,
    scaled_epochs,
    shared_tensor,
)
from tagray.heads.targets import multi_hot
from tagray.metrics import mean_average_precision


def build_neighbors(cfg: NeighborsConfig, dim: int, tags: int, label_rate: np.ndarray | None = None) -> NeighborhoodNet:
    """The network of eq. 4–6 with cfg's hidden size and dropout, seeded by cfg.seed. With
    `label_rate` (each target's rate in the training set) b_y starts at logit(rate), as the linear
    heads' bias does: from 0 (p = 0.5 for targets of 1–5 %) RMSProp needs ~1/lr steps to reach
    the prior before it learns anything else."""
    torch.manual_seed(cfg.seed)
    model = NeighborhoodNet(dim, tags, cfg.hidden, cfg.dropout)
    if label_rate is not None:
        rate = torch.as_tensor(np.asarray(label_rate), dtype=torch.float32).clamp(1e-4, 1 - 1e-4)
        with torch.no_grad():
            model.out.bias.copy_(torch.logit(rate))
    return model


def validation_map(model: NeighborhoodNet, val: dict, cfg: NeighborsConfig, device: torch.device | None = None) -> float:
    """mAP per label on a split: the truth columns `val["truth"]` of its `val["rows"]` (eq. 1 scores)."""
    x = shared_tensor(val["x"]).to(device or torch.device("cpu"))
    scores = neighborhood_scores(model, x, val["neighbors"], cfg.m, cfg.test_samples, cfg.seed)
    return mean_average_precision(scores.numpy()[val["rows"]][:, val["cols"]], val["truth"])["map_label"]


def _targets(train: dict, idx: np.ndarray, tags: int) -> torch.Tensor:
    """Dense 0/1 targets of rows `idx`: from padded `target_ids`, or the dense `y` given in-process."""
    if "y" in train:
        return shared_tensor(train["y"])[idx].float()
    return multi_hot(train["target_ids"][idx], tags)


class NeighborsRecipe(ArrayRecipe):
    name = "neighbors"

    def __init__(self, cfg: NeighborsConfig, tags: int, train: dict, val: dict | None = None) -> None:
        super().__init__(cfg, tags, train, val)
        self.patience = cfg.patience

    def build(self):
        return build_neighbors(self.cfg, self.dim, self.tags)

    def setup(self, session: Session) -> None:
        cfg = self.cfg
        self.per_worker = global_batch(min(cfg.batch_size, self.n), session.world)
        self.epochs = scaled_epochs(cfg.epochs, self.n, cfg.batch_size, session.world, cfg.min_steps, cfg.max_epochs)
        if self.epochs != cfg.epochs and session.rank == 0:
            print(f"[neighbors] {cfg.epochs} epochs are fewer than min_steps={cfg.min_steps} steps: up to {self.epochs} "
                  f"epochs, stopping after {cfg.patience} without a better validation mAP", flush=True)
        rate = np.asarray(_targets(self.train, np.arange(self.n), self.tags).mean(0))
        self.model = build_neighbors(cfg, self.dim, self.tags, rate)
        if cfg.standardize:  # every rank sees the whole train split: the same moments everywhere
            self.model.standardize_features(self.train["x"])
        self.forward = session.prepare(self.model)
        self.opt = make_optimizer(self.model, cfg)
        self.x = shared_tensor(self.train["x"]).to(session.device)
        self.best = BestEpoch()
        self._steps = 0

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "best": self.best.state,
                "step": self._steps}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.best, self._steps = BestEpoch(state["best"]), int(state["step"])

    def batches(self, epoch: int, session: Session) -> Iterable[np.ndarray]:
        return epoch_indices(self.n, self.per_worker, session.world, session.rank, self.cfg.seed, epoch)

    def train_step(self, idx: np.ndarray, session: Session) -> dict[str, float]:
        z, mask = gather_neighborhood(self.x, sample_neighborhoods(self.train["neighbors"][idx], self.cfg.m, self.rng))
        y = _targets(self.train, idx, self.tags).to(session.device)
        loss = neighbors_step(self.model, self.forward, self.opt, self.x[idx], z, mask, y, self.cfg.l2)
        self._steps += 1
        return {"loss": loss}

    def end_epoch(self, epoch: int, session: Session) -> dict[str, float]:
        if session.rank != 0 or self.val is None:
            return {}
        val_map = validation_map(self.model, self.val, self.cfg, session.device)
        self.best.update(epoch, val_map, self.model)
        return {"val_map": val_map}


def fit_neighbors(x: torch.Tensor, y: torch.Tensor, neighbors: np.ndarray, cfg: NeighborsConfig,
                  val: dict | None = None, on_epoch=None) -> NeighborhoodNet:
    """Trains in this process on features (N, D), dense 0/1 targets (N, T) and neighbours (N, M)
    into x's rows; with `val` (see validation_map) keeps the best epoch."""
    from tagray.heads.recipe import LocalSession, run_recipe

    if len(x) == 0:
        raise ValueError("no training images")
    recipe = NeighborsRecipe(cfg, y.shape[1], {"x": x, "y": y, "neighbors": neighbors}, val)
    run_recipe(recipe, LocalSession(), on_epoch)
    return recipe.best_model()
