"""The training recipe of tag refinement (seed 002, Algorithm 2; SPEC §3.3).

Epoch 0 is ϕ0: `init_epochs` passes of multi-label logistic loss on the user tags (Adam).
Before epoch 1, rank 0 finds every training image's M nearest images in ϕ0's visual-feature
space (exact faiss) and broadcasts them. Epochs 1 … `epochs` are Algorithm 1 batches on
L_vis + λ1 L_sem + λ2 L_err (SGD, ÷10 every `lr_step_epochs`): each worker builds its
s/m/world groups from its share of a permutation of the anchors seeded by (seed, epoch), with
its (identical) replica of the current ϕ; the batch-summed terms are scaled by the world size
(`refine_step`). Rank 0 scores validation after every epoch and keeps the best epoch; ϕ0's
weights travel in the state, the candidates are recomputed from them on resume.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from tagray.heads.recipe import (
    ArrayRecipe,
    BestEpoch,
    Session,
    epoch_indices,
    global_batch,
    scaled_epochs,
    shared_tensor,
)
from tagray.heads.refine import (
    RefineConfig,
    RefineNet,
    dynamic_batch,
    init_step,
    make_optimizers,
    refine_features,
    refine_scores,
    refine_step,
    tag_laplacian,
    visual_candidates,
)
from tagray.heads.targets import multi_hot
from tagray.metrics import mean_average_precision


def build_refine(cfg: RefineConfig, dim: int, tags: int) -> RefineNet:
    """ϕ with cfg's visual feature size and dropout, seeded by cfg.seed."""
    torch.manual_seed(cfg.seed)
    return RefineNet(dim, tags, cfg.hidden, cfg.dropout)


def validation_map(model: RefineNet, val: dict, device: torch.device | None = None) -> float:
    scores = refine_scores(model, shared_tensor(val["x"]).to(device or torch.device("cpu"))).numpy()
    return mean_average_precision(scores[val["rows"]][:, val["cols"]], val["truth"])["map_label"]


# The settings ϕ0 depends on (with the data): runs that differ in none of them — a sweep over λ1, λ2,
# α, M, m or the refinement's lr — can share one ϕ0 (`train_phi0`) instead of each training its own
PHI0_SETTINGS = ("hidden", "dropout", "init_epochs", "min_init_steps", "max_init_epochs", "init_lr", "init_batch_size",
                 "seed")


class RefineRecipe(ArrayRecipe):
    name = "refine"
    first_epoch = 0  # ϕ0
    hint = "lower lr / init_lr"

    def __init__(self, cfg: RefineConfig, tags: int, train: dict, val: dict | None = None,
                 phi0: dict | None = None) -> None:
        """`phi0`: a ϕ0 trained once for several runs (`train_phi0`, with the same PHI0_SETTINGS):
        epoch 0 then loads it instead of training, and reports what its training did."""
        super().__init__(cfg, tags, train, val)
        if phi0 is not None and phi0["settings"] != phi0_settings(cfg):
            raise ValueError(f"the shared ϕ0 was trained with {phi0['settings']}, this run needs {phi0_settings(cfg)}")
        self.shared_phi0 = phi0

    def build(self):
        return build_refine(self.cfg, self.dim, self.tags)

    def setup(self, session: Session) -> None:
        cfg = self.cfg
        if self.n < cfg.batch_size:
            raise ValueError(f"{self.n} training images: need at least batch_size={cfg.batch_size}")
        self.groups = global_batch(cfg.batch_size // cfg.m, session.world, "batch_size / m")
        self.init_per_worker = global_batch(min(cfg.init_batch_size, self.n), session.world, "init_batch_size")
        self.init_epochs = scaled_epochs(cfg.init_epochs, self.n, cfg.init_batch_size, session.world, cfg.min_init_steps,
                                         cfg.max_init_epochs)
        if self.init_epochs != cfg.init_epochs and session.rank == 0 and self.shared_phi0 is None:
            print(f"[refine] ϕ0: {cfg.init_epochs} epochs are fewer than min_init_steps={cfg.min_init_steps} steps: "
                  f"{self.init_epochs} epochs", flush=True)
        self.model = build_refine(cfg, self.dim, self.tags)
        self.forward = session.prepare(self.model)
        self.init_opt, self.opt, self.schedule = make_optimizers(self.model, cfg)
        self.x = shared_tensor(self.train["x"]).to(session.device)
        g = self.train["y"] if "y" in self.train else multi_hot(self.train["tag_ids"], self.tags)
        self.g = shared_tensor(g).float().to(session.device)
        self.laplacian = tag_laplacian(shared_tensor(self.train["xi"]).float()).to(session.device)
        self.best, self.phi0, self.candidates, self._steps = BestEpoch(), None, None, 0
        if self.shared_phi0 is not None:
            self.model.load_state_dict(self.shared_phi0["state"])
            self.init_epochs, self._steps = 0, int(self.shared_phi0["steps"])

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "init_optimizer": self.init_opt.state_dict(),
                "optimizer": self.opt.state_dict(), "schedule": self.schedule.state_dict(), "best": self.best.state,
                "phi0": self.phi0, "step": self._steps}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.init_opt.load_state_dict(state["init_optimizer"])
        self.opt.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.best, self.phi0, self._steps = BestEpoch(state["best"]), state["phi0"], int(state["step"])

    def batches(self, epoch: int, session: Session) -> Iterable[tuple[str, np.ndarray]]:
        if epoch == 0:
            return self._init_batches(session)
        if self.candidates is None:
            self.candidates = self._candidates(session)
        return (("refine", anchors) for anchors in
                epoch_indices(self.n, self.groups, session.world, session.rank, self.cfg.seed, epoch))

    def _init_batches(self, session: Session) -> Iterator[tuple[str, np.ndarray]]:
        for e in range(self.init_epochs):
            for idx in epoch_indices(self.n, self.init_per_worker, session.world, session.rank, self.cfg.seed, 10_000 + e):
                yield "init", idx

    def _candidates(self, session: Session) -> np.ndarray:
        """Algorithm 2 step 2: the M nearest training images in ϕ0's feature space (rank 0, broadcast)."""
        phi0 = build_refine(self.cfg, self.dim, self.tags).to(session.device)
        phi0.load_state_dict(self.phi0)
        if session.rank == 0:
            cand = torch.from_numpy(visual_candidates(refine_features(phi0, self.x), self.cfg.max_rank))
        else:
            cand = torch.empty(self.n, self.cfg.max_rank, dtype=torch.int32)
        if session.world > 1:
            cand = session.broadcast(cand.to(session.device), 0).cpu()
        return cand.numpy()

    def train_step(self, batch: tuple[str, np.ndarray], session: Session) -> dict[str, float]:
        stage, idx = batch
        self._steps += 1
        if stage == "init":
            return {"loss": init_step(self.model, self.forward, self.init_opt, self.x[idx], self.g[idx])}
        rows = dynamic_batch(self.model, self.x, idx, self.candidates, self.cfg.m)
        return refine_step(self.model, self.forward, self.opt, self.x[rows], self.g[rows], self.laplacian, self.cfg,
                           session.world)

    def end_epoch(self, epoch: int, session: Session) -> dict[str, float]:
        shared = {}
        if epoch == 0:
            self.phi0 = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            if self.shared_phi0 is not None:  # the row its own training would have written
                shared = {"loss": self.shared_phi0["loss"], "steps_in_epoch": self.shared_phi0["steps"]}
        else:
            self.schedule.step()
        if session.rank != 0 or self.val is None:
            return shared
        val_map = validation_map(self.model, self.val, session.device)
        self.best.update(epoch, val_map, self.model)
        return {**shared, "val_map": val_map}

    def phi0_model(self) -> RefineNet:
        model = build_refine(self.cfg, self.dim, self.tags)
        model.load_state_dict(self.phi0)
        return model.eval()


def phi0_settings(cfg: RefineConfig) -> dict:
    return {k: getattr(cfg, k) for k in PHI0_SETTINGS}


def train_phi0(cfg: RefineConfig, tags: int, train: dict, session: Session | None = None) -> dict:
    """ϕ0 alone — epoch 0 of Algorithm 2, exactly as a run trains it — for runs that differ only in
    settings ϕ0 does not depend on to share (RefineRecipe's `phi0`): its weights, optimiser steps,
    mean loss and the PHI0_SETTINGS it was trained with."""
    from tagray.heads.recipe import LocalSession, run_recipe

    recipe = RefineRecipe(cfg, tags, train)
    recipe.epochs = 0  # the loop runs epoch 0 (ϕ0) only
    history = run_recipe(recipe, session or LocalSession(), progress=False)
    return {"state": recipe.phi0, "steps": recipe.steps_done(), "loss": history[0]["loss"],
            "settings": phi0_settings(cfg)}


def fit_refine(x: torch.Tensor, g: torch.Tensor, xi: torch.Tensor, cfg: RefineConfig, val: dict | None = None,
               on_epoch=None) -> tuple[RefineNet, RefineNet]:
    """Algorithm 2 in this process on features (N, D), dense user tags G (N, C) and ξ (C, C);
    returns (ϕ, ϕ0) — ϕ the best epoch's with `val`, else the last."""
    from tagray.heads.recipe import LocalSession, run_recipe

    recipe = RefineRecipe(cfg, g.shape[1], {"x": x, "y": g, "xi": xi}, val)
    run_recipe(recipe, LocalSession(), on_epoch)
    return recipe.best_model(), recipe.phi0_model()
