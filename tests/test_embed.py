"""The word-embedding head's maths (seed 004 §2–3) in plain PyTorch: each loss against its
equation on hand-computed cases, the samplers, the word table's sparse updates against a
dense optimiser, out-of-vocabulary snapping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tagray.heads.embed_losses import fast0tag, fast0tag_full, full_xent, sampled_xent
from tagray.heads.oov import snap_oov
from tagray.heads.samplers import (
    AdjacentSampler,
    FrequencySampler,
    PoolSampler,
    log_noise_prior,
    sample_positives,
)
from tagray.heads.targets import multi_hot
from tagray.heads.word_table import WordTable


def sig(s):
    return 1 / (1 + np.exp(-s))


def test_sampled_xent_is_eq_1_negated():
    rng = np.random.default_rng(0)
    b, p, n, d = 3, 4, 5, 6
    f, vp, vn = rng.normal(size=(b, d)), rng.normal(size=(b, p, d)), rng.normal(size=(b, n, d))
    alpha = 0.3
    expected = 0.0
    for i in range(b):
        term = -sum(np.log(sig(f[i] @ vp[i, j])) for j in range(p)) - sum(np.log(sig(-f[i] @ vn[i, j])) for j in range(n))
        co = sum(sig(vp[i, j] @ vp[i, k]) for j in range(p) for k in range(p) if j != k)
        co += sum(sig(-vp[i, j] @ vn[i, k]) for j in range(p) for k in range(n))
        expected += term - alpha * co
    got = sampled_xent(torch.tensor(f), torch.tensor(vp), torch.tensor(vn), alpha)
    assert float(got) == pytest.approx(expected / b, rel=1e-10)
    # A hand-computed case: f = (1, 0), v_p = (2, 0), v_n = (−1, 0), α = 0 → −log σ(2) − log σ(1).
    one = sampled_xent(torch.tensor([[1.0, 0]]), torch.tensor([[[2.0, 0]]]), torch.tensor([[[-1.0, 0]]]), 0.0)
    assert float(one) == pytest.approx(-np.log(sig(2.0)) - np.log(sig(1.0)), rel=1e-6)
    # Finite where a naive log(sigmoid) underflows.
    big = sampled_xent(torch.tensor([[200.0]]), torch.tensor([[[-1.0]]]), torch.tensor([[[1.0]]]), 0.01)
    assert torch.isfinite(big) and float(big) == pytest.approx(400.0, rel=1e-3)


def test_full_xent_and_fast0tag_are_their_formulas():
    rng = np.random.default_rng(1)
    b, v, d = 3, 7, 4
    f, vecs = rng.normal(size=(b, d)), rng.normal(size=(v, d))
    positives = np.array([[0, 3, -1], [6, -1, -1], [1, 2, 5]])
    s = f @ vecs.T
    y = np.zeros((b, v))
    for i, row in enumerate(positives):
        y[i, row[row >= 0]] = 1
    bce = -(y * np.log(sig(s)) + (1 - y) * np.log(1 - sig(s))).sum(1).mean()
    scores = torch.tensor(s)
    assert float(full_xent(scores, torch.tensor(positives))) == pytest.approx(bce, rel=1e-10)
    # eq. 5 over every (tag, non-tag) pair: −β Σ_p Σ_n log σ(f·(v_p − v_n))
    beta = 0.5
    rank = np.mean([-beta * sum(np.log(sig(s[i, pp] - s[i, nn])) for pp in range(v) if y[i, pp] for nn in range(v) if not y[i, nn])
                    for i in range(b)])
    assert float(fast0tag_full(scores, torch.tensor(positives), beta)) == pytest.approx(rank, rel=1e-10)
    vp, vn = rng.normal(size=(b, 2, d)), rng.normal(size=(b, 3, d))
    sampled = np.mean([-sum(np.log(sig(f[i] @ (vp[i, j] - vn[i, k]))) for j in range(2) for k in range(3)) for i in range(b)])
    assert float(fast0tag(torch.tensor(f), torch.tensor(vp), torch.tensor(vn))) == pytest.approx(sampled, rel=1e-10)
    np.testing.assert_array_equal(multi_hot(torch.tensor(positives), v).numpy(), y)


def test_positive_sampling_is_uniform_over_each_images_tags():
    rng = np.random.default_rng(2)
    tags = np.array([[4, 9, -1, -1], [7, -1, -1, -1], [1, 2, 3, 5]])
    draws = sample_positives(np.repeat(tags, 2000, axis=0), 5, rng).reshape(3, 2000 * 5)
    for row, drawn in zip(tags, draws, strict=True):
        own = row[row >= 0]
        assert set(np.unique(drawn)) == set(own)  # with replacement, only the image's tags
        share = np.array([(drawn == t).mean() for t in own])
        np.testing.assert_allclose(share, 1 / len(own), atol=0.02)
    with pytest.raises(ValueError, match="no tags"):
        sample_positives(np.array([[-1, -1]]), 3, rng)


def test_frequency_pool_and_adjacent_negatives():
    rng = np.random.default_rng(3)
    counts = np.array([1000, 100, 10, 0, 1])
    freq = FrequencySampler(counts, power=0.75)
    expected = np.where(counts > 0, counts**0.75, 0) / (counts[counts > 0] ** 0.75).sum()
    drawn = freq.negatives(np.zeros((50_000, 1)), 4, rng)
    np.testing.assert_allclose(np.bincount(drawn.ravel(), minlength=5) / drawn.size, expected, atol=0.005)
    assert not (drawn == 3).any()  # never a word without count

    pool = PoolSampler(counts, 0.75, pool_size=64)
    pool.new_epoch(rng)
    first = pool.pool.copy()
    assert set(np.unique(pool.negatives(np.zeros((500, 1)), 10, rng))) <= set(first)
    pool.new_epoch(rng)
    assert not np.array_equal(first, pool.pool)  # re-drawn every epoch

    tags = np.array([[1, 2, -1], [3, -1, -1], [4, 5, 6]])
    neg = AdjacentSampler().negatives(tags, 8, rng)
    for i in range(3):
        nxt = tags[(i + 1) % 3]
        assert set(neg[i]) <= set(nxt[nxt >= 0])

    prior = log_noise_prior("frequency", counts, 0.75)
    np.testing.assert_allclose(np.exp(prior[counts > 0]), expected[counts > 0], rtol=1e-5)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_word_table_sparse_updates_match_a_dense_optimiser(optimizer):
    rng = np.random.default_rng(4)
    init = rng.normal(size=(20, 3)).astype(np.float32)
    table = WordTable(init, optimizer, lr=0.1)
    dense = torch.nn.Parameter(torch.tensor(init))
    opt = (torch.optim.SGD([dense], lr=0.1) if optimizer == "sgd"
           else torch.optim.Adagrad([dense], lr=0.1, eps=1e-10))
    for _ in range(5):
        ids = rng.integers(0, 20, 12)  # with repeats: their gradients add up
        grads = rng.normal(size=(12, 3)).astype(np.float32)
        table.push(ids, grads)
        g = np.zeros_like(init)
        np.add.at(g, ids, grads)
        dense.grad = torch.tensor(g)
        opt.step()
    np.testing.assert_allclose(table.pull(np.arange(20)), dense.detach().numpy(), rtol=1e-5, atol=1e-6)
    blob = table.state_bytes()
    other = WordTable(np.zeros_like(init), optimizer, lr=0.1)
    other.load_bytes(blob)
    np.testing.assert_array_equal(other.pull(np.arange(20)), table.pull(np.arange(20)))
    if optimizer == "adagrad":
        np.testing.assert_array_equal(other.accumulator.numpy(), table.accumulator.numpy())
    with pytest.raises(IndexError, match=r"\[0, 20\)"):
        table.pull(np.array([20]))


def test_oov_snapping_restores_neighbours_of_unseen_words():
    """Training moved the seen words (here: a rotation); snapping must move each unseen word so
    that its nearest seen words are again those it had before training (eq. 3–4)."""
    gen = torch.Generator().manual_seed(5)
    d, seen_n, unseen_n = 8, 60, 10
    initial = torch.randn(seen_n + unseen_n, d, generator=gen)
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    trained = initial.clone()
    trained[:seen_n] = initial[:seen_n] @ rotation
    unseen = np.r_[np.zeros(seen_n, bool), np.ones(unseen_n, bool)]

    def nearest_seen(v, k=3):
        return torch.topk(v[seen_n:] @ v[:seen_n].T, k, dim=1).indices.sort(1).values

    before = nearest_seen(initial)
    assert not torch.equal(nearest_seen(trained), before)  # unsnapped, neighbourhoods are lost
    snapped, info = snap_oov(initial, trained, unseen, steps=600, lr=0.05, anchors=4096)
    assert torch.equal(snapped[:seen_n], trained[:seen_n])  # only unseen words move
    assert info["loss_after"] < info["loss_before"]
    agree = (nearest_seen(snapped) == before).all(1).float().mean()
    assert agree >= 0.9
    # The closed-form answer is the rotated vector; snapping lands near it.
    cos = torch.nn.functional.cosine_similarity(snapped[seen_n:], initial[seen_n:] @ rotation)
    assert cos.min() > 0.9


def test_standardised_h_does_not_see_the_features_scale_or_offset():
    """fit_embed on c_d·φ_d + b_d gives the h trained on φ when standardize is on (the same
    z-scores up to float rounding), and another h with it off."""
    from tagray.heads.embedding import EmbedConfig
    from tagray.heads.recipes.embed import fit_embed

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((96, 6)).astype(np.float32))
    tag_ids = np.stack([rng.choice(5, 2, replace=False) for _ in range(96)]).astype(np.int64)
    c = torch.from_numpy(np.exp(rng.uniform(np.log(1e-2), np.log(10.0), 6)).astype(np.float32))
    moved = x * c + torch.from_numpy(rng.uniform(-1, 1, 6).astype(np.float32))
    init = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32) * 0.1
    counts = np.bincount(tag_ids.ravel(), minlength=5).astype(np.float64)

    def out(features: torch.Tensor, standardize: bool) -> torch.Tensor:
        cfg = EmbedConfig(hidden=(8,), word_dim=4, epochs=3, batch_size=32, lr=0.01, standardize=standardize)
        h = fit_embed(features, tag_ids, WordTable(init.copy(), cfg.word_optimizer, cfg.word_lr), counts, cfg)
        with torch.no_grad():
            return h(features)

    on, on_moved = out(x, True), out(moved, True)
    spread = on.std().item()
    assert (on - on_moved).abs().max().item() < 1e-3 * spread
    off, off_moved = out(x, False), out(moved, False)
    assert (off - off_moved).abs().max().item() > 0.1 * spread


def test_a_saved_embed_head_carries_its_moments_and_one_saved_before_them_says_it_is_unstandardised(tmp_path):
    from tagray.data.normalize import TagNormalizer, Vocabulary
    from tagray.heads.embed_artifact import SavedEmbedHead, load_embed_head, save_embed_head
    from tagray.heads.embedding import EmbedConfig, TagMLP
    from tests.saved_models import as_saved_before_standardisation

    vocab = Vocabulary(("beach", "dog"), (3, 2), TagNormalizer().identity())
    torch.manual_seed(0)
    mlp = TagMLP(4, (3,), 2).eval()
    mlp.standardize_features(np.random.default_rng(0).standard_normal((50, 4)) * 5 + 2)
    head = SavedEmbedHead(mlp, torch.randn(2, 2), ["beach", "dog"], vocab, EmbedConfig(hidden=(3,), word_dim=2), None,
                          np.array([3, 2]), np.zeros(2, bool), "random")
    new, old = tmp_path / "new", tmp_path / "old"
    for d in (new, old):
        save_embed_head(head, str(d))
    x = torch.randn(6, 4)
    loaded = load_embed_head(str(new))
    assert loaded.config.standardize is True and loaded.mlp.feature_scale.ne(1).any()
    torch.testing.assert_close(loaded.mlp(x), mlp(x))
    # as written before standardisation: no buffers in the weights, no field in model.json
    as_saved_before_standardisation(old)
    legacy = load_embed_head(str(old))
    assert legacy.config.standardize is False
    assert legacy.mlp.feature_scale.tolist() == [1.0] * 4 and legacy.mlp.feature_shift.tolist() == [0.0] * 4
