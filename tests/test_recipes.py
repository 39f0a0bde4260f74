"""The one training loop (heads/recipe.run_recipe) and every head's recipe, in-process.

What the Ray Train worker and Tune trials add is only the session; these tests pin what the
loop itself guarantees for every head: resume equals an uninterrupted run, a non-finite loss
stops the run naming epoch and step with no NaN state reported, early stopping, an uneven
global batch is refused, and model, batches and optimiser state sit on the session's device.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from tagray.heads.embedding import EmbedConfig
from tagray.heads.fit import HeadConfig
from tagray.heads.neighborhood import NeighborsConfig
from tagray.heads.recipe import (
    LocalSession,
    Recipe,
    epoch_indices,
    global_batch,
    run_recipe,
)
from tagray.heads.recipes import build_recipe
from tagray.heads.refine import RefineConfig
from tagray.heads.targets import PAD
from tagray.heads.word_table import WordTable
from tagray.jsonio import NonFiniteError

N, D, T = 240, 16, 6


def _data(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    concept = rng.integers(0, T, N)
    x = (rng.normal(size=(N, D)) + 3 * np.eye(T, D)[concept]).astype(np.float32)
    tag_ids = np.full((N, 3), PAD, np.int32)
    tag_ids[:, 0] = concept
    tag_ids[::3, 1] = (concept[::3] + 1) % T
    neighbors = np.stack([rng.permutation(np.nonzero(concept == c)[0])[:4] for c in concept]).astype(np.int32)
    y = np.zeros((N, T), np.float32)
    y[np.arange(N), concept] = 1
    val = {"x": x[:60], "rows": np.arange(60), "cols": np.arange(T), "truth": y[:60], "neighbors": neighbors[:60] % 60}
    return {"x": x, "tag_ids": tag_ids, "neighbors": neighbors, "y": y, "val": val}


def _recipe(head: str, data: dict, **cfg) -> Recipe:
    if head in ("lr", "rlr"):
        c = HeadConfig(head=head, epochs=3, batch_size=40, **cfg)
        rate = data["y"].mean(0)
        return build_recipe(head, c, {"dim": D, "tags": T, "tag_rate": rate, "train_images": N,
                                      "train": {"x": data["x"], "tag_ids": data["tag_ids"]}})
    if head == "embed":
        c = EmbedConfig(epochs=3, batch_size=40, word_dim=8, **cfg)
        table = WordTable(np.random.default_rng(0).normal(scale=0.1, size=(T, 8)).astype(np.float32))
        counts = np.bincount(data["tag_ids"][data["tag_ids"] >= 0], minlength=T)
        return build_recipe("embed", c, {"dim": D, "word_dim": 8, "counts": counts, "table": table,
                                         "train_images": N, "train": {"x": data["x"], "tag_ids": data["tag_ids"]}})
    if head == "neighbors":
        c = NeighborsConfig(epochs=3, batch_size=40, hidden=16, lr=3e-3, max_rank=4, min_steps=0, patience=None, **cfg)
        return build_recipe("neighbors", c, {"tags": T, "val": data["val"], "train": {
            "x": data["x"], "target_ids": data["tag_ids"], "neighbors": data["neighbors"]}})
    c = RefineConfig(epochs=3, batch_size=40, m=4, max_rank=8, hidden=16, init_epochs=2, init_batch_size=40,
                     min_init_steps=0, **cfg)
    xi = np.eye(T, dtype=np.float32)
    return build_recipe("refine", c, {"tags": T, "val": data["val"],
                                      "train": {"x": data["x"], "tag_ids": data["tag_ids"], "xi": xi}})


HEADS = ["lr", "rlr", "embed", "neighbors", "refine"]


class _Killed(Exception):
    pass


class _KilledAfter(LocalSession):
    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def report(self, metrics: dict, state: dict | None, epoch_end: bool = True) -> None:
        super().report(metrics, state, epoch_end)
        if epoch_end and metrics["epoch"] == self.epoch:
            raise _Killed


def _weights(recipe: Recipe) -> dict[str, torch.Tensor]:
    model = recipe.mlp if hasattr(recipe, "mlp") else recipe.model
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("head", HEADS)
def test_a_resumed_run_equals_an_uninterrupted_one(head):
    data = _data()
    whole = _recipe(head, data)
    history = run_recipe(whole, LocalSession())
    assert [h["epoch"] for h in history] == list(range(whole.first_epoch, 4))
    assert all(math.isfinite(h["loss"]) for h in history)

    session = _KilledAfter(2)  # the process dies right after epoch 2's checkpoint
    with pytest.raises(_Killed):
        run_recipe(_recipe(head, data), session)
    saved = session.last_state
    assert saved["next_epoch"] == 3
    resumed = _recipe(head, data)
    history2 = run_recipe(resumed, LocalSession(resume_from=saved))
    assert [h["epoch"] for h in history2] == [h["epoch"] for h in history]
    for k, v in _weights(whole).items():
        torch.testing.assert_close(_weights(resumed)[k], v, rtol=0, atol=0, msg=f"{head}: {k}")
    assert history2[-1]["loss"] == pytest.approx(history[-1]["loss"], abs=1e-9)


class _KilledInside(LocalSession):
    """Dies right after the first mid-epoch checkpoint of epoch 2."""

    def report(self, metrics: dict, state: dict | None, epoch_end: bool = True) -> None:
        super().report(metrics, state, epoch_end)
        if not epoch_end and metrics["epoch"] == 2:
            raise _Killed


@pytest.mark.parametrize("head", HEADS)
def test_a_run_resumed_from_a_mid_epoch_checkpoint_equals_an_uninterrupted_one(head):
    """checkpoint_every=4 (6 steps an epoch): killed inside epoch 2, the resumed run skips the
    batches the checkpoint holds (never trains them twice) and ends bit for bit where an
    uninterrupted run does, with the same step count and epoch losses."""
    data = _data()
    whole = _recipe(head, data, checkpoint_every=4)
    history = run_recipe(whole, LocalSession())
    session = _KilledInside()
    with pytest.raises(_Killed):
        run_recipe(_recipe(head, data, checkpoint_every=4), session)
    saved = session.last_state
    assert saved["next_epoch"] == 2 and 0 < saved["steps_in_epoch"] < history[-1]["steps_in_epoch"]
    resumed = _recipe(head, data, checkpoint_every=4)
    history2 = run_recipe(resumed, LocalSession(resume_from=saved))
    assert resumed.steps_done() == whole.steps_done()
    for k, v in _weights(whole).items():
        torch.testing.assert_close(_weights(resumed)[k], v, rtol=0, atol=0, msg=f"{head}: {k}")
    assert [h["loss"] for h in history2] == pytest.approx([h["loss"] for h in history], abs=1e-9)
    assert [h["steps_in_epoch"] for h in history2] == [h["steps_in_epoch"] for h in history]


@pytest.mark.parametrize("head", HEADS)
def test_a_non_finite_loss_stops_naming_epoch_and_step_and_reports_no_nan_state(head):
    data = _data()
    recipe = _recipe(head, data)
    session = LocalSession()
    original = recipe.train_step
    calls = {"n": 0}

    def poisoned(batch, s):
        out = original(batch, s)
        calls["n"] += 1
        if calls["n"] == (15 if head == "refine" else 9):  # the 2nd epoch's 3rd step (6 an epoch; refine's ϕ0: 12)
            out = {**out, "loss": float("nan")}
        return out

    recipe.train_step = poisoned
    with pytest.raises(NonFiniteError, match=r"epoch \d+.*step \d+") as err:
        run_recipe(recipe, session)
    assert "nan" in str(err.value).lower()
    # What was reported before the bad step is finite; nothing after it was reported.
    assert session.reports and all(math.isfinite(r["loss"]) for r in session.reports)
    assert session.last_state is not None and session.last_state["next_epoch"] == recipe.first_epoch + 1


def test_early_stopping_after_patience_epochs_without_a_better_validation_metric():
    data = _data()
    recipe = _recipe("neighbors", data)
    recipe.cfg = dataclasses.replace(recipe.cfg, epochs=30)
    recipe.patience = 2
    values = iter([0.5, 0.6, 0.55, 0.58, 0.9, 0.1, 0.1])
    recipe.end_epoch = lambda epoch, s: {"val_map": next(values)}
    history = run_recipe(recipe, LocalSession())
    assert [h["val_map"] for h in history] == [0.5, 0.6, 0.55, 0.58]  # 2 epochs not above 0.6: stop
    assert history[-1]["early_stop"] is True and history[-1]["best_val_map"] == 0.6


def test_the_embed_head_validates_every_epoch_and_ends_on_its_best_h_and_words():
    """With a val sample, every epoch's row has the validation mAP of s = h(x)·v_t; the model
    fit_embed returns is the best epoch's, h and word vectors together: validating it again gives
    exactly the best row's figure (the last epoch's weights, or its h with the last words, would not)."""
    from tagray.heads.recipes.embed import fit_embed, validation_map

    data = _data()
    cfg = EmbedConfig(epochs=6, batch_size=40, word_dim=8, oov_steps=0)
    table = WordTable(np.random.default_rng(0).normal(scale=0.1, size=(T, 8)).astype(np.float32), cfg.word_optimizer,
                      cfg.word_lr)
    counts = np.bincount(data["tag_ids"][data["tag_ids"] >= 0], minlength=T)
    history: list[dict] = []
    # a validation truth the training tags contradict (each image's next concept), so what the
    # head learns makes validation worse after a while: the best epoch is not the last
    val = {**data["val"], "truth": np.roll(data["val"]["truth"], 1, axis=1)}
    mlp = fit_embed(torch.from_numpy(data["x"]), data["tag_ids"], table, counts, cfg, on_epoch=history.append, val=val)
    values = [h["val_map"] for h in history]
    best = int(np.argmax(values))
    assert len(values) == 6 and best < 5, values
    assert history[-1]["best_val_map"] == max(values)
    assert validation_map(mlp, table, val) == pytest.approx(values[best], abs=1e-6)


class _GlooSession(LocalSession):
    """A worker of a real 2-process group (gloo on loopback): DDP and collectives as Ray Train's
    TrainSession has them, without Ray."""

    def prepare(self, model, **ddp):
        return torch.nn.parallel.DistributedDataParallel(model, **ddp)

    def all_reduce(self, t):
        torch.distributed.all_reduce(t)
        return t

    def broadcast(self, t, src=0):
        torch.distributed.broadcast(t, src)
        return t

    def barrier(self):
        torch.distributed.barrier()


def _early_stopping_rank(rank: int, port: int, results) -> None:
    """One of two workers: the neighbours recipe with an lr too small to change any weight, so
    validation mAP does not improve after epoch 1 and patience 1 stops it at epoch 2."""
    import datetime

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                         timeout=datetime.timedelta(seconds=60))
    try:
        recipe = _recipe("neighbors", _data())
        recipe.cfg = dataclasses.replace(recipe.cfg, epochs=6, lr=1e-30)
        recipe.patience = 1
        history = run_recipe(recipe, _GlooSession(world=2, rank=rank), progress=False)
        results.put((rank, [h["epoch"] for h in history], history[-1].get("early_stop")))
    except Exception as e:  # what the other rank saw when one left the loop alone
        results.put((rank, repr(e), None))
    finally:
        torch.distributed.destroy_process_group()


def test_early_stopping_with_two_workers_stops_both_at_rank_0s_epoch():
    """Only rank 0 validates; its decision to stop reaches the other workers (before, rank 0 left
    the loop alone and rank 1 waited in the next epoch's all-reduce until the group's timeout:
    `tagray train --workers 2` hung at its early stop). Two real processes, a deadline on each."""
    import multiprocessing
    import queue

    from tests.conftest import free_port

    ctx = multiprocessing.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_early_stopping_rank, args=(rank, port, results)) for rank in (0, 1)]
    for p in procs:
        p.start()
    try:
        got = dict((r, (epochs, stop)) for r, epochs, stop in (results.get(timeout=120) for _ in procs))
    except queue.Empty:
        got = {}
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert got == {0: ([1, 2], True), 1: ([1, 2], True)}, got


def test_the_global_batch_must_split_over_the_workers():
    assert global_batch(500, 4) == 125
    with pytest.raises(ValueError, match="batch_size=500 does not split over 3 workers"):
        global_batch(500, 3)


def test_epoch_batches_deal_one_permutation_out_by_rank():
    one = np.concatenate(list(epoch_indices(100, 10, 1, 0, seed=3, epoch=2)))
    two = [np.concatenate(list(epoch_indices(100, 5, 2, r, seed=3, epoch=2))) for r in (0, 1)]
    assert sorted(one) == list(range(100))
    assert sorted(np.concatenate(two)) == list(range(100))  # the workers share out the same images
    np.testing.assert_array_equal(two[0], one[0::2])
    assert not np.array_equal(one, np.concatenate(list(epoch_indices(100, 10, 1, 0, seed=3, epoch=3))))


@pytest.mark.parametrize("head", HEADS)
def test_every_head_takes_the_same_steps_per_epoch_at_any_world_size(head):
    """The configured batch is the global one: with 2 workers each rank takes batch/2 images a
    step and the same number of steps as 1 worker (Ray Train's workers each run this loop with
    their rank; tests/test_recipes_ray.py trains every head there with 1 worker, the CLI modules
    with 2). Rank 0 of 2 here: a lone session's broadcast is the identity, so a rank 1 would not
    receive what rank 0 computes for it (refine's candidates)."""
    data = _data()
    one = run_recipe(_recipe(head, data), LocalSession())
    two = run_recipe(_recipe(head, data), LocalSession(world=2, rank=0))
    steps = [[h["steps_in_epoch"] for h in history] for history in (one, two)]
    assert steps[0] == steps[1], steps
    assert all(math.isfinite(h["loss"]) for h in two)


class _SpySession(LocalSession):
    """Records the device of every tensor a step sees (batches and the model's parameters)."""

    def __init__(self, device):
        super().__init__(device=device)
        self.seen: set[torch.device] = set()


@pytest.mark.parametrize("head", HEADS)
def test_model_batches_and_optimiser_state_sit_on_the_sessions_device(head):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = _data()
    recipe = _recipe(head, data)
    session = _SpySession(device)
    original = recipe.train_step

    def spy(batch, s):
        model = recipe.mlp if hasattr(recipe, "mlp") else recipe.model
        if not getattr(model, "_spied", False):  # what the forward pass is given: the batch on the device
            model.register_forward_pre_hook(
                lambda m, args: session.seen.update(a.device for a in args if isinstance(a, torch.Tensor)))
            model._spied = True
        out = original(batch, s)
        session.seen |= {p.device for p in model.parameters()}
        session.seen |= {v.device for st in recipe.opt.state.values() for v in st.values()
                         if isinstance(v, torch.Tensor) and v.dim() > 0}
        return out

    recipe.train_step = spy
    recipe.epochs = recipe.first_epoch + 1
    run_recipe(recipe, session)
    assert session.seen == {device}


@pytest.mark.parametrize(("argv", "message"), [
    (["head=svm"], "unknown head 'svm': tagray train trains one of lr, rlr, embed, neighbors, refine"),
    (["--workers", "3", "batch_size=500"], "batch_size=500 does not split over 3 workers"),
    (["--head", "refine", "--workers", "3"], "batch_size / m = 8 does not split over 3 workers"),
])
def test_tagray_train_refuses_an_unknown_head_and_an_uneven_batch_before_reading_anything(argv, message, tmp_path, capsys):
    from tagray import cli

    missing = str(tmp_path / "missing")
    assert cli.main(["train", "--manifest", missing, "--features", missing, "--out", missing, *argv]) == 2
    assert message in capsys.readouterr().err


def test_the_epochs_scale_with_the_steps_a_small_corpus_gives():
    from tagray.heads.recipe import scaled_epochs

    assert scaled_epochs(10, 2400, 50, 1, 4000, 200) == 84  # 48 steps an epoch: ⌈4000 / 48⌉
    assert scaled_epochs(10, 160_000, 50, 1, 4000, 200) == 10  # the paper's scale: its own epochs
    assert scaled_epochs(10, 100, 50, 1, 4000, 200) == 200  # capped at max_epochs
    assert scaled_epochs(10, 2400, 50, 2, 4000, 200) == 84  # the global batch, not per worker
    recipe = _recipe("neighbors", _data(), )
    recipe.cfg = dataclasses.replace(recipe.cfg, min_steps=60, patience=None)
    history = run_recipe(recipe, LocalSession())
    assert len(history) == 10  # 6 steps an epoch: 60 steps need 10 epochs, not 3


def test_a_reports_baseline_trains_without_epoch_lines_and_a_head_prints_them(capsys):
    from tagray.eval.neighbors_report import visual_only_model
    from tagray.eval.report import EvalConfig
    from tagray.heads.recipes.linear import fit
    from tagray.heads.split_arrays import SplitArrays

    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 5)).astype(np.float32)
    ids = rng.integers(0, 3, (40, 2)).astype(np.int32)
    part = SplitArrays("train", np.arange(40), np.array([f"i{i}" for i in range(40)]), x, ids, ids, np.ones(40, bool))
    capsys.readouterr()
    visual_only_model(part, "labels", 3, dataclasses.replace(EvalConfig(), visual_only_epochs=2))
    assert "epoch" not in capsys.readouterr().out  # the neighbours report's baseline: silent
    fit(torch.from_numpy(x), torch.from_numpy((rng.random((40, 3)) < 0.3).astype(np.float32)),
        HeadConfig(head="lr", epochs=2, batch_size=20))
    assert "[lr] epoch 2/2" in capsys.readouterr().out


def _read_only(tree):
    """Every array of `tree` read-only, as a Tune trial gets the driver's arrays (zero-copy views
    of the object store)."""
    if isinstance(tree, dict):
        return {k: _read_only(v) for k, v in tree.items()}
    if isinstance(tree, np.ndarray):
        tree = tree.copy()
        tree.setflags(write=False)
    return tree


@pytest.mark.parametrize("head", HEADS)
def test_every_head_trains_on_read_only_arrays_sharing_them_without_a_warning(head):
    import warnings

    data = _read_only(_data())
    recipe = _recipe(head, data)
    warn_always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # torch gives its read-only warning once per process otherwise
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_recipe(recipe, LocalSession(), progress=False)
    finally:
        torch.set_warn_always(warn_always)
    assert not [w for w in caught if "not writable" in str(w.message)]
    # the features are shared, not copied per trial (one copy per node in the object store)
    assert np.shares_memory(recipe.x.numpy(), data["x"])


def test_a_refine_run_on_a_shared_phi0_equals_one_that_trains_its_own():
    from tagray.heads.recipes.refine import train_phi0

    data = _data()
    own = _recipe("refine", data)
    history = run_recipe(own, LocalSession(), progress=False)
    train = {"x": data["x"], "tag_ids": data["tag_ids"], "xi": np.eye(T, dtype=np.float32)}
    phi0 = train_phi0(own.cfg, T, train)
    shared = build_recipe("refine", own.cfg, {"tags": T, "val": data["val"], "train": train, "phi0": phi0})
    again = run_recipe(shared, LocalSession(), progress=False)
    keys = ("epoch", "step", "loss", "steps_in_epoch", "val_map", "best_val_map")
    assert [[h[k] for k in keys] for h in again] == [[h[k] for k in keys] for h in history]
    assert history[0]["steps_in_epoch"] > 0 and shared.steps_done() == own.steps_done()
    mine, theirs = _weights(own), _weights(shared)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    # a run with other refinement settings takes the same ϕ0; one with another ϕ0 setting refuses it
    build_recipe("refine", dataclasses.replace(own.cfg, lambda1=0.1, max_rank=4), {"tags": T, "train": train, "phi0": phi0})
    with pytest.raises(ValueError, match="shared ϕ0 was trained with"):
        build_recipe("refine", dataclasses.replace(own.cfg, init_lr=0.01), {"tags": T, "train": train, "phi0": phi0})
