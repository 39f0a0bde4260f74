"""Positive and negative word samplers of the sampled losses (seed 004 §2.2, §3.3).

Tag ids arrive as (B, W) int arrays padded with −1, left-packed (tagray.heads.targets.padded_ids).
All samplers are vectorised over the batch and draw from a numpy Generator, so a seed
reproduces every sample.
"""

from __future__ import annotations

import numpy as np

PAD = -1
NEGATIVE_SAMPLERS = ("frequency", "adjacent", "pool")


def tag_counts_of(tag_ids: np.ndarray) -> np.ndarray:
    """Tags per image of a padded (B, W) id array."""
    return (tag_ids != PAD).sum(1)


def sample_positives(tag_ids: np.ndarray, p: int, rng: np.random.Generator) -> np.ndarray:
    """(B, P) ids drawn uniformly with replacement from each image's tags (§2.2: images with
    fewer than P tags repeat some). Every image must carry at least one tag."""
    lengths = tag_counts_of(tag_ids)
    if (lengths == 0).any():
        raise ValueError("sample_positives: an image has no tags (filter untagged images before sampling)")
    pick = (rng.random((len(tag_ids), p)) * lengths[:, None]).astype(np.int64)
    return tag_ids[np.arange(len(tag_ids))[:, None], pick]


class FrequencySampler:
    """Negatives from the tag distribution raised to `power` (word2vec's 0.75): P(t) ∝ count_t^power.
    Words with zero count are never drawn."""

    def __init__(self, counts: np.ndarray, power: float = 0.75) -> None:
        weights = np.asarray(counts, dtype=np.float64) ** power
        weights[np.asarray(counts) <= 0] = 0.0
        if weights.sum() <= 0:
            raise ValueError("FrequencySampler: every word has count 0")
        self.probabilities = weights / weights.sum()
        self._cdf = np.cumsum(self.probabilities)
        self._cdf[-1] = 1.0

    def draw(self, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
        return np.searchsorted(self._cdf, rng.random(shape), side="right").astype(np.int64)

    def negatives(self, tag_ids: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        return self.draw((len(tag_ids), n), rng)

    def new_epoch(self, rng: np.random.Generator) -> None:
        pass


class AdjacentSampler:
    """Negatives = tags of the next image in the (shuffled) batch, drawn with replacement
    (§3.3: no distribution to sample, and no bias towards frequent words beyond the data's)."""

    def negatives(self, tag_ids: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        return sample_positives(np.roll(tag_ids, -1, axis=0), n, rng)

    def new_epoch(self, rng: np.random.Generator) -> None:
        pass


class PoolSampler:
    """Negatives drawn uniformly from a pool pre-sampled from the tag distribution once per
    epoch (§3.3): one big draw per epoch instead of one per step."""

    def __init__(self, counts: np.ndarray, power: float = 0.75, pool_size: int = 100_000) -> None:
        self.frequency = FrequencySampler(counts, power)
        self.pool_size = pool_size
        self.pool: np.ndarray | None = None

    def new_epoch(self, rng: np.random.Generator) -> None:
        self.pool = self.frequency.draw((self.pool_size,), rng)

    def negatives(self, tag_ids: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.pool is None:
            self.new_epoch(rng)
        return self.pool[rng.integers(0, self.pool_size, (len(tag_ids), n))]


def make_sampler(name: str, counts: np.ndarray, power: float, pool_size: int):
    if name == "frequency":
        return FrequencySampler(counts, power)
    if name == "adjacent":
        return AdjacentSampler()
    if name == "pool":
        return PoolSampler(counts, power, pool_size)
    raise ValueError(f"negative sampler must be one of {', '.join(NEGATIVE_SAMPLERS)}, got {name!r}")


def log_noise_prior(name: str, counts: np.ndarray, power: float) -> np.ndarray:
    """log q(t) of the negative sampler's distribution, per word (−inf → a floor for unseen
    words). With negatives from q the sampled loss's optimum is f·v_t ≈ log P(t|x) − log q(t)
    + const (word2vec's shifted PMI), so ranking tags by f·v_t + log q(t) restores the
    frequency prior (the "logQ correction" of sampled losses)."""
    counts = np.asarray(counts, dtype=np.float64)
    weights = counts if name == "adjacent" else counts ** power
    weights = np.where(counts > 0, weights, 0.0)
    q = weights / max(weights.sum(), 1e-12)
    return np.log(np.maximum(q, 1e-12)).astype(np.float32)
