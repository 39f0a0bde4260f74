"""Per-tag Platt scaling of the embed head's user-tag scores (tagray.heads.calibrate.fit_platt,
tagray.heads.embedding.calibrate_user_tags) against its equations, and the artifact that
carries it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from tagray.data.normalize import NormalizerConfig, TagNormalizer, Vocabulary
from tagray.heads.calibrate import fit_platt, platt_targets
from tagray.heads.embed_artifact import (
    USER_TAGS_FILE,
    SavedEmbedHead,
    load_embed_head,
    save_embed_head,
)
from tagray.heads.embedding import (
    EmbedConfig,
    EmbedTagger,
    TagMLP,
    calibrate_user_tags,
    tag_log_prior,
)
from tagray.heads.targets import multi_hot


def _objective(s: np.ndarray, tau: np.ndarray, a: float, b: float) -> float:
    z = a * s + b
    return float(np.sum(np.logaddexp(0, z) - tau * z))


def test_smoothed_targets_are_platts():
    y = torch.tensor([[1, 0], [0, 0], [1, 0], [0, 1]])
    tau = platt_targets(y).numpy()
    # column 0: N+ = 2, N- = 2 → (2+1)/(2+2) and 1/(2+2); column 1: N+ = 1, N- = 3 → 2/3 and 1/5
    np.testing.assert_allclose(tau[:, 0], [3 / 4, 1 / 4, 3 / 4, 1 / 4])
    np.testing.assert_allclose(tau[:, 1], [1 / 5, 1 / 5, 1 / 5, 2 / 3])


def test_platt_recovers_a_known_model_and_is_the_constrained_optimum():
    g = torch.Generator().manual_seed(0)
    n = 20_000
    s = torch.randn(n, 4, generator=g, dtype=torch.float64) * 2
    a_true = torch.tensor([0.5, 2.0, 1.0, -1.5], dtype=torch.float64)  # the last: higher score, lower P(y)
    b_true = torch.tensor([-3.0, 0.5, -1.0, -2.0], dtype=torch.float64)
    y = torch.rand(n, 4, generator=g, dtype=torch.float64) < torch.sigmoid(s * a_true + b_true)
    a, b = fit_platt(s, y)
    torch.testing.assert_close(a[:3], a_true[:3], atol=0.1, rtol=0)  # sampling error of 20,000 draws
    torch.testing.assert_close(b[:3], b_true[:3], atol=0.1, rtol=0)
    assert float(a[3]) == 0.0  # held at the bound: no negative slopes
    tau = platt_targets(y).numpy()
    for t in range(4):
        col, tt = s[:, t].numpy(), tau[:, t]
        best = minimize(lambda p, col=col, tt=tt: _objective(col, tt, p[0], p[1]), x0=[0.1, 0.0], method="L-BFGS-B",
                        bounds=[(0, None), (None, None)])
        # the same minimum as a general bounded solver, to its tolerance
        assert _objective(col, tt, float(a[t]), float(b[t])) <= best.fun + 1e-6 * abs(best.fun)
    # KKT at a = 0: ∂F/∂b = Σ (σ(b) − τ) = 0 → σ(b) is the mean smoothed target; ∂F/∂a ≥ 0
    p = torch.sigmoid(b[3])
    torch.testing.assert_close(p, torch.from_numpy(tau[:, 3]).mean(), atol=1e-9, rtol=0)
    assert float(((p - torch.from_numpy(tau[:, 3])) * s[:, 3]).sum()) >= 0


def test_separable_and_empty_columns_stay_finite():
    s = torch.tensor([[-2.0, 0.3], [-1.0, -0.1], [1.0, 0.2], [2.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[0, 0], [0, 0], [1, 0], [1, 0]])  # column 0 separated by s; column 1 never positive
    a, b = fit_platt(s, y)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert float(a[0]) > 0
    # a column without positives: no slope, and Platt's target 1/(N⁻ + 2) = 1/6 as its probability
    assert float(a[1]) == 0.0
    torch.testing.assert_close(torch.sigmoid(b[1]), torch.tensor(1 / 6, dtype=torch.float64), atol=1e-6, rtol=0)


def test_user_tag_calibration_in_blocks_and_what_the_tagger_computes():
    torch.manual_seed(0)
    mlp = TagMLP(8, (16,), 4).eval()
    vectors = torch.randn(7, 4)
    x = torch.randn(300, 8)
    with torch.no_grad():
        s = mlp(x) @ vectors.T
    rng = np.random.default_rng(0)
    logits = s.numpy() * np.array([1, 2, 0.5, 1, -1, 3, 1])[None] - 1
    y = rng.random(logits.shape) < 1 / (1 + np.exp(-logits))
    ids = np.full((300, 7), -1)
    for i, row in enumerate(y):
        ids[i, : row.sum()] = np.nonzero(row)[0]
    whole = calibrate_user_tags(mlp, vectors, x, ids, block=64)
    blocks = calibrate_user_tags(mlp, vectors, x, ids, block=3)  # 3 + 3 + 1 tags: the same fits
    expect = fit_platt(s, multi_hot(ids, 7))
    for got in (whole, blocks):
        torch.testing.assert_close(got[0], expect[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(got[1], expect[1], atol=1e-5, rtol=0)
    scale, offset = whole
    tagger = EmbedTagger(mlp, vectors, offset, scale)
    p_user, log_content = tagger.probabilities(x)
    torch.testing.assert_close(p_user, torch.sigmoid(s * scale + offset), atol=1e-6, rtol=0)
    torch.testing.assert_close(log_content, torch.nn.functional.logsigmoid(s), atol=1e-6, rtol=0)


def _head(tmp_path, user_tags):
    torch.manual_seed(0)
    tags = ("beach", "dog", "sunset")
    vocab = Vocabulary(tags, (30, 20, 10), TagNormalizer(NormalizerConfig()).identity())
    head = SavedEmbedHead(TagMLP(8, (16,), 4).eval(), torch.randn(4, 4), [*tags, "seashore"], vocab, EmbedConfig(hidden=(16,)),
                          None, np.array([30, 20, 10, 0]), np.zeros(4, bool), "random", user_tags=user_tags,
                          user_tags_fit={"method": "platt", "split": "val", "images": 50} if user_tags else None)
    save_embed_head(head, str(tmp_path))
    return head


def test_the_artifact_carries_the_calibration_and_an_uncalibrated_one_keeps_log_q(tmp_path):
    scale, offset = torch.tensor([0.0, 1.5, 2.0]), torch.tensor([-1.0, 0.2, -3.0])
    _head(tmp_path / "cal", (scale, offset))
    loaded = load_embed_head(str(tmp_path / "cal"))
    assert (tmp_path / "cal" / USER_TAGS_FILE).exists() and loaded.user_tags_fit["method"] == "platt"
    x = torch.randn(5, 8)
    s = loaded.model(x)
    torch.testing.assert_close(loaded.model.probabilities(x)[0], torch.sigmoid(s * scale + offset))

    _head(tmp_path / "plain", None)
    plain = load_embed_head(str(tmp_path / "plain"))
    assert not (tmp_path / "plain" / USER_TAGS_FILE).exists() and plain.user_tags is None
    prior = tag_log_prior(EmbedConfig(), np.array([30, 20, 10]))
    torch.testing.assert_close(plain.model.probabilities(x)[0], torch.sigmoid(plain.model(x) + prior))

    with pytest.raises(ValueError, match="one scale and one offset per tag"):
        _head(tmp_path / "bad", (torch.ones(2), torch.zeros(2)))
    unrecorded = load_embed_head(str(tmp_path / "cal"))
    unrecorded.user_tags_fit = None  # the loader reads the calibration only where model.json records it
    with pytest.raises(ValueError, match="user_tags_fit must say how"):
        save_embed_head(unrecorded, str(tmp_path / "unrecorded"))


def test_the_calibration_sample_opens_only_the_feature_files_it_needs(tmp_path, monkeypatch):
    """`store.sample_features`: only the asked-for images, at most `limit`, at most ⌈limit/spread⌉
    per file, and files are opened only until the sample is complete (a store of 100M images is
    not streamed through the driver for a 20,000-image sample)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tagray.features import store

    identity = {"name": "resnet18", "dim": 3}
    for f in range(10):
        ids = [f"img{f:02d}-{i}" for i in range(20)]
        store.write_shard(store.feature_table(ids, np.full((20, 3), f, np.float32), 3, identity), str(tmp_path),
                          store.shard_name(ids))
    wanted = pa.array([f"img{f:02d}-{i}" for f in range(10) for i in range(0, 20, 2)] + ["nope"])  # 10 per file
    opened = []
    read_table = pq.read_table
    monkeypatch.setattr(store.pq, "read_table", lambda path, **kw: opened.append(path) or read_table(path, **kw))
    sample = store.sample_features(str(tmp_path), wanted, limit=8, seed=0, spread=2)
    got = sample.column("image_id").to_pylist()
    assert len(got) == 8 and set(got) <= set(wanted.to_pylist())
    by_file = {i.split("-")[0] for i in got}
    assert len(by_file) == 2  # ⌈8/2⌉ = 4 from each of two files
    assert len(set(opened)) == 2  # …and no other file was opened
    features = dict(zip(got, sample.column("feature").to_pylist(), strict=True))
    assert all(v == [float(int(k[3:5]))] * 3 for k, v in features.items())  # each row's own features
    everything = store.sample_features(str(tmp_path), wanted, limit=1000, seed=0)
    assert everything.num_rows == 100  # all of them when fewer than the limit exist
    # fewer files than `spread`: the first pass's per-file cap is topped up from the files opened
    few = store.sample_features(str(tmp_path), wanted, limit=30, seed=0, spread=100)
    assert few.num_rows == 30 and set(few.column("image_id").to_pylist()) <= set(wanted.to_pylist())
    one_file = pa.array([f"img03-{i}" for i in range(20)])
    assert store.sample_features(str(tmp_path), one_file, limit=15, seed=1).num_rows == 15


@pytest.mark.integration
def test_the_calibration_sample_reads_from_an_object_store(s3_bucket):
    import pyarrow as pa

    from tagray.features import store

    endpoint, bucket = s3_bucket
    out = f"s3://{bucket}/features"
    for f in range(3):
        ids = [f"img{f}-{i}" for i in range(10)]
        store.write_shard(store.feature_table(ids, np.full((10, 2), f, np.float32), 2, {"name": "x", "dim": 2}), out,
                          store.shard_name(ids), endpoint)
    sample = store.sample_features(out, pa.array(["img0-1", "img2-3", "img2-4"]), limit=10, endpoint_url=endpoint)
    rows = dict(zip(sample.column("image_id").to_pylist(), sample.column("feature").to_pylist(), strict=True))
    assert rows == {"img0-1": [0.0, 0.0], "img2-3": [2.0, 2.0], "img2-4": [2.0, 2.0]}
