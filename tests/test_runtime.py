"""What every tagray job's runtime_env gives its Ray processes (tagray/runtime.py `job_env`)."""

from __future__ import annotations

import os

import pytest

from tagray.runtime import PREEMPTION_WATCHER, TRAIN_POLL_S, job_env


def test_job_env_turns_ray_trains_print_patch_off_sets_its_poll_and_carries_no_credentials(monkeypatch):
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-forward")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    env = job_env()
    assert env["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"
    assert env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == TRAIN_POLL_S and float(TRAIN_POLL_S) < 2.0  # Ray's default: 2 s
    assert env["AWS_DEFAULT_REGION"] == "eu-west-1"
    assert "do-not-forward" not in env.values() and not any("SECRET" in k for k in env)
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1.5")  # the user's own setting wins
    assert job_env()["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "1.5"


def test_the_preemption_watcher_is_off_only_on_a_cluster_tagray_starts(monkeypatch):
    monkeypatch.delenv(PREEMPTION_WATCHER, raising=False)
    assert job_env(local=True)[PREEMPTION_WATCHER] == "0"  # one machine, no autoscaler to drain it
    assert PREEMPTION_WATCHER not in job_env(local=False)  # a joined cluster (ray job submit, KubeRay): Ray's default
    monkeypatch.setenv(PREEMPTION_WATCHER, "1")  # the user's own setting wins either way
    assert job_env(local=True)[PREEMPTION_WATCHER] == job_env(local=False)[PREEMPTION_WATCHER] == "1"


@pytest.mark.integration
def test_ray_processes_of_the_session_see_the_job_env(ray_local):
    """The session's cluster is started by init_ray, as `tagray train` starts or joins one: a task
    (like Ray Train's controller and workers, which the job's runtime_env reaches) sees the settings."""
    ray = ray_local

    @ray.remote(num_cpus=0)
    def seen() -> dict:
        return {k: os.environ.get(k) for k in ("RAY_TRAIN_ENABLE_PRINT_PATCH", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
                                               PREEMPTION_WATCHER)}

    assert ray.get(seen.remote(), timeout=120) == {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
                                                   "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": TRAIN_POLL_S,
                                                   PREEMPTION_WATCHER: os.environ.get(PREEMPTION_WATCHER, "0")}
