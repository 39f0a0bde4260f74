"""Seed 002's losses, tag similarity and Algorithm 1 against their equations (plain PyTorch)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tagray.config import ConfigError
from tagray.data.tag_similarity import (
    cooccurrence,
    google_distance,
    information_content,
    tag_similarity,
    wordnet_distance,
)
from tagray.heads.refine import (
    RefineConfig,
    RefineNet,
    dynamic_batch,
    make_optimizers,
    refine_step,
    semantic_dependency,
    semantic_dependency_pairs,
    tag_laplacian,
    user_error,
    visual_candidates,
    visual_consistency,
)


def test_visual_consistency_is_eq_2_by_hand() -> None:
    # s = 4, m = 2: two groups (image, neighbour)
    p = torch.tensor([[0.9, 0.1], [0.6, 0.3], [0.2, 0.2], [0.2, 0.8]])
    v = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    d2 = torch.tensor([1.0, 4.0])  # ‖v_j − v_e‖² per group
    sigma = d2.median()  # torch's median of two values is the lower: 1
    gamma = torch.exp(-d2 / sigma)
    diffs = torch.tensor([0.3**2 + 0.2**2, 0.0**2 + 0.6**2])
    expected = 2 / (4 * 1) * (gamma * diffs).sum()
    assert visual_consistency(p, v, 2).item() == pytest.approx(expected.item(), rel=1e-6)
    assert sigma.item() == 1.0


def test_semantic_dependency_matrix_form_is_half_the_double_sum() -> None:
    g = torch.Generator().manual_seed(0)
    p = torch.rand(6, 5, generator=g)
    a = torch.rand(5, 5, generator=g)
    xi = (a + a.T) / 2
    xi.fill_diagonal_(1.0)  # ξ_ii = exp(0) = 1 never enters (eq. 6's i = j terms vanish)
    assert semantic_dependency(p, tag_laplacian(xi)).item() == pytest.approx(
        semantic_dependency_pairs(p, xi).item() / 2, rel=1e-5)
    # Hand case: two tags, ξ_12 = 0.5: eq. 8 = ξ_12 Σ_b (p_b1 − p_b2)² / C²
    p2 = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    xi2 = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    assert semantic_dependency(p2, tag_laplacian(xi2)).item() == pytest.approx(0.5 * 1.0 / 4)


def test_user_error_is_l1() -> None:
    p = torch.tensor([[0.9, 0.2], [0.4, 0.5]])
    g = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert user_error(p, g).item() == pytest.approx(0.1 + 0.2 + 0.4 + 0.5)


def test_google_distance_and_similarity_by_hand() -> None:
    counts = np.array([10, 20, 5])
    co = np.array([[10, 5, 0], [5, 20, 5], [0, 5, 5]])
    d = google_distance(counts, co, 100)
    expected = (math.log(20) - math.log(5)) / (math.log(100) - math.log(10))
    assert d[0, 1] == pytest.approx(expected) and d[1, 0] == pytest.approx(expected)
    assert math.isinf(d[0, 2]) and d[1, 1] == 0.0
    kb = np.zeros((3, 3))
    xi = tag_similarity(d, kb, alpha=1.0)
    off = np.array([d[0, 1], d[1, 2]]) ** 2
    sigma = np.median(off)  # the finite off-diagonal pairs (each counted twice: same median)
    assert xi[0, 1] == pytest.approx(math.exp(-d[0, 1] ** 2 / sigma))
    assert xi[0, 2] == 0.0 and xi[2, 2] == 1.0


def test_cooccurrence_counts() -> None:
    ids = np.array([[0, 1, -1], [1, 2, -1], [0, -1, -1]])
    counts, co = cooccurrence(ids, 3)
    assert counts.tolist() == [2, 2, 1] and co[0, 1] == 1 and co[0, 2] == 0


def test_wordnet_distance_is_nltk_lin_similarity() -> None:
    from tagray.data.wordnet import wordnet

    tags = ["dog", "cat", "car", "beach", "sea", "blurfl"]
    counts = np.array([40, 30, 25, 20, 15, 5])
    d = wordnet_distance(tags, counts)
    first, ic = information_content(tags, counts)
    wn = wordnet()
    for i, j in [(0, 1), (0, 2), (3, 4), (1, 3)]:
        lin = first[tags[i]].lin_similarity(first[tags[j]], ic)  # nltk's lcs search
        assert d[i, j] == pytest.approx(1 - lin, abs=1e-9), (tags[i], tags[j])
    assert d[0, 1] < d[0, 2]  # dog is closer to cat than to car
    assert d[5, 0] == 1.0 and d[5, 5] == 0.0  # not a WordNet noun: maximal distance
    assert wn.synsets("blurfl") == []


def test_candidates_and_algorithm_1() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g)
    cand = visual_candidates(x.numpy(), max_rank=5)
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    ref = torch.topk(d, 5, largest=False).indices.numpy()
    assert (cand == ref).all()
    model = RefineNet(6, 3, hidden=4)
    anchors = np.array([3, 7])
    batch = dynamic_batch(model, x, anchors, cand, m=3)
    assert batch.shape == (6,) and batch[0] == 3 and batch[3] == 7
    with torch.no_grad():
        v = model.features(x)
    for j, a in enumerate(anchors):  # the m−1 nearest candidates under the current ϕ
        dist = (v[cand[a]] - v[a]).pow(2).sum(1)
        expected = cand[a][torch.topk(dist, 2, largest=False).indices.numpy()]
        assert sorted(batch[3 * j + 1 : 3 * j + 3]) == sorted(expected)


def _step_grads(model: RefineNet, x, g, lap, cfg, world: int) -> list[torch.Tensor]:
    refine_step(model, model, torch.optim.SGD(model.parameters(), lr=0.0), x, g, lap, cfg, world)
    return [p.grad.clone() for p in model.parameters()]


def test_a_step_split_over_workers_is_the_whole_batch_step() -> None:
    # DDP averages the workers' gradients; L_sem and L_err sum over the batch, so each worker
    # scales them by the world size. Two workers holding identical halves must then step as one
    # process on the whole batch (L_vis, a mean over groups, is the same on a half and the whole).
    torch.manual_seed(0)
    cfg = RefineConfig(batch_size=8, m=4, max_rank=4, lambda1=2.0, lambda2=0.5)
    model = RefineNet(5, 3, hidden=6)
    x, g = torch.randn(4, 5), (torch.rand(4, 3) > 0.5).float()
    lap = tag_laplacian(torch.rand(3, 3))
    whole = _step_grads(model, torch.cat([x, x]), torch.cat([g, g]), lap, cfg, world=1)
    half = _step_grads(model, x, g, lap, cfg, world=2)
    for a, b in zip(whole, half, strict=True):
        torch.testing.assert_close(a, b)
    unscaled = _step_grads(model, x, g, lap, cfg, world=1)
    assert not all(torch.allclose(a, b) for a, b in zip(whole, unscaled, strict=True))


def test_visual_layers_train_and_the_classifier_stays_phi0s() -> None:
    torch.manual_seed(0)
    model = RefineNet(5, 3, hidden=6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, g = torch.randn(8, 5), (torch.rand(8, 3) > 0.5).float()
    lap = tag_laplacian(torch.rand(3, 3))
    for layers, moved in (("visual", {"visual.0.weight", "visual.0.bias"}),
                          ("all", {"visual.0.weight", "visual.0.bias", "out.weight", "out.bias"})):
        model.load_state_dict(before)
        cfg = RefineConfig(batch_size=8, m=4, max_rank=4, lr=0.5, train_layers=layers)
        _, opt, _ = make_optimizers(model, cfg)
        refine_step(model, model, opt, x, g, lap, cfg)
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
        assert changed == moved, layers


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="train_layers must be one of"):
        RefineConfig(train_layers="classifier")
    with pytest.raises(ConfigError, match="multiple of m"):
        RefineConfig(batch_size=60, m=8)
    with pytest.raises(ConfigError, match="λ1, λ2, α"):
        RefineConfig(lambda1=-1.0)
