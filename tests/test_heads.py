"""LR / RLR maths against seed 001's equations (§4, App. D), in plain PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tagray.heads.calibrate import fit_intercepts
from tagray.heads.fit import HeadConfig
from tagray.heads.linear import (
    EMConfig,
    LinearTagger,
    em_step,
    log_p_tag,
    log_p_untagged,
    posterior_true,
    robust_nll,
)
from tagray.heads.recipes.linear import fit


def sig(s):
    return 1 / (1 + np.exp(-s))


def test_e_step_matches_eq_8_and_eq_50_51():
    rng = np.random.default_rng(0)
    s = rng.normal(0, 3, (50, 4))
    y = (rng.random((50, 4)) < 0.3).astype(np.float64)
    pi = np.array([0.1, 0.4, 0.7, 0.95])
    gamma = np.array([0.99, 0.95, 1.0 - 1e-9, 0.9])
    alpha = posterior_true(torch.tensor(s), torch.tensor(y), torch.tensor(pi)).numpy()
    eq8 = np.where(y > 0, 1.0, (1 - pi) * sig(s) / (1 - pi * sig(s)))
    np.testing.assert_allclose(alpha, eq8, rtol=1e-10)
    alpha_g = posterior_true(torch.tensor(s), torch.tensor(y), torch.tensor(pi), torch.tensor(gamma)).numpy()
    eq50 = pi * sig(s) / (pi * sig(s) + (1 - gamma) * (1 - sig(s)))
    eq51 = (1 - pi) * sig(s) / ((1 - pi) * sig(s) + gamma * (1 - sig(s)))
    np.testing.assert_allclose(alpha_g, np.where(y > 0, eq50, eq51), rtol=1e-8)


def test_likelihoods_match_eq_6_and_stay_finite_for_large_scores():
    s = torch.tensor([[-3.0, 0.0, 2.5]], dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)
    pi = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    sn = sig(s.numpy())
    eq6 = -(y.numpy() * np.log(pi.numpy() * sn) + (1 - y.numpy()) * np.log(1 - pi.numpy() * sn)).sum()
    assert float(robust_nll(s, y, pi)) == pytest.approx(eq6, rel=1e-10)
    # Large |s|: eq. 57's limit −y ln π − (1−y) ln(1−π) at s → +∞; −ln σ(s) ≈ |s| for tagged at s → −∞.
    big = torch.tensor([[200.0, 200.0, -200.0]], dtype=torch.float64)
    lp = log_p_tag(big, pi).numpy()[0]
    lu = log_p_untagged(big, pi).numpy()[0]
    assert np.all(np.isfinite(lp)) and np.all(np.isfinite(lu))
    assert lp[0] == pytest.approx(np.log(0.2)) and lu[1] == pytest.approx(np.log(0.5))
    assert lp[2] == pytest.approx(np.log(0.9) - 200.0) and lu[2] == pytest.approx(0.0, abs=1e-12)
    a = posterior_true(torch.tensor([[300.0, -300.0]]), torch.zeros(1, 2), torch.tensor([0.3, 0.3]))
    assert torch.isfinite(a).all() and float(a[0, 0]) == pytest.approx(1.0) and float(a[0, 1]) == pytest.approx(0.0)


def test_gradient_is_eq_12():
    torch.manual_seed(0)
    model = LinearTagger(6, 3, EMConfig())
    torch.nn.init.normal_(model.linear.weight)
    x, y = torch.randn(40, 6), (torch.rand(40, 3) < 0.3).float()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: only look at the gradient
    with torch.no_grad():
        s = model(x)
        alpha = posterior_true(s, y, model.pi())
    em_step(model, opt, x, y)
    expected = ((torch.sigmoid(s) - alpha).T @ x) / len(x)  # eq. 12, per image
    torch.testing.assert_close(model.linear.weight.grad, expected, rtol=1e-5, atol=1e-6)


def _corpus(n: int, pis: np.ndarray, seed: int = 0, d: int = 16, informative: bool = True):
    """z from a logistic model, y = z · Bernoulli(π) (the RLR model with γ = 1)."""
    g = np.random.default_rng(seed)
    x = g.standard_normal((n, d)).astype(np.float32)
    w = g.standard_normal((d, len(pis))) * (1.5 if informative else 0.0)
    z = g.random((n, len(pis))) < sig(x @ w - 1.0)
    y = z & (g.random((n, len(pis))) < pis)
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.float32)), z


def test_stochastic_em_recovers_tagging_likelihoods():
    pis = np.array([0.15, 0.3, 0.5, 0.8])
    x, y, _ = _corpus(40_000, pis)
    model = fit(x, y, HeadConfig(head="rlr", epochs=30, batch_size=500, lr=0.01))
    np.testing.assert_allclose(model.pi().numpy(), pis, atol=0.06)


def test_pi_one_is_a_fixed_point_and_pi_init_escapes_it():
    pis = np.array([0.3, 0.3])
    x, y, _ = _corpus(5000, pis, seed=1)
    cfg = HeadConfig(head="rlr", epochs=3, pi_max=1.0)
    stuck = fit(x, y, cfg, model=_paper_init(cfg))  # S_α = S_yα = 1 (the paper's initialisation) → π = 1
    assert torch.all(stuck.pi() == 1.0)
    moved = fit(x, y, HeadConfig(head="rlr", epochs=3))
    assert torch.all(moved.pi() < 0.5)


def _paper_init(cfg: HeadConfig) -> LinearTagger:
    em = EMConfig(pi_init=0.5, pi_max=1.0)
    model = LinearTagger(16, 2, em)
    model.s_alpha.fill_(1.0)
    model.s_y_alpha.fill_(1.0)
    return model


def test_pi_lower_bound_stops_collapse_on_rare_uninformative_tags():
    # Features say nothing about the tag and it is rare: the EM can explain it by σ → 1 and
    # π → tag rate ≈ 1 %, a degenerate solution. pi_min holds π at the bound instead.
    # π starts at 0.5 and the bound is 0.25, so neither "stayed at the start" nor "ended at the
    # bound" can pass for the other; fast statistics (η = 0.1, 1,200 steps) let the free π collapse.
    x, y, _ = _corpus(20_000, np.array([0.5]), seed=2, informative=False)
    rate = float(y.mean())
    assert rate < 0.2
    settings = dict(head="rlr", epochs=6, batch_size=100, lr=0.1, eta=0.1, pi_init=0.5)
    free = fit(x, y, HeadConfig(pi_min=0.0, **settings))
    guarded = fit(x, y, HeadConfig(pi_min=0.25, **settings))
    assert float(free.pi()[0]) == pytest.approx(rate, abs=0.02)  # collapsed to the tag rate, far below 0.25
    assert float(guarded.pi()[0]) == pytest.approx(0.25, abs=1e-6)  # held at pi_min, not at pi_init 0.5


def test_lr_is_rlr_with_pi_fixed_at_one():
    x, y, _ = _corpus(3000, np.array([0.5, 0.5]), seed=3)
    lr = fit(x, y, HeadConfig(head="lr", epochs=2))
    assert torch.all(lr.pi() == 1.0) and lr.gamma() is None
    torch.testing.assert_close(lr.p_tag(x[:10]), torch.sigmoid(lr(x[:10])))


def test_statistics_are_summed_over_workers():
    """A reducer that returns the global sum gives the same π as one process seeing it all."""
    x, y, _ = _corpus(1000, np.array([0.3, 0.6]), seed=4)
    a = LinearTagger(16, 2, EMConfig())
    b = LinearTagger(16, 2, EMConfig())
    b.load_state_dict(a.state_dict())
    em_step(a, torch.optim.SGD(a.parameters(), lr=0.0), x, y)
    half = len(x) // 2
    other = torch.stack([y[half:].sum(0), *[t.sum(0) for t in _alpha_parts(b, x[half:], y[half:])]])
    em_step(b, torch.optim.SGD(b.parameters(), lr=0.0), x[:half], y[:half], reduce=lambda t: t + other, n_total=len(x))
    torch.testing.assert_close(a.pi(), b.pi())


def _alpha_parts(model, x, y):
    with torch.no_grad():
        alpha = posterior_true(model(x), y, model.pi())
    return alpha, y * alpha


def test_learned_gamma_recovers_false_tag_rate():
    g = np.random.default_rng(5)
    x, _, z = _corpus(60_000, np.array([0.6, 0.6]), seed=5)
    false = g.random(z.shape) < np.array([0.0, 0.05])  # 5 % false tags on the second tag
    y = torch.from_numpy(((z & (g.random(z.shape) < 0.6)) | (~z & false)).astype(np.float32))
    model = fit(x, y, HeadConfig(head="rlr", epochs=8, learn_gamma=True, gamma_min=0.5, lr=0.01))
    gamma = model.gamma().numpy()
    assert gamma[0] > 0.98 and 0.92 < gamma[1] < 0.98


def test_calibration_recovers_intercepts():
    g = np.random.default_rng(6)
    s = torch.from_numpy(g.normal(0, 2, (20_000, 3)))
    beta_true = torch.tensor([-2.0, 0.0, 1.5], dtype=torch.float64)
    z = (torch.rand(s.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64) < torch.sigmoid(s + beta_true)).double()
    beta = fit_intercepts(s, z, l2=1e-3)
    torch.testing.assert_close(beta, beta_true, atol=0.1, rtol=0)
    # No positives at all: a finite, negative β instead of −∞.
    none = fit_intercepts(s[:, :1], torch.zeros(20_000, 1, dtype=torch.float64))
    assert torch.isfinite(none).all() and float(none[0]) < -5
