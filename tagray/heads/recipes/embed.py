"""The training recipe of the word-embedding head (seed 004 §2–3, SPEC §3.2).

The MLP h is the recipe's model (data-parallel: DDP averages its gradients); the word vectors
live in a word store with `pull(ids)` / `push(ids, grads)` — `heads/word_table.WordTable` in one
process, the embedding shard server (`train/shards.ShardedWordTable`) under Ray Train. A step
is `embed_step`: sample words, pull their rows, loss, backward, Adam on h, push the rows'
gradients ÷ world. The store is part of the state: a checkpoint snapshots it (the shard server
to files under `snapshot_root`, the in-process table into the state itself), restoring puts it
back before any worker pulls (the loop's barrier after restore).

With `val` (a sample of val images and their truth, `validation_map`) rank 0 measures after
every epoch the mAP per label of the content scores f·v_t and keeps the best epoch: a copy of h
and, for the words, the epoch-end snapshot (the shard server; never pruned while it is the best)
or the table's bytes (in process). The papers fix the epochs (seed 004: until the loss levels
off); on another corpus the right number differs, and 20 epochs instead of 10 already overfit
the synthetic one (BENCHMARKS, *Shipped defaults*).
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
from tagray.heads.recipe import (
    BestEpoch,
    Recipe,
    Session,
    epoch_indices,
    global_batch,
    shared_tensor,
)
from tagray.heads.samplers import make_sampler
from tagray.metrics import mean_average_precision

SNAPSHOTS_KEPT = 3  # the run keeps 2 checkpoints; each names one snapshot


def build_embed(cfg: EmbedConfig, dim: int, word_dim: int) -> TagMLP:
    """h: image features (dim) → word space (word_dim), seeded by cfg.seed."""
    return new_mlp(dim, word_dim, cfg)


def validation_map(mlp: TagMLP, table, val: dict, device: torch.device | None = None) -> float:
    """mAP per label of the content scores s = h(x)·v_t (eq. 2) on a split's sample: rows
    `val["rows"]` of `val["x"]` against the 0/1 `val["truth"]` of the tags `val["cols"]` (ids of
    the table's first rows, the training vocabulary's), pulled from the word store."""
    was_training = mlp.training
    mlp.eval()
    with torch.no_grad():
        f = mlp(shared_tensor(val["x"])[val["rows"]].to(device or torch.device("cpu")))
        vectors = torch.as_tensor(table.pull(np.asarray(val["cols"], np.int64)), device=f.device)
        scores = (f @ vectors.T).cpu().numpy()
    mlp.train(was_training)
    return mean_average_precision(scores, val["truth"])["map_label"]


class EmbedRecipe(Recipe):
    hint = "lower lr / word_lr"

    def __init__(self, cfg: EmbedConfig, dim: int, word_dim: int, counts, table, train_images: int,
                 train: dict | None = None, snapshot_root: str | None = None, endpoint_url: str | None = None,
                 moments: tuple | None = None, val: dict | None = None) -> None:
        """`moments`: (mean, std) of φ over the training images (or a sample of them) for
        `cfg.standardize`; without them they are taken from `train["x"]`. `val`: see
        `validation_map` (None: no validation, the last epoch is the model)."""
        self.cfg, self.dim, self.word_dim, self.counts = cfg, dim, word_dim, np.asarray(counts)
        self.moments = moments
        self.table, self.n, self.train = table, int(train_images), train
        self.snapshot_root, self.endpoint_url = snapshot_root, endpoint_url
        self.name = "embed"
        self.epochs, self.seed = cfg.epochs, cfg.seed
        self.checkpoint_every = cfg.checkpoint_every
        self.words = table.shape[0]
        self.val = val
        if val is not None:
            self.val_metric, self.patience = "val_map", cfg.patience
        # the best epoch (its map and h's weights, as every head's), plus its words: "words" (a snapshot's
        # path) on the shard server, "word_table" (the table's bytes) in process
        self.best = BestEpoch()
        self._best_pending = False  # a new best whose words the epoch-end snapshot records

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
            if self._best_pending:  # the epoch that just validated best: its words are this snapshot
                self.best.state["words"], self._best_pending = state["words"], False
            _prune(self.snapshot_root, self.endpoint_url, keep=self.best.state.get("words"))
        else:
            state["word_table"] = self.table.state_bytes()
        state["best"] = dict(self.best.state)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.mlp.load_state_dict(state["mlp"])
        self.opt.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self._steps = int(state["step"])
        self.best = BestEpoch(state.get("best"))
        if "words" in state:
            self._restore_words = state["words"]  # rank 0 restores the shards (restore_store)
        else:
            self.table.load_bytes(state["word_table"])

    def after_restore(self, session: Session) -> None:
        if getattr(self, "_restore_words", None) and session.rank == 0:
            self.table.restore(self._restore_words)

    def end_epoch(self, epoch: int, session: Session) -> dict[str, float]:
        """Rank 0's validation mAP (after the barrier: every worker's word gradients are pushed)
        and the best epoch's h and words."""
        if self.val is None:
            return {}
        session.barrier()
        if session.rank != 0:
            return {}
        val_map = validation_map(self.mlp, self.table, self.val, session.device)
        if val_map > self.best.state["map"]:
            self.best.update(epoch, val_map, self.mlp)
            if self.snapshot_root is not None:
                self._best_pending = True
            else:
                self.best.state["word_table"] = self.table.state_bytes()
        return {"val_map": val_map}

    def restore_best(self) -> bool:
        """In process: h and the word table back to the best epoch's (False: no validation ran)."""
        if self.best.state["model"] is None:
            return False
        self.mlp.load_state_dict(self.best.state["model"])
        self.table.load_bytes(self.best.state["word_table"])
        return True

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


def _prune(root: str, endpoint_url: str | None, keep: str | None = None) -> None:
    """Keeps the SNAPSHOTS_KEPT newest word-shard snapshots under `root`, and `keep` (the best
    epoch's) whatever its age."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem_for(root, endpoint_url)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    steps = sorted(i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("step-"))
    kept = storage.filesystem_for(keep, endpoint_url)[1].rstrip("/") if keep else None
    for old in steps[:-SNAPSHOTS_KEPT]:
        if old.rstrip("/") != kept:
            fs.delete_dir(old)


def fit_embed(x: torch.Tensor, tag_ids: np.ndarray, table, counts: np.ndarray, cfg: EmbedConfig,
              on_epoch=None, val: dict | None = None) -> TagMLP:
    """Trains h (and, through `table`, the word vectors) in this process on features x (N, D)
    and padded tag ids (N, W) — every image must carry a tag. With `val` (see validation_map)
    h and `table` end as the best epoch's."""
    from tagray.heads.recipe import LocalSession, run_recipe

    if len(x) == 0:
        raise ValueError("no training images")
    recipe = EmbedRecipe(cfg, x.shape[1], table.shape[1], counts, table, len(x), train={"x": x, "tag_ids": tag_ids},
                         val=val)
    run_recipe(recipe, LocalSession(), on_epoch)
    recipe.restore_best()
    return recipe.mlp.eval()
