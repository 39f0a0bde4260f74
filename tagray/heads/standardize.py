"""Per-dimension z-scoring of image features φ inside a head's network (not in the papers).

The papers' settings (seed 003's L2 and RMSProp lr, seed 004's Adam on h) were chosen for CNN
features of one scale; features from elsewhere come in any (unit-norm CLIP embeddings ~D^-1/2 per
dimension, post-ReLU ResNet pools of mean ~1, the synthetic corpus's ~0.05). A network that
z-scores φ with the training images' moments first trains the same on c·φ + b as on φ. The moments
are buffers of the network, so a saved model carries them and scores new images the way it was
trained; a model saved before them loads as the identity. Used by the neighbourhood model
(`NeighborsConfig.standardize`) and the embed head's h (`EmbedConfig.standardize`); BENCHMARKS,
*Shipped defaults*.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

STD_FLOOR = 1e-2  # no dimension's std counts below this share of the median std
MOMENT_IMAGES = 100_000  # drivers that do not hold the training features take the moments of a sample this large


def feature_moments(x: np.ndarray | torch.Tensor, chunk_bytes: int = 1 << 26) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and standard deviation (population) of the rows of x (N, D), in float64,
    chunk by chunk (~`chunk_bytes` of float64 each, not an (N, D) float64 copy at millions of
    images), each chunk's moments taken about the first chunk's mean (no cancellation when
    |mean| ≫ std)."""
    x = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"feature_moments: need rows of features (N ≥ 1, D), got shape {x.shape}")
    rows = max(1, chunk_bytes // (8 * x.shape[1]))
    pivot = x[:rows].mean(0, dtype=np.float64)
    s1, s2 = np.zeros(x.shape[1]), np.zeros(x.shape[1])
    for lo in range(0, len(x), rows):
        d = x[lo : lo + rows].astype(np.float64) - pivot
        s1 += d.sum(0)
        s2 += np.einsum("ij,ij->j", d, d)
    mean = s1 / len(x)
    return pivot + mean, np.sqrt(np.maximum(s2 / len(x) - mean**2, 0.0))


class StandardizedInput:
    """Mixin for an nn.Module whose input φ (B, …, D) is z-scored by the buffers `feature_shift`
    and `feature_scale` (call `_register_standardizer(dim)` in __init__; identity until
    `standardize_features`)."""

    def _register_standardizer(self, dim: int) -> None:
        self.register_buffer("feature_shift", torch.zeros(dim))
        self.register_buffer("feature_scale", torch.ones(dim))

    def standardize_features(self, x: np.ndarray | torch.Tensor) -> None:
        """Sets the buffers to z-score φ with the moments of x (training images). A std below
        STD_FLOOR × the median std counts as that floor, so a dimension that (almost) never varies
        in training — a rarely active ReLU unit, a constant — cannot blow up a new image's input."""
        self.set_moments(*feature_moments(x))

    def set_moments(self, mean: np.ndarray, std: np.ndarray) -> None:
        """The buffers from per-dimension moments (`feature_moments` of the training images, or of
        a sample of them), with the floor of `standardize_features`."""
        mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
        varying = std[std > 0]
        floor = STD_FLOOR * float(np.median(varying)) if len(varying) else 1.0
        with torch.no_grad():
            self.feature_shift.copy_(torch.from_numpy(mean))
            self.feature_scale.copy_(torch.from_numpy(1.0 / np.maximum(std, floor)))

    def standardized(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.feature_shift) * self.feature_scale

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Models saved before standardisation have no buffers: they load as the identity.
        for name, value in (("feature_shift", 0.0), ("feature_scale", 1.0)):
            state_dict.setdefault(prefix + name, torch.full_like(getattr(self, name), value))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def as_saved(cfg: Any, weights: dict, saved_config: dict) -> Any:
    """`cfg` (read from a saved model's config) with standardize=False when the model was saved
    before its head standardised φ (no buffers in its weights, no `standardize` in its config):
    it loads as the identity, and its config then says how it scores."""
    if "feature_shift" not in weights and "standardize" not in saved_config:
        return dataclasses.replace(cfg, standardize=False)
    return cfg
