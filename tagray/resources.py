"""What the Ray cluster holds, checked before work waits on it.

`require_resources`: the cluster holds a request at all (its nodes, busy or not) — a ConfigError
at once on a fixed cluster, after a wait on one that autoscales (training, sweeps, pools).

Actor pools sized to what the cluster has free, with a deadline to start. Ray Data waits
silently, and for ever, for a pool whose actors do not fit: a Serve app or another job holding
the CPUs, a GPU pool whose GPUs are taken. `plan_pool` starts a pool at the actors that fit now
(at least one) and lets it grow to `most` as resources free up (`PoolPlan.strategy`: Ray Data's
`ActorPoolStrategy(min_size=first, max_size=most)`, or a fixed pool when all `most` fit now; with
min_size 1 Ray Data gave back the second of two actors as soon as the first input reached one of
them, utilization 0.5 being its downscaling threshold, and featurize ran on one of two CPUs).
`bounded_start` ends the wait for the first actor after `wait_s` with `NotEnoughResources`, an
error naming what was asked and what was free. Featurize and the index build use both, and
`released` on failure.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tagray.config import ConfigError

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)


AUTOSCALING_WAIT_S = 600.0  # how long an autoscaling cluster gets to grow to a request by default


def cluster_autoscales() -> bool:
    """Whether the connected cluster can add nodes: launched by the cluster launcher (the bootstrap
    config Ray Tune looks for), KubeRay (RAY_CLUSTER_NAME in the pod), or the v2 autoscaler."""
    import os
    from pathlib import Path

    if Path("~/ray_bootstrap_config.yaml").expanduser().exists() or os.environ.get("RAY_CLUSTER_NAME"):
        return True
    try:
        from ray.autoscaler.v2.utils import is_autoscaler_v2

        return bool(is_autoscaler_v2())
    except Exception:  # an older Ray without the v2 autoscaler, or no GCS answer: assume a fixed cluster
        return False


def require_resources(cpus: float, gpus: float, what: str, wait_s: float | None = None, poll_s: float = 5.0) -> None:
    """Returns once the Ray cluster (ray.cluster_resources(): all nodes, busy or not) holds `cpus`
    CPUs and `gpus` GPUs; otherwise ConfigError naming what was asked and what there is — at once
    on a fixed cluster (Ray would wait for ever), after `wait_s` seconds (default
    AUTOSCALING_WAIT_S) on one that autoscales."""
    import ray

    def have() -> tuple[float, float]:
        r = ray.cluster_resources()
        return float(r.get("CPU", 0)), float(r.get("GPU", 0))

    def fits() -> bool:
        return cpus <= have()[0] + 1e-9 and gpus <= have()[1] + 1e-9

    if fits():
        return
    deadline_s = wait_s if wait_s is not None else (AUTOSCALING_WAIT_S if cluster_autoscales() else 0.0)
    if deadline_s > 0:
        log.warning("%s asks for %g CPUs, %g GPUs; the cluster has %g CPUs, %g GPUs: waiting up to %gs for it to grow",
                    what, cpus, gpus, *have(), deadline_s)
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline and not fits():
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        if fits():
            return
    c, g = have()
    waited = f" after waiting {deadline_s:g}s for it to grow" if deadline_s > 0 else ""
    raise ConfigError(f"{what} asks for {cpus:g} CPU(s) and {gpus:g} GPU(s), but the Ray cluster has {c:g} CPU(s) and "
                      f"{g:g} GPU(s){waited}: lower workers / worker_cpus (or trial_cpus), or set resources_wait_s "
                      "to wait for an autoscaling cluster to grow")


class NotEnoughResources(ConfigError):
    """The first actor of a pool did not get its CPUs / GPUs before the deadline (a ConfigError,
    as `require_resources`' is: the commands print it as one line and exit 2)."""



def local_cpus() -> int:
    """The CPUs this process may run on: its affinity where the OS has one (Linux), else the
    machine's count (macOS, Windows), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)

@dataclass(frozen=True)
class PoolPlan:
    """An actor pool for one stage: `first` actors at once (those that fit the free resources),
    up to `most` as more free up; each reserves `cpus` CPUs and `gpus` GPUs, beside `beside_cpus`
    for the stage's tasks (decode, write) that must run too."""

    what: str
    most: int
    first: int
    cpus: float
    gpus: float
    beside_cpus: float
    free_cpus: float
    total_cpus: float
    free_gpus: float
    wait_s: float

    def strategy(self) -> ray.data.ActorPoolStrategy:
        """Ray Data's pool for this plan: fixed at `most` when all fit now, else from `first` (never
        fewer: Ray Data would hand back actors that fit at the first lull) up to `most`."""
        import ray.data

        if self.first == self.most:
            return ray.data.ActorPoolStrategy(size=self.most)
        return ray.data.ActorPoolStrategy(min_size=self.first, max_size=self.most, initial_size=self.first)

    @property
    def fits_now(self) -> bool:
        return self.free_cpus + 1e-9 >= self.cpus + self.beside_cpus and self.free_gpus + 1e-9 >= self.gpus

    def shortfall(self) -> str:
        need = f"{self.cpus + self.beside_cpus:g} CPU ({self.cpus:g} per actor + {self.beside_cpus:g} for its tasks)"
        if self.gpus:
            need += f" and {self.gpus:g} GPU"
        return (f"{self.what}: one actor needs {need}; the cluster has {self.free_cpus:g} of {self.total_cpus:g} CPUs "
                f"free{f' and {self.free_gpus:g} GPUs' if self.gpus else ''} (a Serve app or another job holds the rest)")

    def as_dict(self) -> dict:
        return {"actors_at_start": self.first, "max_actors": self.most, "actor_cpus": self.cpus,
                "actor_gpus": self.gpus, "free_cpus_at_start": self.free_cpus, "cluster_cpus": self.total_cpus}


def plan_pool(what: str, most: int, cpus: float, gpus: float = 0.0, beside_cpus: float = 0.0,
              wait_s: float | None = None) -> PoolPlan:
    """A pool of at most `most` actors sized to `ray.available_resources()` now: it starts with
    the actors that fit beside `beside_cpus` (at least one: when none fits, the pool waits for
    one, `wait_s` seconds (None: AUTOSCALING_WAIT_S) under `bounded_start`, and says so in the
    log now). A cluster that cannot hold one actor at all fails first (`require_resources`)."""
    import ray

    require_resources(cpus + beside_cpus, gpus, f"{what} (one actor and its tasks)", wait_s)
    free, total = ray.available_resources(), ray.cluster_resources()
    free_cpus, free_gpus = float(free.get("CPU", 0.0)), float(free.get("GPU", 0.0))
    fit = min((free_cpus - beside_cpus) / cpus if cpus > 0 else math.inf, free_gpus / gpus if gpus > 0 else math.inf)
    first = max(1, min(most, int(fit + 1e-9) if math.isfinite(fit) else most))
    wait = AUTOSCALING_WAIT_S if wait_s is None else wait_s
    plan = PoolPlan(what, max(1, most), first, cpus, gpus, beside_cpus, round(free_cpus, 3),
                    float(total.get("CPU", 0.0)), round(free_gpus, 3), wait)
    if not plan.fits_now:
        log.warning("%s; waiting up to %gs for them (lower the actors' CPUs, stop what holds them, or add a node)",
                    plan.shortfall(), wait)
    return plan


@contextlib.contextmanager
def bounded_start(ds: ray.data.Dataset, plan: PoolPlan) -> Iterator[ray.data.Dataset]:
    """`ds` set to give up when its pool's first actor has not started within `plan.wait_s`
    (Ray Data's `wait_for_min_actors_s`, on this dataset's own context); Ray Data's timeout
    inside the block becomes `NotEnoughResources`."""
    import ray

    ds.context.wait_for_min_actors_s = max(1, math.ceil(plan.wait_s))
    try:
        yield ds
    except ray.exceptions.GetTimeoutError as e:
        if "starting actors" not in str(e):
            raise
        raise NotEnoughResources(f"{plan.shortfall()}: no actor started in {plan.wait_s:g}s") from None


def released(error: BaseException) -> BaseException:
    """`error`, raised by a Ray Data pipeline with an actor pool, made to let go of that pool now.
    Ray Data gives a failed pipeline's actors back by dropping its references to them, but those
    references sit in reference cycles through the frames of the exception's traceback until
    Python's cycle collector next runs (in an idle driver: not for minutes), and until then the
    actors hold their CPUs and GPUs: the next pool in the same process (a re-run from a notebook,
    a long-lived driver, the tests) waits for them, then fails with no CPU free. So: the
    traceback logged at DEBUG, the tracebacks of the exception chain dropped, a collection run.
    Call it after the `except` block that caught `error` (its frames alive until then):

        failure = None
        try:
            ...
        except Exception as e:
            failure = e
        if failure is not None:
            raise released(failure)
    """
    log.debug("the pipeline failed", exc_info=error)
    seen: set[int] = set()
    chain: list[BaseException] = [error]
    while chain:  # the whole chain: an error raised `from` another has both a cause and a context
        e = chain.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        e.__traceback__ = None
        chain += [c for c in (e.__cause__, e.__context__) if c is not None]
    gc.collect()
    return error
