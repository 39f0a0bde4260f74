"""tagray/resources.py's local helpers."""

from __future__ import annotations

import os

from tagray import resources


def test_local_cpus_is_the_affinity_on_linux_and_the_cpu_count_where_the_os_has_none(monkeypatch):
    if hasattr(os, "sched_getaffinity"):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5})
        assert resources.local_cpus() == 3
        monkeypatch.delattr(os, "sched_getaffinity")  # macOS and Windows have none
    monkeypatch.setattr(os, "cpu_count", lambda: 7)
    assert resources.local_cpus() == 7
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert resources.local_cpus() == 1


def test_released_frees_what_only_the_failed_frames_held_and_keeps_the_error():
    """What a failed pipeline's frames hold in a reference cycle (as Ray Data's executor holds its
    actor handles) is freed by `released`, before the error is raised again; the error, its
    message and its cause are kept. Without `released` the object stays until a collection."""
    import gc
    import weakref

    class Pool:  # stands in for the actors' handles
        pass

    def pipeline(ref: list) -> None:
        pool = Pool()
        pool.me = pool  # a cycle: only the cycle collector frees it
        ref.append(weakref.ref(pool))
        try:
            raise KeyError("inner")
        except KeyError as e:
            raise RuntimeError("UDF failed to process a data block") from e

    for release in (False, True):
        gc.collect()
        gc.disable()  # no automatic collection between the failure and the check
        try:
            ref: list = []
            failure = None
            try:
                pipeline(ref)
            except RuntimeError as e:
                failure = e
            assert failure is not None
            out = resources.released(failure) if release else failure
            assert (ref[0]() is None) == release
            assert out is failure and str(out) == "UDF failed to process a data block"
            assert isinstance(out.__cause__, KeyError) and str(out.__cause__) == "'inner'"
            assert (out.__traceback__ is None) == release
        finally:
            gc.enable()


def test_a_pool_whose_actors_all_fit_is_fixed_and_one_that_grows_keeps_those_that_fit():
    """Ray Data's autoscaling pool gave back the second of two actors that fit as soon as the
    first input reached one of them (utilization 0.5 ≤ its downscaling threshold 0.5) and did not
    grow again: featurize of 1,500 images ran on one of two CPUs (BENCHMARKS.md, *Feature
    extraction*). All fit: a fixed pool; some fit: never fewer than those."""
    def plan(first: int, most: int) -> resources.PoolPlan:
        return resources.PoolPlan("p", most, first, 0.75, 0.0, 0.25, 2.0, 2.0, 0.0, 60.0)

    fixed = plan(2, 2).strategy()
    assert (fixed.min_size, fixed.max_size) == (2, 2)
    assert (plan(1, 1).strategy().min_size, plan(1, 1).strategy().max_size) == (1, 1)
    grows = plan(2, 4).strategy()
    assert (grows.min_size, grows.max_size, grows.initial_size) == (2, 4, 2)
