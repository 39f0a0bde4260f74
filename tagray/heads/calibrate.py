"""Intercept calibration (seed 001 §4.4, eq. 13): W frozen, one β per tag fitted on a small
set of images with ground-truth labels z, so that P(z=1|x) = σ(wᵀx + b + β).

Each β is a one-dimensional convex problem, solved for all tags at once by Newton's method
on the cross-entropy plus a weak Gaussian prior β ~ N(0, 1/λ) (so a tag with no positive
or no negative in a tiny calibration set gets a finite β instead of ±∞).
"""

from __future__ import annotations

import torch


def fit_intercepts(
    scores: torch.Tensor, z: torch.Tensor, l2: float = 1e-2, iterations: int = 50, tol: float = 1e-8
) -> torch.Tensor:
    """β (T,) minimising Σ_i BCE(σ(s_it + β_t), z_it) + λ/2 β_t² for every column t.

    gradient  g_t = Σ_i (σ(s_it + β_t) − z_it) + λ β_t
    curvature h_t = Σ_i σ(1 − σ) + λ
    """
    beta = torch.zeros(scores.shape[1], dtype=torch.float64)
    s = scores.to(torch.float64)
    zz = z.to(torch.float64)
    for _ in range(iterations):
        p = torch.sigmoid(s + beta)
        g = (p - zz).sum(0) + l2 * beta
        h = (p * (1 - p)).sum(0) + l2
        step = (g / h).clamp(-5.0, 5.0)  # damped far from the optimum, where h is tiny
        beta -= step
        if float(step.abs().max()) < tol:
            break
    return beta.to(scores.dtype)
