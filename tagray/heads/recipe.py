"""One training loop for every head, and the shape a head's recipe has (plain PyTorch, no Ray).

A head's *recipe* (tagray/heads/recipes/<head>.py) says how its model is built from its config,
what its state is, what one step on a batch does and what it reports per epoch. `run_recipe`
is the only training loop: the in-process runner (`LocalSession`: tests, the quick path), the
Ray Train worker (tagray/train/worker.py) and Ray Tune trials (tagray/tune/sweep.py) all call
it, with a `Session` that supplies what differs between them — the device, world size and
rank, the DDP wrapper, the collectives, where checkpoints go and where a resumed run's state
comes from. So a swept configuration retrained with `tagray train` is the same computation.

What the loop owns, for every head:
- seeds: torch's generators and `recipe.rng` from (seed, epoch, rank, step in the epoch)
  before every step;
- resume: the session's last checkpoint → `recipe.load_state_dict`, the history so far, and
  where to continue: the next epoch, or inside an epoch after a mid-epoch checkpoint (its
  first steps' batches are skipped, not trained again), so a resumed run equals an
  uninterrupted one;
- the non-finite-loss guard (`jsonio.check_loss`): the run stops with an error naming epoch,
  step and loss before anything is reported or checkpointed, so no NaN model is written and
  the last good checkpoint stays the latest;
- checkpoints every `checkpoint_every` steps and after every epoch (rank 0 writes; every
  worker reports, which is also the barrier);
- early stopping on the validation metric (`patience` epochs without improvement), decided by
  rank 0 (the one that validates) for every worker;
- the per-epoch log line and metrics row (mean of the step outputs + `end_epoch`'s).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from tagray.jsonio import check_loss

log = logging.getLogger(__name__)


class Session(Protocol):
    """What a training process provides a recipe (in-process, a Ray Train worker, a Tune trial)."""

    world: int  # data-parallel workers
    rank: int  # this worker's rank, 0 … world−1
    device: torch.device  # where the model, its optimiser state and the batches live

    def prepare(self, model: nn.Module, **ddp: Any) -> nn.Module:
        """`model` moved to `device` (in place), wrapped for data parallelism when world > 1
        (DDP, with `ddp` as its keyword arguments); returns the module to call forward on (the
        caller keeps `model` for its state and maths)."""

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sums `t` over the workers, in place (identity for one worker)."""

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank `src`'s `t` on every worker, in place."""

    def barrier(self) -> None: ...

    def restore(self) -> dict | None:
        """The state of the run's last checkpoint (a resumed run), or None."""

    def report(self, metrics: dict, state: dict | None, epoch_end: bool = True) -> None:
        """Reports `metrics`; with `state`, also a checkpoint of it (only rank 0 passes one).
        `epoch_end` is False for the mid-epoch checkpoints (`checkpoint_every`)."""

    def stream(self, per_worker: int, seed: int, epoch: int) -> Iterable[dict[str, np.ndarray]] | None:
        """This worker's share of a streamed training set (Ray Data), or None when the recipe's
        arrays are in memory."""


class Recipe:
    """A head's training recipe; subclasses fill in the methods below (see recipes/)."""

    name = "head"
    epochs: int = 1  # epochs to run (the loop's range is first_epoch … epochs)
    first_epoch: int = 1  # 0 when the recipe has a stage before its first epoch (refine: ϕ0)
    checkpoint_every: int | None = None  # steps between mid-epoch checkpoints (None: per epoch only)
    patience: int | None = None  # early stopping: epochs without a better `val_metric` (None: never)
    val_metric: str | None = None  # the end_epoch key that keeps the best epoch (higher is better)
    hint: str = "lower lr"  # what the non-finite-loss error suggests
    seed: int = 0  # with the epoch, step and rank, seeds torch and `rng` before every step
    # numpy randomness of a step (negatives, sampled neighbourhoods): run_recipe sets it before every
    # train_step from (seed, epoch, rank, step in the epoch), so a run resumed mid-epoch draws the same
    rng: np.random.Generator | None = None

    def setup(self, session: Session) -> None:
        """Builds the model(s) and optimisers on `session.device` (called once, before restore)."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def after_restore(self, session: Session) -> None:
        """After `load_state_dict` on a resumed run, before the workers' barrier (e.g. rank 0
        puts the word shards back)."""

    def batches(self, epoch: int, session: Session) -> Iterable[Any]:
        """This worker's batches of `epoch` (the same number on every worker)."""
        raise NotImplementedError

    def train_step(self, batch: Any, session: Session) -> dict[str, float]:
        """One optimiser step; returns at least {"loss": …}."""
        raise NotImplementedError

    def end_epoch(self, epoch: int, session: Session) -> dict[str, float]:
        """After an epoch's steps: schedules, validation (rank 0), per-epoch extras."""
        return {}

    def steps_done(self) -> int:
        """Optimiser steps taken so far (restored with the state)."""
        return self._steps

    _steps = 0


def run_recipe(recipe: Recipe, session: Session, on_epoch: Callable[[dict], None] | None = None,
               progress: bool = True) -> list[dict]:
    """Trains `recipe` to its last epoch (or early stop) under `session`; returns the history,
    one metrics row per finished epoch (the same rows the session's reports carry). Rank 0
    prints a line per epoch unless `progress` is off."""
    recipe.setup(session)
    history: list[dict] = []
    start, done_in_epoch, rows_before = recipe.first_epoch, 0, []
    state = session.restore()
    if state is not None:
        recipe.load_state_dict(state["recipe"])
        recipe.after_restore(session)
        history, start = list(state["history"]), int(state["next_epoch"])
        # a mid-epoch checkpoint (checkpoint_every): epoch `start`'s first steps are in it
        done_in_epoch, rows_before = int(state.get("steps_in_epoch", 0)), list(state.get("rows", []))
        if session.rank == 0:
            inside = f" (epoch {start}: its first {done_in_epoch} steps)" if done_in_epoch else ""
            print(f"[{recipe.name}] resuming after epoch {start - 1} at step {recipe.steps_done()}{inside}", flush=True)
    session.barrier()  # e.g. the embed head's word shards are restored before anyone pulls
    best = _best(history, recipe.val_metric)
    started_at = recipe.steps_done()
    for epoch in range(start, recipe.epochs + 1):
        t0 = time.perf_counter()
        torch.manual_seed(_seed(recipe.seed, epoch, session.rank))
        rows: list[dict[str, float]] = rows_before if epoch == start else []
        for i, batch in enumerate(recipe.batches(epoch, session)):
            if epoch == start and i < done_in_epoch:
                continue  # trained before the checkpoint this run resumed from (the batches are the same)
            # dropout, negatives, sampled neighbourhoods depend only on (seed, epoch, rank, step):
            # a resumed run repeats an uninterrupted one exactly, from an epoch's end or inside it
            torch.manual_seed(_seed(recipe.seed, epoch, session.rank, i))
            recipe.rng = np.random.default_rng([recipe.seed, epoch, session.rank, i])
            out = recipe.train_step(batch, session)
            check_loss(out["loss"], epoch, recipe.steps_done(), recipe.hint)  # NonFiniteError: a user error, one line
            rows.append(out)
            every = recipe.checkpoint_every
            if every and recipe.steps_done() % every == 0 and recipe.steps_done() > started_at:
                partial = {"epoch": epoch, "step": recipe.steps_done(), "loss": float(np.mean([r["loss"] for r in rows]))}
                _report(session, recipe, partial, history, next_epoch=epoch, epoch_end=False,
                        inside={"steps_in_epoch": i + 1, "rows": list(rows)})
        metrics = {"epoch": epoch, "step": recipe.steps_done(), **_means(rows), "steps_in_epoch": len(rows),
                   "device": str(session.device)}
        metrics.update(recipe.end_epoch(epoch, session))
        metrics["epoch_seconds"] = time.perf_counter() - t0
        if recipe.val_metric and metrics.get(recipe.val_metric) is not None:
            best = max(best, metrics[recipe.val_metric])
            metrics[f"best_{recipe.val_metric}"] = best
        history.append(metrics)
        stop = _agreed(session, _no_progress(history, recipe))
        if stop:
            metrics["early_stop"] = True
        if session.rank == 0 and progress:
            shown = " ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                             if isinstance(v, float) and k not in ("epoch_seconds",))
            print(f"[{recipe.name}] epoch {epoch}/{recipe.epochs} step {metrics['step']} {shown} "
                  f"({metrics['epoch_seconds']:.1f}s){' — early stop' if stop else ''}", flush=True)
        _report(session, recipe, metrics, history, next_epoch=epoch + 1)
        if on_epoch is not None:
            on_epoch(metrics)
        if stop:
            break
    return history


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _report(session: Session, recipe: Recipe, metrics: dict, history: list[dict], next_epoch: int,
            epoch_end: bool = True, inside: dict | None = None) -> None:
    """Every worker reports (Ray Train's report is also a barrier); rank 0 attaches the state.
    The barrier first: no worker is still inside a step (pushing word gradients) while rank 0
    snapshots. `inside`: a mid-epoch checkpoint's steps done in `next_epoch` and their loss rows."""
    session.barrier()
    state = ({"recipe": recipe.state_dict(), "history": history, "next_epoch": next_epoch, **(inside or {})}
             if session.rank == 0 else None)
    session.report(metrics, state, epoch_end)


def _means(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {"loss": float("nan")}


def _best(history: list[dict], key: str | None) -> float:
    values = [h[key] for h in history if key and h.get(key) is not None]
    return max(values) if values else -float("inf")


def _agreed(session: Session, stop: bool) -> bool:
    """Rank 0's early-stopping decision on every worker. Only rank 0 validates (`end_epoch`), so
    the other ranks' histories have no `val_metric`: deciding alone, rank 0 left the loop while
    the others waited in the next epoch's first collective (DDP's all-reduce) until the process
    group's timeout — `--workers 2` with a head's default `patience` hung at its early stop."""
    if session.world == 1:
        return stop
    return bool(session.broadcast(torch.tensor([int(stop)], device=session.device), src=0).item())


def _no_progress(history: list[dict], recipe: Recipe) -> bool:
    """True after `patience` epochs whose validation metric did not beat the best before them."""
    if not recipe.patience or not recipe.val_metric:
        return False
    values = [h.get(recipe.val_metric) for h in history]
    values = [v for v in values if v is not None]
    if len(values) <= recipe.patience:
        return False
    return max(values[-recipe.patience:]) <= max(values[: -recipe.patience])


# --- what every recipe shares ---------------------------------------------------------------

def global_batch(batch_size: int, world: int, what: str = "batch_size") -> int:
    """Images per worker per step; the global batch must split evenly over the workers (it is
    the paper's batch; a silent floor would change it)."""
    if batch_size % world:
        raise ValueError(f"{what}={batch_size} does not split over {world} workers: choose a multiple of {world}")
    return batch_size // world


def scaled_epochs(epochs: int, rows: int, per_step: int, world: int, min_steps: int, max_epochs: int) -> int:
    """Epochs giving at least `min_steps` optimiser steps: max(epochs, ⌈min_steps / steps per
    epoch⌉), at most max(epochs, max_epochs). The papers' epoch counts assume corpora where they
    are tens of thousands of steps (seed 003: 10 epochs of NUS-WIDE ≈ 30k steps of 50); on a
    small corpus the same count is a few hundred and the model does not leave its start."""
    per_epoch = max(1, rows // (global_batch(min(per_step, rows), world) * world))
    return max(epochs, min(max(epochs, max_epochs), math.ceil(min_steps / per_epoch)))


def epoch_indices(n: int, per_worker: int, world: int, rank: int, seed: int, epoch: int) -> Iterator[np.ndarray]:
    """This worker's index batches of one epoch over n in-memory rows: a permutation seeded by
    (seed, epoch) — the same on every worker — dealt out by rank; every worker takes
    ⌊n / (per_worker · world)⌋ steps (at least one)."""
    mine = np.random.default_rng([seed, epoch]).permutation(n)[rank::world]
    steps = max(1, n // (per_worker * world))
    for step in range(steps):
        yield mine[step * per_worker : (step + 1) * per_worker]


class BestEpoch:
    """The epoch of highest validation metric and a copy of its weights (seed 003 §3.4: "keeping
    the model snapshot that performs the best on the validation set")."""

    def __init__(self, saved: dict | None = None) -> None:
        self.state = saved or {"map": -1.0, "epoch": 0, "model": None}

    def update(self, epoch: int, value: float, model: nn.Module) -> float:
        if value > self.state["map"]:
            self.state = {"map": value, "epoch": epoch,
                          "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
        return self.state["map"]


class ArrayRecipe(Recipe):
    """What the neighbourhood heads' recipes share: their split arrays in memory (`train` with
    features x; `val` for validation mAP), the best epoch by `val_map`, and its model."""

    val_metric = "val_map"

    def __init__(self, cfg: Any, tags: int, train: dict, val: dict | None = None) -> None:
        self.cfg, self.tags, self.train, self.val = cfg, tags, train, val
        self.n, self.dim = len(train["x"]), int(np.asarray(train["x"]).shape[1])
        self.epochs, self.seed = cfg.epochs, cfg.seed
        self.checkpoint_every = cfg.checkpoint_every

    def build(self) -> nn.Module:
        """A fresh model of this head (its `build_<head>`)."""
        raise NotImplementedError

    def best_model(self) -> nn.Module:
        """The best epoch's weights (the last epoch's without validation), in eval mode on the CPU."""
        model = self.build()
        model.load_state_dict(self.best.state["model"] or {k: v.cpu() for k, v in self.model.state_dict().items()})
        return model.eval()


@dataclass
class LocalSession:
    """One process, no Ray: `run_recipe(recipe, LocalSession())`. Keeps the last checkpoint in
    memory (`checkpoints`), and resumes from `resume_from` when given."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    resume_from: dict | None = None
    world: int = 1
    rank: int = 0
    reports: list[dict] = field(default_factory=list)
    last_state: dict | None = None

    def prepare(self, model: nn.Module, **ddp: Any) -> nn.Module:
        return model.to(self.device)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        return t

    def barrier(self) -> None:
        return None

    def restore(self) -> dict | None:
        return self.resume_from

    def report(self, metrics: dict, state: dict | None, epoch_end: bool = True) -> None:
        self.reports.append(metrics)
        if state is not None:
            self.last_state = state

    def stream(self, per_worker: int, seed: int, epoch: int):
        return None


def shared_tensor(a: Any) -> torch.Tensor:
    """`a` as a tensor sharing its memory. A Tune trial's split arrays are zero-copy, read-only
    views of the object store (one copy per node, shared by the node's trials); torch warns about
    read-only arrays on every trial, and a copy would put one more copy of the features in memory
    per trial. Nothing here writes these tensors."""
    if isinstance(a, torch.Tensor):
        return a
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        return torch.as_tensor(a)


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch's tensors on `device` (numpy arrays become tensors; other values pass through)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, np.ndarray) and v.dtype.kind in "fiub":
            v = torch.from_numpy(np.ascontiguousarray(v))
        out[k] = v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
    return out
