"""Connecting to Ray: the cluster in RAY_ADDRESS (as under `ray job submit`), else a local one."""

from __future__ import annotations

import logging
import os

from tagray.data.wordnet import LOCAL_NLTK_DATA

log = logging.getLogger(__name__)

# Settings a Ray worker needs to see the same storage and WordNet as the driver.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION")


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Starts or joins Ray once per process. `address=None` joins RAY_ADDRESS when set and
    otherwise starts a local cluster with `num_cpus` CPUs (all by default)."""
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env["NLTK_DATA"] = os.environ.get("NLTK_DATA", str(LOCAL_NLTK_DATA))
    ray.init(
        address=address,
        num_cpus=num_cpus if not (address or os.environ.get("RAY_ADDRESS")) else None,
        runtime_env={"env_vars": env},
        log_to_driver=True,
        configure_logging=False,
    )
    log.info("Ray: %s CPUs, %s GPUs", ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0))
