"""Logistic regression (LR) and robust logistic regression (RLR) over all T tags at once.

Seed 001 §4 and Appendix D; SPEC §3.1. Scores S = X W + b (N×T). The robust model has a
hidden true label z per (image, tag):

    P(z=1|x) = σ(s)                        (eq. 3 / 41)
    P(y=1|z=1) = π_t,  P(y=0|z=0) = γ_t    (eq. 4, 42–45; γ = 1 in the paper)
    P(y=1|x) = π σ(s) + (1-γ)(1-σ(s))      (eq. 5 / 46)

It is trained by stochastic EM (§4.3, App. D.1): an E-step gives α = P(z=1|y, x), running
sufficient statistics give π (and γ), and W takes a gradient step on the binary
cross-entropy against the soft target α (eq. 12 / 76). LR is the same code with α = y.

Everything is computed in log space with log-sigmoids, so |s| of any size is safe
(App. D eq. 57 is the large-s limit of these expressions).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

Reducer = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over data-parallel workers


@dataclass(frozen=True)
class EMConfig:
    """Settings of the stochastic EM (SPEC §3.1)."""

    eta: float = 0.01  # step size of the running sufficient statistics (eq. 10)
    pi_init: float = 0.5  # π₀ < 1: π = 1 is a fixed point of the updates (α = y everywhere)
    pi_min: float = 0.02  # lower bound on π; rare tags otherwise drift to π → 0 (see below)
    pi_max: float = 0.99  # upper bound on π (keeps log(1-π) finite)
    learn_gamma: bool = False  # learn P(y=0|z=0) = γ (eq. 83); the paper fixes γ = 1
    gamma_init: float = 0.995  # γ₀ < 1 when learned: γ = 1 is a fixed point too (α = 1 wherever y = 1)
    gamma_min: float = 0.9  # lower bound on a learned γ (false-tag rates are ≤ 10 %)
    warmup_steps: int = 0  # plain LR steps (α = y) before the EM starts

    def __post_init__(self) -> None:
        if not 0 < self.eta <= 1:
            raise ValueError(f"eta must be in (0, 1], got {self.eta}")
        if not 0 <= self.pi_min <= self.pi_init < 1 or not self.pi_init <= self.pi_max <= 1:
            raise ValueError(
                f"need 0 ≤ pi_min ≤ pi_init < 1 and pi_init ≤ pi_max ≤ 1, got "
                f"{self.pi_min}, {self.pi_init}, {self.pi_max} (π = 1 is a fixed point of the EM)"
            )
        if not 0 < self.gamma_min <= self.gamma_init < 1:
            raise ValueError(f"need 0 < gamma_min ≤ gamma_init < 1, got {self.gamma_min}, {self.gamma_init}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be ≥ 0, got {self.warmup_steps}")


def _log1m(p: torch.Tensor) -> torch.Tensor:
    """log(1 - p), −inf at p = 1."""
    return torch.log1p(-p)


def log_p_tag(scores: torch.Tensor, pi: torch.Tensor, gamma: torch.Tensor | None = None) -> torch.Tensor:
    """log P(y=1|x) = log(π σ(s) + (1-γ)(1-σ(s))) (eq. 46), elementwise over N×T."""
    term = torch.log(pi) + F.logsigmoid(scores)
    if gamma is None:
        return term
    return torch.logaddexp(term, _log1m(gamma) + F.logsigmoid(-scores))


def log_p_untagged(scores: torch.Tensor, pi: torch.Tensor, gamma: torch.Tensor | None = None) -> torch.Tensor:
    """log P(y=0|x) = log((1-π) σ(s) + γ(1-σ(s))) (eq. 46)."""
    log_gamma = torch.zeros_like(pi) if gamma is None else torch.log(gamma)
    return torch.logaddexp(_log1m(pi) + F.logsigmoid(scores), log_gamma + F.logsigmoid(-scores))


def robust_nll(
    scores: torch.Tensor, y: torch.Tensor, pi: torch.Tensor, gamma: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over images of the RLR negative log-likelihood (eq. 6 / App. D), summed over tags."""
    ll = torch.where(y > 0, log_p_tag(scores, pi, gamma), log_p_untagged(scores, pi, gamma))
    return -ll.sum(dim=1).mean()


def posterior_true(
    scores: torch.Tensor, y: torch.Tensor, pi: torch.Tensor, gamma: torch.Tensor | None = None
) -> torch.Tensor:
    """E-step α = P(z=1 | y, x) (eq. 7–8, general form eq. 50–51 / 65–66), as sigmoids:

        y=0:  α = (1-π)σ / ((1-π)σ + γ(1-σ)) = σ(s + log(1-π) − log γ)
        y=1:  α = πσ / (πσ + (1-γ)(1-σ))     = σ(s + log π − log(1-γ))   (= 1 when γ = 1)
    """
    log_gamma = torch.zeros_like(pi) if gamma is None else torch.log(gamma)
    untagged = torch.sigmoid(scores + _log1m(pi) - log_gamma)
    if gamma is None:
        tagged = torch.ones_like(untagged)
    else:
        tagged = torch.sigmoid(scores + torch.log(pi) - _log1m(gamma))
    return torch.where(y > 0, tagged, untagged)


class LinearTagger(nn.Module):
    """S = X W + b for T tags, with RLR's per-tag π, γ (from the EM statistics) and the
    calibration intercepts β (seed 001 §4.4, eq. 13). `em=None` is plain LR (π = γ = 1)."""

    def __init__(self, dim: int, tags: int, em: EMConfig | None = None) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, tags)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.em = em
        pi_init = em.pi_init if em is not None else 1.0
        # Dataset-level sufficient statistics (eq. 79–81), running means over images.
        self.register_buffer("s_y", torch.zeros(tags))
        self.register_buffer("s_alpha", torch.ones(tags))
        self.register_buffer("s_y_alpha", torch.full((tags,), pi_init))
        self.register_buffer("beta", torch.zeros(tags))  # calibration intercepts; 0 = none
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @property
    def robust(self) -> bool:
        return self.em is not None

    @property
    def dim(self) -> int:
        return self.linear.in_features

    @property
    def tags(self) -> int:
        return self.linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def init_statistics(self, tag_rate: torch.Tensor) -> None:
        """Starts the EM at π = π₀ (and γ = γ₀) consistently with the observed tag rate f.

        γ = 1: S_y = S_yα = f (α = 1 where y = 1) and S_α = f / π₀.
        learned γ: f = π₀ a + (1-γ₀)(1-a) gives the true-label rate a = S_α, then
        S_yα = π₀ a; where f is below the false-tag rate 1-γ₀, a is floored at f / (2π₀)
        and γ starts where eq. 83 puts it.
        """
        if self.em is None:
            return
        em = self.em
        f = tag_rate.to(self.s_y).clamp(1e-6, 1 - 1e-6)
        if em.learn_gamma:
            false = 1 - em.gamma_init
            a = ((f - false) / (em.pi_init - false)).clamp(min=0) if em.pi_init > false else f / em.pi_init
            a = torch.maximum(a, f / (2 * em.pi_init))
        else:
            a = f / em.pi_init
        a = a.clamp(max=1 - 1e-6)  # (where this clamps, π starts a little above π₀)
        self.s_y.copy_(f)
        self.s_alpha.copy_(a)
        self.s_y_alpha.copy_(torch.minimum(em.pi_init * a, f))

    def pi(self) -> torch.Tensor:
        """π = S_yα / S_α (eq. 11 / 82), kept in [pi_min, pi_max]; 1 for LR."""
        if self.em is None:
            return torch.ones_like(self.s_y)
        return (self.s_y_alpha / self.s_alpha).clamp(max(self.em.pi_min, 1e-6), self.em.pi_max)

    def gamma(self) -> torch.Tensor | None:
        """γ = (1 − S_y − S_α + S_yα) / (1 − S_α) (eq. 83) when learned, else None (γ = 1)."""
        if self.em is None or not self.em.learn_gamma:
            return None
        g = (1 - self.s_y - self.s_alpha + self.s_y_alpha) / (1 - self.s_alpha).clamp(min=1e-6)
        return g.clamp(self.em.gamma_min, 1.0)

    def p_tag(self, x: torch.Tensor) -> torch.Tensor:
        """P(y=1|x): what a user would tag (eq. 5 / 46); σ(s) for LR."""
        return torch.exp(log_p_tag(self(x), self.pi(), self.gamma()))

    def p_content(self, x: torch.Tensor) -> torch.Tensor:
        """P(z=1|x) = σ(s + β): what is in the image (eq. 3, calibrated eq. 13)."""
        return torch.sigmoid(self(x) + self.beta)

    def probabilities(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P(y=1|x), log P(z=1|x)) from one forward pass (eq. 5/46 and eq. 13)."""
        s = self(x)
        return torch.exp(log_p_tag(s, self.pi(), self.gamma())), nn.functional.logsigmoid(s + self.beta)


@dataclass
class StepResult:
    loss: float  # the model's negative log-likelihood of this minibatch (per image, summed over tags)
    mean_pi: float


def em_step(
    model: LinearTagger,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    reduce: Reducer | None = None,
    n_total: int | None = None,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> StepResult:
    """One minibatch of stochastic EM (seed 001 §4.3), or of LR when the model has no EM.

    1. E-step α (eq. 7–8), with the current π, γ, under no_grad.
    2. Minibatch statistics (eq. 9, 79–81) — summed over data-parallel workers by `reduce`
       and divided by the global batch size `n_total`, so every replica holds the same π.
    3. S ← (1-η) S + η S_mb (eq. 10); π, γ follow from S (eq. 11, 83) when next read.
    4. Gradient step on W, b with Σ (σ(s) − α) x (eq. 12): BCE against the soft target α.

    `forward` is the model's data-parallel wrapper (DDP) where there is one.
    """
    scores = (forward or model)(x)
    robust = model.robust
    warm = robust and int(model.steps) < model.em.warmup_steps
    with torch.no_grad():
        pi, gamma = model.pi(), model.gamma()
        alpha = posterior_true(scores, y, pi, gamma) if robust and not warm else y
        if robust:
            stats = torch.stack([y.sum(0), alpha.sum(0), (y * alpha).sum(0)])
            if reduce is not None:
                stats = reduce(stats)
            stats /= n_total if n_total is not None else len(x)
            if not warm:
                eta = model.em.eta
                model.s_y.mul_(1 - eta).add_(eta * stats[0])
                model.s_alpha.mul_(1 - eta).add_(eta * stats[1])
                model.s_y_alpha.mul_(1 - eta).add_(eta * stats[2])
            loss = robust_nll(scores, y, pi, gamma)
        else:
            loss = F.binary_cross_entropy_with_logits(scores, y, reduction="none").sum(1).mean()
    # Summed over tags so each tag's gradient does not shrink with T; mean over images.
    objective = F.binary_cross_entropy_with_logits(scores, alpha, reduction="none").sum(1).mean()
    optimizer.zero_grad(set_to_none=True)
    objective.backward()
    optimizer.step()
    model.steps += 1
    return StepResult(float(loss), float(model.pi().mean()) if robust else 1.0)
