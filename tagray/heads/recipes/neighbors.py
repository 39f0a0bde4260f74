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

from tagray.eval.metrics import mean_average_precision
from tagray.heads.neighborhood import (
    NeighborhoodNet,
    NeighborsConfig,
    gather_neighborhood,
    make_optimizer,
    neighborhood_scores,
    neighbors_step,
    sample_neighborhoods,
)
from tagray.heads.recipe import BestEpoch, Recipe, Session, epoch_indices, global_batch
from tagray.heads.targets import multi_hot


def build_neighbors(cfg: NeighborsConfig, dim: int, tags: int) -> NeighborhoodNet:
    """The network of eq. 4–6 with cfg's hidden size and dropout, seeded by cfg.seed."""
    torch.manual_seed(cfg.seed)
    return NeighborhoodNet(dim, tags, cfg.hidden, cfg.dropout)


def validation_map(model: NeighborhoodNet, val: dict, cfg: NeighborsConfig, device: torch.device | None = None) -> float:
    """mAP per label on a split: the truth columns `val["truth"]` of its `val["rows"]` (eq. 1 scores)."""
    x = torch.as_tensor(val["x"]).to(device or torch.device("cpu"))
    scores = neighborhood_scores(model, x, val["neighbors"], cfg.m, cfg.test_samples, cfg.seed)
    return mean_average_precision(scores.numpy()[val["rows"]][:, val["cols"]], val["truth"])["map_label"]


def _targets(train: dict, idx: np.ndarray, tags: int) -> torch.Tensor:
    """Dense 0/1 targets of rows `idx`: from padded `target_ids`, or the dense `y` given in-process."""
    if "y" in train:
        return torch.as_tensor(train["y"])[idx].float()
    return multi_hot(train["target_ids"][idx], tags)


class NeighborsRecipe(Recipe):
    name = "neighbors"
    val_metric = "val_map"

    def __init__(self, cfg: NeighborsConfig, tags: int, train: dict, val: dict | None = None) -> None:
        self.cfg, self.tags, self.train, self.val = cfg, tags, train, val
        self.n, self.dim = len(train["x"]), int(np.asarray(train["x"]).shape[1])
        self.epochs, self.seed = cfg.epochs, cfg.seed
        self.checkpoint_every = cfg.checkpoint_every
        self.patience = getattr(cfg, "patience", None)

    def setup(self, session: Session) -> None:
        cfg = self.cfg
        self.per_worker = global_batch(min(cfg.batch_size, self.n), session.world)
        self.model = build_neighbors(cfg, self.dim, self.tags)
        self.forward = session.prepare(self.model)
        self.opt = make_optimizer(self.model, cfg)
        self.x = torch.as_tensor(self.train["x"]).to(session.device)
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
        self.rng = np.random.default_rng([self.cfg.seed, epoch, session.rank])
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

    def best_model(self) -> NeighborhoodNet:
        """The best epoch's weights (the last epoch's without validation), in eval mode on the CPU."""
        model = build_neighbors(self.cfg, self.dim, self.tags)
        model.load_state_dict(self.best.state["model"] or {k: v.cpu() for k, v in self.model.state_dict().items()})
        return model.eval()


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
