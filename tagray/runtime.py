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


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Starts or joins Ray once per process. `address=None` joins RAY_ADDRESS when set and
    otherwise starts a local cluster with `num_cpus` CPUs (all by default)."""
    import ray

    if ray.is_initialized():
        return
    if not (address or os.environ.get("RAY_ADDRESS")):
        # a cluster this process starts inherits its environment: Serve's proxy then caps request
        # bodies itself (tagray/serve/limits.py), not only the Ingress behind it
        os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "tagray.serve.limits:proxy_middlewares")
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env["NLTK_DATA"] = os.pathsep.join(search_dirs())  # $NLTK_DATA, then the checkout's .nltk_data
    # Ray Train (2.60) replaces print in its workers by a logger call that logs to stderr and, since
    # a Ray worker's sys.stdout is not sys.__stdout__, also prints to stdout: every progress line of
    # a training run reached the terminal twice. Off, a worker's print is Ray's ordinary stdout.
    env["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
    ray.init(
        address=address,
        num_cpus=num_cpus if not (address or os.environ.get("RAY_ADDRESS")) else None,
        runtime_env={"env_vars": env},
        log_to_driver=True,
        configure_logging=False,
    )
    log.info("Ray: %s CPUs, %s GPUs", ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0))
