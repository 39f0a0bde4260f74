"""The training recipe of the linear heads: LR and robust LR by stochastic EM (seed 001 §4).

A step is `em_step` (eq. 7–12): the E-step's minibatch statistics are summed over the
data-parallel workers by the session's all-reduce and divided by the global batch, so every
replica holds the same π; gradients of W, b are averaged by DDP (buffers are not broadcast:
the EM statistics stay equal by construction, which `replica_pi_max_diff` measures).

Batches are the recipe's in-memory arrays (`train`: x and padded tag ids, or dense y) dealt out
by rank from a permutation seeded by (seed, epoch), or — when the training set streams from Ray
Data (`train=None`) — the session's stream of this worker's shard.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from tagray.heads.fit import HeadConfig, make_optimizer, make_scheduler
from tagray.heads.linear import LinearTagger, em_step
from tagray.heads.recipe import Recipe, Session, epoch_indices, global_batch, shared_tensor
from tagray.heads.targets import multi_hot


def build_linear(cfg: HeadConfig, dim: int, tags: int, tag_rate: np.ndarray | torch.Tensor | None = None) -> LinearTagger:
    """A zero-initialised head whose bias starts at logit(tag rate) and whose EM statistics start
    at π₀ (LinearTagger.init_statistics); without `tag_rate` (a model about to load a state) at 0."""
    torch.manual_seed(cfg.seed)
    model = LinearTagger(dim, tags, cfg.em() if cfg.robust else None)
    if tag_rate is None:
        return model
    rate = torch.as_tensor(np.asarray(tag_rate), dtype=torch.float32).clamp(1e-4, 1 - 1e-4)
    with torch.no_grad():
        z_rate = (rate / cfg.pi_init).clamp(max=0.5) if cfg.robust else rate
        model.linear.bias.copy_(torch.logit(z_rate))
    model.init_statistics(rate)
    return model


class LinearRecipe(Recipe):
    hint = "lower lr"

    def __init__(self, cfg: HeadConfig, dim: int, tags: int, tag_rate, train_images: int,
                 train: dict | None = None, model: LinearTagger | None = None) -> None:
        self.cfg, self.dim, self.tags, self.tag_rate, self.initial = cfg, dim, tags, tag_rate, model
        self.train, self.n = train, int(train_images)
        self.name = cfg.head
        self.epochs, self.seed = cfg.epochs, cfg.seed
        self.checkpoint_every = cfg.checkpoint_every

    def setup(self, session: Session) -> None:
        cfg = self.cfg
        self.per_worker = global_batch(min(cfg.batch_size, self.n), session.world)
        self.model = self.initial if self.initial is not None else build_linear(cfg, self.dim, self.tags, self.tag_rate)
        # EM statistics are buffers kept equal by the all-reduce, not by DDP's broadcast
        self.forward = session.prepare(self.model, broadcast_buffers=False)
        self.opt = make_optimizer(self.model, cfg)
        per_epoch = max(1, self.n // (self.per_worker * session.world))
        self.schedule = make_scheduler(self.opt, cfg, cfg.epochs * per_epoch)
        self.reduce = session.all_reduce if session.world > 1 else None
        if self.train is not None:
            self.x = shared_tensor(self.train["x"])
            self.y = self.train.get("y")
            self.tag_ids = self.train.get("tag_ids")

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])

    def steps_done(self) -> int:
        return int(self.model.steps)

    def batches(self, epoch: int, session: Session) -> Iterable[dict]:
        if self.train is None:
            yield from session.stream(self.per_worker, self.cfg.seed, epoch)
            return
        for idx in epoch_indices(self.n, self.per_worker, session.world, session.rank, self.cfg.seed, epoch):
            if self.y is not None:
                yield {"x": self.x[idx], "y": self.y[idx]}
            else:
                yield {"x": self.x[idx], "tag_ids": self.tag_ids[idx]}

    def train_step(self, batch: dict, session: Session) -> dict[str, float]:
        x = torch.as_tensor(batch.get("x", batch.get("feature"))).to(session.device, non_blocking=True)
        y = batch.get("y")
        y = (torch.as_tensor(y) if y is not None else multi_hot(batch["tag_ids"], self.tags)).to(session.device)
        result = em_step(self.model, self.opt, x, y, self.reduce, n_total=self.per_worker * session.world,
                         forward=self.forward)
        self.schedule.step()
        return {"loss": result.loss}

    def end_epoch(self, epoch: int, session: Session) -> dict[str, float]:
        pi = self.model.pi().detach()
        out = {"mean_pi": float(pi.mean())}
        if session.world > 1:  # the EM keeps every replica's π identical; measure it
            mean = session.all_reduce(pi.clone()) / session.world
            out["replica_pi_max_diff"] = float(session.all_reduce((pi - mean).abs().max().reshape(1))[0])
        return out


def fit(x: torch.Tensor, y: torch.Tensor, cfg: HeadConfig, model: LinearTagger | None = None,
        on_epoch=None, progress: bool = True) -> LinearTagger:
    """Trains a linear head in this process (`run_recipe` under a LocalSession) on features
    x (N, D) and dense 0/1 tags y (N, T); `model`: start from this one instead of a new one;
    `progress`: print a line per epoch (off for a report's baseline)."""
    from tagray.heads.recipe import LocalSession, run_recipe

    if len(x) == 0:
        raise ValueError("no training images")
    recipe = LinearRecipe(cfg, x.shape[1], y.shape[1], y.float().mean(0), len(x), train={"x": x, "y": y}, model=model)
    run_recipe(recipe, LocalSession(), on_epoch, progress)
    return recipe.model
