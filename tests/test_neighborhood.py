"""Seed 003's neighbourhood model against its equations (plain PyTorch, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tagray.config import ConfigError
from tagray.heads.neighborhood import (
    NeighborhoodNet,
    NeighborsConfig,
    gather_neighborhood,
    neighborhood_scores,
    neighbors_loss,
    sample_neighborhoods,
)
from tagray.heads.recipes.neighbors import fit_neighbors
from tagray.heads.standardize import feature_moments


def hand_net() -> NeighborhoodNet:
    net = NeighborhoodNet(dim=2, labels=1, hidden=2, dropout=0.0)
    with torch.no_grad():
        net.image.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        net.image.bias.copy_(torch.tensor([0.0, -1.0]))
        net.neighbor.weight.copy_(torch.tensor([[1.0, 1.0], [-1.0, 0.0]]))
        net.neighbor.bias.zero_()
        net.out.weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
        net.out.bias.fill_(0.5)
    return net


def test_forward_is_eq_4_to_6_by_hand() -> None:
    net = hand_net().eval()
    x = torch.tensor([[2.0, 0.5]])
    z = torch.tensor([[[1.0, -3.0], [-2.0, 1.0], [9.0, 9.0]]])
    mask = torch.tensor([[True, True, False]])  # the third slot is not a neighbour: ignored
    # v_x = ReLU([2, 0.5 − 1]) = [2, 0]
    # z1: ReLU([1 − 3, −1]) = [0, 0];  z2: ReLU([−1, 2]) = [0, 2];  v_z = max = [0, 2]
    # f = 1·2 + 2·0 + 3·0 + 4·2 + 0.5 = 10.5
    assert net(x, z, mask).item() == pytest.approx(10.5)
    # No neighbours at all: v_z = 0, f = 2 + 0.5
    assert net(x, z, torch.zeros_like(mask)).item() == pytest.approx(2.5)


def test_loss_is_logistic_sum_plus_l2() -> None:
    net = hand_net()
    logits = torch.tensor([[0.3, -1.2], [2.0, 0.1]])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    sig = torch.sigmoid(logits)
    data = -(y * sig.log() + (1 - y) * (1 - sig).log()).sum(1).mean()
    w2 = 2 + 3 + (1 + 4 + 9 + 16)  # ‖W_x‖² + ‖W_z‖² + ‖W_y‖² of hand_net; biases excluded
    assert neighbors_loss(logits, y, net, 0.01).item() == pytest.approx(data.item() + 0.01 * w2, rel=1e-6)


def test_sampled_neighbourhoods_are_uniform_subsets_of_the_valid_ones() -> None:
    rng = np.random.default_rng(0)
    nn = np.array([[5, 6, 7, 8, -1, -1], [3, -1, -1, -1, -1, -1]])
    counts = np.zeros(9)
    for _ in range(4000):
        chosen = sample_neighborhoods(nn, 3, rng)
        row = chosen[0]
        assert len(set(row)) == 3 and set(row) <= {5, 6, 7, 8}
        assert chosen[1].tolist() in ([3, -1, -1],)  # fewer than m: what there is, then −1
        counts[row] += 1
    np.testing.assert_allclose(counts[5:9] / 4000, 0.75, atol=0.03)  # each of 4 in a 3-subset: 3/4
    x = torch.arange(10, dtype=torch.float32)[:, None].repeat(1, 2)
    z, mask = gather_neighborhood(x, np.array([[3, -1]]))
    assert z[0, 0].tolist() == [3.0, 3.0] and mask.tolist() == [[True, False]]


def test_test_time_score_is_the_mean_over_sampled_neighbourhoods() -> None:
    net = hand_net()
    x = torch.tensor([[2.0, 0.5], [1.0, 1.0], [0.0, 3.0]])
    nn = np.array([[1, 2], [0, 2], [0, 1]])
    scores = neighborhood_scores(net, x, nn, m=1, samples=200, seed=0)
    # Each neighbourhood is one of two images, so the exact mean is the average of the two f's.
    ones = torch.ones(1, 1, dtype=torch.bool)
    f = [[net.eval()(x[i : i + 1], x[j : j + 1, None], ones).item() for j in nn[i]] for i in range(3)]
    exact = np.mean(f, 1)
    np.testing.assert_allclose(scores[:, 0].numpy(), exact, atol=0.15 * np.abs(np.diff(f, axis=1)).max() + 1e-6)


def ambiguous_problem(n: int = 600, d: int = 8) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Features (n, d), one label (n, 1) and 4 neighbours per image: half the images carry their
    label in feature 0, the other half only through their neighbours (clear images of the label)."""
    g = torch.Generator().manual_seed(0)
    label = (torch.rand(n, generator=g) < 0.5).float()
    x = torch.randn(n, d, generator=g)
    x[:, 0] = 2 * label - 1
    ambiguous = torch.arange(n) % 2 == 1
    x[ambiguous, 0] = 0.0
    rng = np.random.default_rng(0)
    clear_of = [np.nonzero((label.numpy() == c) & ~ambiguous.numpy())[0] for c in (0, 1)]
    nn = np.stack([rng.choice(clear_of[int(label[i])], 4, replace=False) for i in range(n)]).astype(np.int32)
    return x, label[:, None], nn


def test_neighbourhood_information_is_learned() -> None:
    """Half the images are ambiguous (their informative feature is 0); their neighbours (clear
    images of the same label) reveal the label. The model learns to use them: with neighbours the
    ambiguous images are labelled right, with empty neighbourhoods they are a coin flip."""
    x, y, nn = ambiguous_problem(1200)
    label, ambiguous = y[:, 0], torch.arange(len(x)) % 2 == 1
    cfg = NeighborsConfig(m=2, max_rank=4, hidden=16, dropout=0.0, lr=3e-3, epochs=8, batch_size=50, l2=0.0)
    model = fit_neighbors(x, y, nn, cfg)
    with_nn = neighborhood_scores(model, x, nn, m=2, samples=10)[ambiguous, 0]
    without = neighborhood_scores(model, x, np.full_like(nn, -1), m=2, samples=1)[ambiguous, 0]
    truth = label[ambiguous]
    assert ((with_nn > 0).float() == truth).float().mean().item() > 0.95
    assert ((without > 0).float() == truth).float().mean().item() < 0.7


def test_feature_moments_are_numpys_in_chunks_and_a_dimension_that_barely_varies_is_floored() -> None:
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((1001, 5)) * [1e-3, 1, 30, 0, 2] + [1e4, -3, 0, 7, 0.5]).astype(np.float32)
    mean, std = feature_moments(x, chunk_bytes=64 * 8 * 5)  # chunks of 64 rows: 16, the last of 41 rows
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(0), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(std, x64.std(0), rtol=1e-9, atol=1e-9)  # 1e-3 about 1e4: no cancellation
    x = x - x.mean(0, dtype=np.float64).astype(np.float32) * [1, 0, 0, 0, 0]  # float32 cannot z-score 1e-3 at 1e4
    x[:, 3] = 7.0
    net = NeighborhoodNet(5, 1, hidden=3)
    net.standardize_features(torch.from_numpy(x))
    z = ((torch.from_numpy(x) - net.feature_shift) * net.feature_scale).double()
    np.testing.assert_allclose(z.mean(0).numpy(), 0, atol=1e-4)
    # dimensions 1, 2, 4 z-scored; 0 (std 1e-3, 1/1,000 of the median: below the floor) and the constant 3
    # are centred and scaled as the floor: 1 / (1e-2 × the median std of the varying ones)
    floor = 1e-2 * np.median(x64.std(0)[[0, 1, 2, 4]])
    np.testing.assert_allclose(z.std(0, unbiased=False).numpy(), [x64[:, 0].std() / floor, 1, 1, 0, 1], atol=1e-3)
    assert x64[:, 0].std() / floor < 0.1
    assert net.feature_shift[3].item() == 7.0
    assert net.feature_scale[3].item() == pytest.approx(1 / floor, rel=1e-5)
    # a dimension active in 1 training image in 1,000 is scaled as the floor too, not by its tiny std
    rare = np.repeat(np.random.default_rng(2).standard_normal((1000, 1)).astype(np.float32), 4, axis=1)
    rare[:, 3] = 0.0
    rare[0, 3] = 1e-3
    net2 = NeighborhoodNet(4, 1, hidden=3)
    net2.standardize_features(rare)
    assert net2.feature_scale[3].item() == pytest.approx(1 / (1e-2 * rare[:, 0].std()), rel=1e-3)
    with pytest.raises(ValueError, match="need rows of features"):
        feature_moments(np.zeros(5, np.float32))


def test_standardised_training_does_not_see_the_features_scale_or_offset() -> None:
    """Training on c_d·φ_d + b_d (per dimension) gives the model trained on φ when standardize is
    on (z-scores are the same up to float rounding); with it off the two models differ."""
    x, y, nn = ambiguous_problem()
    g = torch.Generator().manual_seed(1)
    c = torch.exp(torch.empty(x.shape[1]).uniform_(np.log(1e-2), np.log(10.0), generator=g))
    b = torch.empty(x.shape[1]).uniform_(-1, 1, generator=g)
    moved = x * c + b

    def scores(features: torch.Tensor, standardize: bool) -> torch.Tensor:
        cfg = NeighborsConfig(m=2, max_rank=4, hidden=16, dropout=0.0, lr=3e-3, epochs=3, batch_size=50, l2=1e-3,
                              min_steps=0, standardize=standardize)
        return neighborhood_scores(fit_neighbors(features, y, nn, cfg), features, nn, m=2, samples=3)[:, 0]

    on, on_moved = scores(x, True), scores(moved, True)
    spread = on.std().item()
    assert (on - on_moved).abs().max().item() < 1e-3 * spread
    off, off_moved = scores(x, False), scores(moved, False)
    assert (off - off_moved).abs().max().item() > 0.1 * spread


def test_a_model_saved_before_standardisation_loads_as_the_identity() -> None:
    torch.manual_seed(0)
    net = NeighborhoodNet(4, 2, hidden=3).eval()
    old = {k: v for k, v in net.state_dict().items() if not k.startswith("feature_")}
    net.standardize_features(np.random.default_rng(0).standard_normal((50, 4)) * 5 + 2)
    net.load_state_dict(old)  # strict: no missing keys
    assert net.feature_shift.tolist() == [0.0] * 4 and net.feature_scale.tolist() == [1.0] * 4


def test_a_saved_model_carries_its_moments_and_one_saved_before_them_says_it_is_unstandardised(tmp_path) -> None:
    from tagray.data.normalize import TagNormalizer, Vocabulary
    from tagray.heads.net_artifact import SavedNetHead, load_net_head, save_net_head
    from tests.saved_models import as_saved_before_standardisation

    vocab = Vocabulary(("beach", "dog"), (3, 2), TagNormalizer().identity())
    torch.manual_seed(0)
    net = NeighborhoodNet(4, 2, hidden=3).eval()
    net.standardize_features(np.random.default_rng(0).standard_normal((50, 4)) * 5 + 2)
    new, old = tmp_path / "new", tmp_path / "old"
    for d in (new, old):
        save_net_head(SavedNetHead(net, vocab, NeighborsConfig(hidden=3), None, np.array([3, 2])), str(d))
    x, z, mask = torch.randn(6, 4), torch.randn(6, 2, 4), torch.ones(6, 2, dtype=torch.bool)
    loaded = load_net_head(str(new))
    assert loaded.config.standardize is True
    torch.testing.assert_close(loaded.model(x, z, mask), net(x, z, mask))
    # as written before standardisation: no buffers in the weights, no field in model.json
    as_saved_before_standardisation(old)
    legacy = load_net_head(str(old))
    assert legacy.config.standardize is False
    assert legacy.model.feature_scale.tolist() == [1.0] * 4 and legacy.model.feature_shift.tolist() == [0.0] * 4


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="m ≤ max_rank"):
        NeighborsConfig(m=7, max_rank=6)
    with pytest.raises(ConfigError, match="metadata must be one of"):
        NeighborsConfig(metadata="friends")
    with pytest.raises(ConfigError, match="search must be one of"):
        NeighborsConfig(search="faiss")
    with pytest.raises(ConfigError, match="max_posting caps the inverted index"):
        NeighborsConfig(search="lsh", max_posting=100)
