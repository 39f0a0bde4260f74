"""A sweep's settings (`tune_configs/*.yaml`): which head, the fixed head settings, the search
space over the head's fields, ASHA's early stopping, and trial sizing.

Search space entries, one per head field:
    m: {grid: [2, 3, 4]}            every value (tune.grid_search)
    tau: {choice: [100, 1000]}      one value per sample (tune.choice)
    lambda1: {loguniform: [0.01, 10]}  lambda2: {uniform: [0, 1]}   max_rank: {randint: [4, 16]}
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from tagray.config import ConfigError

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")


@dataclass(frozen=True)
class TuneConfig:
    head: str = "neighbors"  # neighbors (seed 003) | refine (seed 002)
    fixed: dict = field(default_factory=dict)  # head settings every trial shares
    search_space: dict = field(default_factory=dict)  # head field → {grid|choice|uniform|loguniform|randint: …}
    num_samples: int = 1  # repeats of the grid (× samples of the random distributions)
    metric: str = "val_map"  # validation mAP per label, reported every epoch
    grace_period: int = 2  # ASHA: epochs every trial runs before it can be stopped
    reduction_factor: int = 2  # ASHA: keep 1 / reduction_factor of the trials at each rung
    trial_cpus: float = 1.0  # resources per trial
    trial_gpus: float = 0.0
    max_concurrent: int = 0  # trials at once; 0: as many as the cluster's CPUs (and GPUs) allow
    seed: int = 0  # random search's seed
    normalizer: str = "normalize.yaml"
    resources_wait_s: float | None = None  # wait this long for the cluster to hold one trial (None: 600 s if it autoscales, else fail at once)

    def __post_init__(self) -> None:
        from tagray.jsonio import non_finite_path

        for name in ("fixed", "search_space"):  # free-form mappings: from_dict does not see their numbers
            where = non_finite_path(getattr(self, name), name)
            if where:
                raise ConfigError(f"tune: {where} is not a finite number (NaN or ±inf)")
        if self.resources_wait_s is not None and not self.resources_wait_s >= 0:
            raise ConfigError(f"tune: resources_wait_s must be ≥ 0 (or null), got {self.resources_wait_s}")
        if self.head not in ("neighbors", "refine"):
            raise ConfigError(f"tune: head must be neighbors or refine, got {self.head!r}")
        if not self.search_space:
            raise ConfigError("tune: search_space is empty: name at least one head setting to sweep")
        head_fields = {f.name for f in fields(head_config_class(self.head))}
        for key in [*self.search_space, *self.fixed]:
            if key not in head_fields or key in ("head", "normalizer"):
                raise ConfigError(f"tune: {key!r} is not a setting of the {self.head} head; "
                                  f"expected some of: {', '.join(sorted(head_fields - {'head', 'normalizer'}))}")
        for key, spec in self.search_space.items():
            parse_distribution(key, spec)
        if self.num_samples < 1 or self.grace_period < 1 or self.reduction_factor < 2 or self.max_concurrent < 0:
            raise ConfigError("tune: need num_samples ≥ 1, grace_period ≥ 1, reduction_factor ≥ 2, max_concurrent ≥ 0")
        if not (self.trial_cpus > 0 and self.trial_gpus >= 0):  # NaN fails too
            raise ConfigError("tune: trial_cpus must be > 0 and trial_gpus ≥ 0")

    def param_space(self) -> dict[str, Any]:
        """Ray Tune's param_space: the fixed settings and the search distributions."""
        return {**self.fixed, **{k: parse_distribution(k, v) for k, v in self.search_space.items()}}

    def epochs(self) -> int:
        return int(self.fixed.get("epochs", head_config_class(self.head)().epochs))


def head_config_class(head: str) -> type:
    from tagray.heads.neighborhood import NeighborsConfig
    from tagray.heads.refine import RefineConfig

    return NeighborsConfig if head == "neighbors" else RefineConfig


def parse_distribution(key: str, spec: Any):
    """One search-space entry → a Ray Tune sampler; ConfigError naming the key otherwise."""
    from ray import tune

    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(f"tune: search_space.{key} must be one of {{{'|'.join(DISTRIBUTIONS)}: …}}, got {spec!r}")
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        raise ConfigError(f"tune: search_space.{key}.{kind} needs a non-empty list, got {values!r}")
    if kind == "grid":
        return tune.grid_search(values)
    if kind == "choice":
        return tune.choice(values)
    if (len(values) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
            or not values[0] < values[1]):
        raise ConfigError(f"tune: search_space.{key}.{kind} needs [low, high] with low < high, got {values!r}")
    if kind == "loguniform" and values[0] <= 0:
        raise ConfigError(f"tune: search_space.{key}.loguniform needs low > 0, got {values!r}")
    return {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}[kind](*values)
