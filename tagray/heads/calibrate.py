"""Intercept calibration (seed 001 §4.4, eq. 13): W frozen, one β per tag fitted on clean
labels z, so that P(z=1|x) = σ(wᵀx + b + β).

Each β is a one-dimensional convex problem, solved for all tags at once by Newton's method
on the cross-entropy plus a Gaussian prior on β. Two sources of clean labels:

- **a labelled split** (`fit_intercepts`): every (image, label tag) is judged; the prior is
  a weak β ~ N(0, 1/λ) (so a tag with no positive or no negative in a tiny calibration set
  gets a finite β instead of ±∞);
- **users' verdicts** on suggested tags (`recalibrate`, from `tagray.data.feedback`): sparse
  (image, tag, present) triples, only for pairs the service suggested.

How the feedback fit deals with the way verdicts are sampled:

1. *Selection on x is harmless — if σ(s + β) is the right shape.* A verdict exists only where
   the model put the tag in an image's top suggestions, a function of x alone. β is the
   intercept of a model of P(z=1|x), and a conditional likelihood fitted on the x it is
   conditioned on is unbiased whatever rule picked those x, as long as the model is right.
   When it is not (the slope of the true log-odds in s is not 1), the β fitted where tags are
   suggested is the best intercept *there*, not over all pairs: on the synthetic corpus (RLR
   scores under-dispersed, Platt slope ≈ 11) feedback β sit ≈ 1.6 above full-split β, which
   raises annotation F1@5 but worsens P(z) of tags that are rarely suggested (BENCHMARKS.md).
2. *Selection on the label is not.* If a judged pair is kept with probability r₁ when the tag
   is present and r₀ when absent (users confirm more readily than they reject), then among
   the judged pairs P(z=1|x, judged) = σ(s + β + log(r₁/r₀)): the case-control shift of
   logistic regression falls exactly on the one parameter we fit. A user who only confirms
   has r₀ = 0, and the maximum-likelihood β is +∞. No held-out check on verdicts can see
   this (held-out verdicts carry the same bias), so it is not used; what *can* be seen is
   that one kind is missing: a tag is refitted only with at least `min_present` present and
   `min_absent` absent verdicts, and is otherwise left as it was (reported with the reason).
   A shift common to all tags (the same r₁/r₀ everywhere) moves every β alike and leaves
   each image's top-k and each tag's ranking unchanged; a partial, tag-dependent shift (users
   who reject only now and then) passes the minimums and is not detectable from verdicts alone.
3. *Few verdicts move β little.* The fit is MAP with β_t ~ N(β_t⁰, 1/λ) centred at the
   model's current β (not at 0): with no verdicts nothing changes, and each verdict adds
   σ(1−σ) ≤ 1/4 to the curvature, so λ = 1 weighs like about 4 verdicts at p = ½.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from tagray.config import ConfigError
from tagray.data.feedback import POLICIES, UPLOAD_ID
from tagray.heads.fit import align
from tagray.heads.linear import LinearTagger


@dataclass(frozen=True)
class CalibrateConfig:
    """Settings of `tagray calibrate` (labelled split and feedback); the only defaults."""

    l2: float = 1e-2  # labelled split: weight λ of the prior β ~ N(0, 1/λ) (finite β for a tag without positives)
    policy: str = "latest"  # feedback: which verdicts count (tagray.data.feedback: latest | majority)
    min_present: int = 5  # feedback: present verdicts a tag needs before its β is refitted
    min_absent: int = 5  # feedback: absent verdicts a tag needs (confirm-only feedback has none: MLE β = +∞)
    prior: float = 1.0  # feedback: weight λ of the prior β ~ N(β_current, 1/λ), in units of curvature
    iterations: int = 50  # Newton steps at most
    tol: float = 1e-8  # stop when every step is below this

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"policy must be one of {', '.join(POLICIES)}, got {self.policy!r}")
        if self.min_present < 0 or self.min_absent < 0:
            raise ConfigError(f"min_present and min_absent must be ≥ 0, got {self.min_present}, {self.min_absent}")
        if not (self.prior > 0 and self.l2 > 0):  # written so that NaN fails too
            raise ConfigError(f"prior and l2 must be > 0 (they keep β finite), got {self.prior}, {self.l2}")
        if self.iterations < 1 or not self.tol > 0:
            raise ConfigError(f"need iterations ≥ 1 and tol > 0, got {self.iterations}, {self.tol}")


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



def platt_targets(y: torch.Tensor) -> torch.Tensor:
    """Platt's smoothed targets (Platt 1999, §2.2), per column t of the 0/1 matrix y:
    τ = (N⁺_t + 1)/(N⁺_t + 2) where y = 1 and 1/(N⁻_t + 2) where y = 0 — the MAP targets of a
    uniform prior on P(y), which keep a column that the scores separate from its optimum at
    infinity."""
    yy = y.to(torch.float64)
    pos = yy.sum(0)
    neg = yy.shape[0] - pos
    return torch.where(yy > 0, (pos + 1) / (pos + 2), 1 / (neg + 2))


def _platt_objective(s: torch.Tensor, tau: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    z = s * a + b
    return (torch.nn.functional.softplus(z) - tau * z).sum(0)


def fit_platt(
    scores: torch.Tensor, y: torch.Tensor, iterations: int = 100, tol: float = 1e-9, ridge: float = 1e-9
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column Platt scaling P(y_t = 1 | s_t) = σ(a_t s_t + b_t) (Platt 1999, eq. 1 in our sign),
    for all T columns at once: (a, b) minimising the cross-entropy against Platt's smoothed
    targets τ (`platt_targets`),

        F_t(a, b) = Σ_i softplus(a s_it + b) − τ_it (a s_it + b)      (+ ridge/2 (a² + b²))

    subject to a_t ≥ 0 (a higher score never means a lower probability: a column whose scores
    carry nothing gets a_t = 0 and its base rate). Projected Newton with backtracking (Lin, Lin &
    Weng 2007, Algorithm 1, with the bound): per column

        g = Σ_i (σ(z_i) − τ_i) (s_i, 1),   H = Σ_i σ(z_i)(1 − σ(z_i)) [[s_i², s_i], [s_i, 1]] + ridge·I

    d = −H⁻¹g, or −(0, g_b/H_bb) for a column held at a = 0 (a = 0 and g_a > 0); the step is
    halved until F does not increase. Start: a = 0, b = log((N⁺ + 1)/(N⁻ + 1)) (Platt's). A slope
    left below 1e-8 (a column whose g_a is zero up to rounding: no positives, or no negatives) is
    set to 0. scores: (N, T); y: (N, T) 0/1. Returns (a, b), each (T,) in scores' dtype.
    """
    s = scores.to(torch.float64)
    tau = platt_targets(y)
    pos = (y > 0).to(torch.float64).sum(0)
    a = torch.zeros(s.shape[1], dtype=torch.float64)
    b = torch.log((pos + 1) / (s.shape[0] - pos + 1))
    f = _platt_objective(s, tau, a, b) + ridge / 2 * (a * a + b * b)
    for _ in range(iterations):
        p = torch.sigmoid(s * a + b)
        r, w = p - tau, p * (1 - p)
        ga, gb = (r * s).sum(0) + ridge * a, r.sum(0) + ridge * b
        haa, hab, hbb = (w * s * s).sum(0) + ridge, (w * s).sum(0), w.sum(0) + ridge
        held = (a <= 0) & (ga > 0)
        det = (haa * hbb - hab * hab).clamp_min(1e-300)
        da = torch.where(held, torch.zeros_like(a), -(hbb * ga - hab * gb) / det)
        db = torch.where(held, -gb / hbb, -(haa * gb - hab * ga) / det)
        step = torch.ones_like(a)
        moving = torch.ones_like(held)
        new_a, new_b = a.clone(), b.clone()
        for _ in range(30):  # backtracking, every column at once
            ta = (a + step * da).clamp_min(0.0)
            tb = b + step * db
            ft = _platt_objective(s, tau, ta, tb) + ridge / 2 * (ta * ta + tb * tb)
            ok = moving & (ft <= f)
            new_a, new_b, f = torch.where(ok, ta, new_a), torch.where(ok, tb, new_b), torch.where(ok, ft, f)
            moving &= ~ok
            if not bool(moving.any()):
                break
            step = torch.where(moving, step / 2, step)
        change = torch.maximum((new_a - a).abs(), (new_b - b).abs())
        a, b = new_a, new_b
        if float(change.max()) < tol:
            break
    a = torch.where(a < 1e-8, torch.zeros_like(a), a)
    return a.to(scores.dtype), b.to(scores.dtype)

def fit_verdict_intercepts(
    scores: torch.Tensor, tag: torch.Tensor, z: torch.Tensor, center: torch.Tensor, prior: float,
    iterations: int = 50, tol: float = 1e-8,
) -> torch.Tensor:
    """β (T,) minimising Σ_i BCE(σ(s_i + β_{t_i}), z_i) + λ/2 Σ_t (β_t − c_t)² over sparse
    verdicts: s (M,) the frozen score wᵀx + b of verdict i's (image, tag), t (M,) its tag,
    z (M,) 1 = present. The MAP of eq. 13's β under the prior N(c, 1/λ).

    gradient  g_t = Σ_{i: t_i = t} (σ(s_i + β_t) − z_i) + λ (β_t − c_t)
    curvature h_t = Σ_{i: t_i = t} σ(1 − σ) + λ
    """
    c = center.to(torch.float64)
    beta = c.clone()
    s, zz, t = scores.to(torch.float64), z.to(torch.float64), tag.to(torch.long)
    for _ in range(iterations):
        p = torch.sigmoid(s + beta[t])
        g = torch.zeros_like(beta).index_add_(0, t, p - zz) + prior * (beta - c)
        h = torch.zeros_like(beta).index_add_(0, t, p * (1 - p)) + prior
        step = (g / h).clamp(-5.0, 5.0)
        beta -= step
        if float(step.abs().max()) < tol:
            break
    return beta.to(center.dtype)


@dataclass
class FeedbackFit:
    """What `recalibrate` did: the new β and, per tag that has verdicts, what was used."""

    beta: torch.Tensor  # (T,) β after the fit (unchanged where not refitted)
    refitted: np.ndarray  # (T,) bool: tags whose β was refitted
    tags: list[dict]  # per tag with ≥ 1 usable verdict: counts, β before/after, refitted, reason
    verdicts: int  # resolved verdicts read
    used: int  # verdicts on an image with features and a tag of the vocabulary
    skipped: dict[str, int]  # upload: on an uploaded image (sha256:…, never featurized); no_features; unknown_tag


def verdict_scores(model: LinearTagger, x: torch.Tensor, rows: np.ndarray, tags: np.ndarray,
                   chunk: int = 16_384) -> torch.Tensor:
    """s_i = w_{t_i}ᵀ x_{r_i} + b_{t_i} (without β) for each verdict i, in chunks: (M,)."""
    w, b = model.linear.weight.detach(), model.linear.bias.detach()
    r, t = torch.from_numpy(rows.astype(np.int64)), torch.from_numpy(tags.astype(np.int64))
    out = [(x[r[lo:lo + chunk]] * w[t[lo:lo + chunk]]).sum(1) + b[t[lo:lo + chunk]] for lo in range(0, len(r), chunk)]
    return torch.cat(out) if out else torch.zeros(0)


def recalibrate(model: LinearTagger, vocabulary: list[str], features: pa.Table, verdicts: pa.Table,
                cfg: CalibrateConfig) -> FeedbackFit:
    """Refits β from resolved verdicts (`FeedbackStore.resolved()`: image_id, tag, present) with
    W frozen (module docstring); does not change `model`."""
    n = verdicts.num_rows
    ids = verdicts.column("image_id").combine_chunks()
    upload = pc.match_substring_regex(ids, UPLOAD_ID.pattern).to_numpy(zero_copy_only=False) if n else np.zeros(0, bool)
    index = {tag: i for i, tag in enumerate(vocabulary)}
    tag_ids = np.array([index.get(t, -1) for t in verdicts.column("tag").to_pylist()], np.int64)
    known = tag_ids >= 0
    keep = np.nonzero(~upload & known)[0]
    images = pc.unique(ids.take(pa.array(keep))) if len(keep) else pa.array([], pa.string())
    x, found = align(features, images)
    featured = images.take(pa.array(found))
    where = pc.index_in(ids.take(pa.array(keep)), value_set=featured)  # null: the image has no features
    has = pc.is_valid(where).to_numpy(zero_copy_only=False)
    used = keep[has]
    rows = pc.fill_null(where, 0).to_numpy(zero_copy_only=False)[has].astype(np.int64)
    present = verdicts.column("present").to_numpy(zero_copy_only=False).astype(bool)
    skipped = {"upload": int(upload.sum()), "no_features": int(len(keep) - len(used)),
               "unknown_tag": int((~upload & ~known).sum())}

    t_used, z_used = tag_ids[used], present[used]
    T = model.tags
    n_present = np.bincount(t_used[z_used], minlength=T)
    n_absent = np.bincount(t_used[~z_used], minlength=T)
    refit = (n_present >= cfg.min_present) & (n_absent >= cfg.min_absent) & (n_present + n_absent > 0)
    before = model.beta.detach().clone()
    beta = before.clone()
    if refit.any():
        sel = refit[t_used]
        with torch.inference_mode():
            s = verdict_scores(model, x, rows[sel], t_used[sel])
        fitted = fit_verdict_intercepts(s, torch.from_numpy(t_used[sel]), torch.from_numpy(z_used[sel]), before,
                                        cfg.prior, cfg.iterations, cfg.tol)
        mask = torch.from_numpy(refit)
        beta[mask] = fitted[mask]
    report = []
    for t in np.nonzero(n_present + n_absent)[0]:
        reason = None
        if not refit[t]:
            short = [f"{n_present[t]} present < min_present={cfg.min_present}"] if n_present[t] < cfg.min_present else []
            short += [f"{n_absent[t]} absent < min_absent={cfg.min_absent}"] if n_absent[t] < cfg.min_absent else []
            reason = "too few verdicts: " + ", ".join(short)
        report.append({"tag": vocabulary[t], "present": int(n_present[t]), "absent": int(n_absent[t]),
                       "beta_before": float(before[t]), "beta_after": float(beta[t]), "refitted": bool(refit[t]),
                       "reason": reason})
    return FeedbackFit(beta=beta, refitted=refit, tags=report, verdicts=n, used=len(used), skipped=skipped)
