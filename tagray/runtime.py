"""Connecting to Ray: the cluster in RAY_ADDRESS (as under `ray job submit`), else a local one."""

from __future__ import annotations

import logging
import os

from tagray.data.wordnet import search_dirs

log = logging.getLogger(__name__)

# Settings a Ray worker needs to see the same storage and WordNet as the driver. Never
# credentials: a runtime_env is stored in the job's metadata (dashboard, `ray job list`);
# workers get theirs from the cluster's credential chain (instance profile, IRSA) or, on a
# one-machine cluster, from the environment of the process that started Ray.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION")

# Ray Train's controller drains each worker's one-slot result queue when it polls them, every 2 s
# by default, so every `ray.train.report` after the first blocked its worker for up to 2 s: an
# epoch of 0.05 s took 2 s (`tagray demo`'s two 30-epoch trainings spent ~2 minutes waiting).
# A missed poll is not a failure (RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 min, is), so a
# shorter poll only costs the controller one small call per worker per poll. A value in the
# environment of the process that calls init_ray wins (BENCHMARKS.md, *Training: Ray Train's controller poll*).
TRAIN_POLL_S = "0.25"


# Ray Train (2.60) starts an actor per run that polls Ray for nodes being drained (an autoscaler
# reclaiming a spot node), and its controller logs an error-level line about that actor's
# constructor arguments at every start. A one-machine cluster that tagray itself starts has no
# autoscaler: nothing drains its node. Off there (one process fewer per run); a cluster joined
# through RAY_ADDRESS (`ray job submit`, KubeRay) keeps it. A value in the environment wins.
PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def job_env(local: bool = False) -> dict[str, str]:
    """The env_vars of every tagray job's runtime_env: storage settings (FORWARDED_ENV), WordNet's
    folders, Ray Train's print patch off and its controller poll (TRAIN_POLL_S); on a cluster this
    process starts (`local`), Ray Train's preemption watcher off (PREEMPTION_WATCHER)."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env["NLTK_DATA"] = os.pathsep.join(search_dirs())  # $NLTK_DATA, then the checkout's .nltk_data
    # Ray Train (2.60) replaces print in its workers by a logger call that logs to stderr and, since
    # a Ray worker's sys.stdout is not sys.__stdout__, also prints to stdout: every progress line of
    # a training run reached the terminal twice. Off, a worker's print is Ray's ordinary stdout.
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_S)
    if local or PREEMPTION_WATCHER in os.environ:
        env[PREEMPTION_WATCHER] = os.environ.get(PREEMPTION_WATCHER, "0")
    return env


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Starts or joins Ray once per process. `address=None` joins RAY_ADDRESS when set and
    otherwise starts a local cluster with `num_cpus` CPUs (all by default)."""
    import ray

    if ray.is_initialized():
        return
    local = not (address or os.environ.get("RAY_ADDRESS"))
    if local:
        # a cluster this process starts inherits its environment: Serve's proxy then caps request
        # bodies itself (tagray/serve/limits.py), not only the Ingress behind it
        os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "tagray.serve.limits:proxy_middlewares")
    env = job_env(local)
    ray.init(
        address=address,
        num_cpus=num_cpus if not (address or os.environ.get("RAY_ADDRESS")) else None,
        runtime_env={"env_vars": env},
        log_to_driver=True,
        configure_logging=False,
    )
    log.info("Ray: %s CPUs, %s GPUs", ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0))
