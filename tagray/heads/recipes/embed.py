"""The training recipe of the word-embedding head (seed 004 §2–3, SPEC §3.2).

The MLP h is the recipe's model (data-parallel: DDP averages its gradients); the word vectors
live in a word store with `pull(ids)` / `push(ids, grads)` — `heads/word_table.WordTable` in one
process, the embedding shard server (`train/shards.ShardedWordTable`) under Ray Train. A step
is `embed_step`: sample words, pull their rows, loss, backward, Adam on h, push the rows'
gradients ÷ world. The store is part of the state: a checkpoint snapshots it (the shard server
to files under `snapshot_root`, the in-process table into the state itself), restoring puts it
back before any worker pulls (the loop's barrier after restore).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from tagray.data import storage
from tagray.heads.embedding import (
    EmbedConfig,
    TagMLP,
    embed_step,
    make_optimizer,
    make_scheduler,
    new_mlp,
)
from tagray.heads.recipe import Recipe, Session, epoch_indices, global_batch, shared_tensor
from tagray.heads.samplers import make_sampler

SNAPSHOTS_KEPT = 3  # the run keeps 2 checkpoints; each names one snapshot


def build_embed(cfg: EmbedConfig, dim: int, word_dim: int) -> TagMLP:
    """h: image features (dim) → word space (word_dim), seeded by cfg.seed."""
    return new_mlp(dim, word_dim, cfg)


class EmbedRecipe(Recipe):
    hint = "lower lr / word_lr"

    def __init__(self, cfg: EmbedConfig, dim: int, word_dim: int, counts, table, train_images: int,
                 train: dict | None = None, snapshot_root: str | None = None, endpoint_url: str | None = None,
                 moments: tuple | None = None) -> None:
        """`moments`: (mean, std) of φ over the training images (or a sample of them) for
        `cfg.standardize`; without them they are taken from `train["x"]`."""
        self.cfg, self.dim, self.word_dim, self.counts = cfg, dim, word_dim, np.asarray(counts)
        self.moments = moments
        self.table, self.n, self.train = table, int(train_images), train
        self.snapshot_root, self.endpoint_url = snapshot_root, endpoint_url
        self.name = "embed"
        self.epochs, self.seed = cfg.epochs, cfg.seed
        self.checkpoint_every = cfg.checkpoint_every
        self.words = table.shape[0]

    def setup(self, session: Session) -> None:
        cfg = self.cfg
        self.per_worker = global_batch(min(cfg.batch_size, self.n), session.world)
        self.mlp = build_embed(cfg, self.dim, self.word_dim)
        if cfg.standardize:  # before DDP wraps h: its buffers are broadcast from rank 0 anyway
            if self.moments is not None:
                self.mlp.set_moments(*self.moments)
            elif self.train is not None:
                self.mlp.standardize_features(self.train["x"])
            else:
                raise ValueError("embed: standardize needs the moments of the training features (or the features)")
        self.forward = session.prepare(self.mlp)
        self.opt = make_optimizer(self.mlp, cfg)
        self.schedule = make_scheduler(self.opt, cfg, cfg.epochs * max(1, self.n // (self.per_worker * session.world)))
        self.sampler = make_sampler(cfg.sampler, self.counts, cfg.sampler_power, cfg.pool_size)
        self._steps = 0
        if self.train is not None:
            self.x = shared_tensor(self.train["x"])
            self.tag_ids = np.asarray(self.train["tag_ids"])

    def state_dict(self) -> dict:
        state = {"mlp": self.mlp.state_dict(), "optimizer": self.opt.state_dict(),
                 "schedule": self.schedule.state_dict(), "step": self._steps}
        if self.snapshot_root is not None:  # the shard server: files beside the run's checkpoints
            state["words"] = self.table.snapshot(storage.join(self.snapshot_root, f"step-{self._steps:09d}"),
                                                 self.endpoint_url)
            _prune(self.snapshot_root, self.endpoint_url)
        else:
            state["word_table"] = self.table.state_bytes()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.mlp.load_state_dict(state["mlp"])
        self.opt.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self._steps = int(state["step"])
        if "words" in state:
            self._restore_words = state["words"]  # rank 0 restores the shards (restore_store)
        else:
            self.table.load_bytes(state["word_table"])

    def after_restore(self, session: Session) -> None:
        if getattr(self, "_restore_words", None) and session.rank == 0:
            self.table.restore(self._restore_words)

    def batches(self, epoch: int, session: Session) -> Iterable[dict]:
        self.sampler.new_epoch(np.random.default_rng([self.cfg.seed, epoch, session.rank]))
        self.mlp.train()
        if self.train is None:
            yield from session.stream(self.per_worker, self.cfg.seed, epoch)
            return
        for idx in epoch_indices(self.n, self.per_worker, session.world, session.rank, self.cfg.seed, epoch):
            yield {"x": self.x[idx], "tag_ids": self.tag_ids[idx]}

    def train_step(self, batch: dict, session: Session) -> dict[str, float]:
        x = torch.as_tensor(batch.get("x", batch.get("feature"))).to(session.device, non_blocking=True)
        loss = embed_step(self.forward, self.opt, x, np.asarray(batch["tag_ids"]), self.table, self.cfg, self.sampler,
                          self.rng, self.words, session.world)
        self._steps += 1
        self.schedule.step()
        return {"loss": loss}


def _prune(root: str, endpoint_url: str | None) -> None:
    """Keeps the SNAPSHOTS_KEPT newest word-shard snapshots under `root`."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem_for(root, endpoint_url)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    steps = sorted(i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("step-"))
    for old in steps[:-SNAPSHOTS_KEPT]:
        fs.delete_dir(old)


def fit_embed(x: torch.Tensor, tag_ids: np.ndarray, table, counts: np.ndarray, cfg: EmbedConfig,
              on_epoch=None) -> TagMLP:
    """Trains h (and, through `table`, the word vectors) in this process on features x (N, D)
    and padded tag ids (N, W) — every image must carry a tag."""
    from tagray.heads.recipe import LocalSession, run_recipe

    if len(x) == 0:
        raise ValueError("no training images")
    recipe = EmbedRecipe(cfg, x.shape[1], table.shape[1], counts, table, len(x), train={"x": x, "tag_ids": tag_ids})
    run_recipe(recipe, LocalSession(), on_epoch)
    return recipe.mlp.eval()
