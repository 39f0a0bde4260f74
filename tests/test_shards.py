"""The embedding shard server (seed 004 §3.2) on a local Ray: sharded updates from two
concurrent workers equal a dense single-process reference; snapshots round-trip through S3."""

from __future__ import annotations

import numpy as np
import pytest

from tagray.heads.word_table import WordTable
from tagray.train.shards import ShardedWordTable, read_snapshot

WORDS, DIM = 101, 8  # not a multiple of the shard count: shards hold unequal row counts


def _updates(seed: int, steps: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, WORDS, 40), rng.normal(size=(40, DIM)).astype(np.float32)) for _ in range(steps)]


def _worker(names: list[str], updates) -> int:
    """A stand-in for a training worker: pull the rows it will update, push gradients."""
    table = ShardedWordTable.connect(names, WORDS, DIM)
    for ids, grads in updates:
        assert table.pull(ids).shape == (len(ids), DIM)
        table.push(ids, grads)
    return len(updates)


@pytest.mark.integration
def test_two_shards_two_workers_match_a_dense_reference(ray_local):
    ray = ray_local
    init = np.random.default_rng(0).normal(size=(WORDS, DIM)).astype(np.float32)
    sharded = ShardedWordTable.create(init, shards=2, optimizer="sgd", lr=0.05, num_cpus=0)
    try:
        np.testing.assert_array_equal(sharded.pull(np.arange(WORDS)), init)
        work = [_updates(1, 10), _updates(2, 10)]
        task = ray.remote(num_cpus=0.5)(_worker)
        assert ray.get([task.remote(sharded.names, w) for w in work]) == [10, 10]  # concurrently
        dense = WordTable(init, "sgd", lr=0.05)
        for ids, grads in work[0] + work[1]:
            dense.push(ids, grads)
        # SGD updates commute: whatever order the shards applied them in, the result is the same
        # (up to float rounding of the sums).
        np.testing.assert_allclose(sharded.gather(), dense.pull(np.arange(WORDS)), rtol=1e-5, atol=1e-5)
        stats = sharded.stats()
        assert sum(s["rows"] for s in stats) == WORDS and {s["rows"] for s in stats} == {50, 51}
        assert sum(s["rows_pushed"] for s in stats) == 2 * 10 * 40
    finally:
        sharded.kill()


@pytest.mark.integration
def test_adagrad_shards_match_dense_adagrad(ray_local):
    init = np.random.default_rng(3).normal(size=(WORDS, DIM)).astype(np.float32)
    sharded = ShardedWordTable.create(init, shards=3, optimizer="adagrad", lr=0.1, num_cpus=0)
    dense = WordTable(init, "adagrad", lr=0.1)
    try:
        for ids, grads in _updates(4, 8):
            sharded.push(ids, grads)
            dense.push(ids, grads)
        np.testing.assert_allclose(sharded.pull(np.arange(WORDS)), dense.pull(np.arange(WORDS)), rtol=1e-6, atol=1e-6)
    finally:
        sharded.kill()


@pytest.mark.integration
def test_snapshot_restore_round_trip_on_s3(ray_local, s3_bucket):
    endpoint, bucket = s3_bucket
    init = np.random.default_rng(5).normal(size=(WORDS, DIM)).astype(np.float32)
    sharded = ShardedWordTable.create(init, shards=2, optimizer="adagrad", lr=0.1, num_cpus=0, endpoint_url=endpoint)
    try:
        for ids, grads in _updates(6, 3):
            sharded.push(ids, grads)
        saved = sharded.gather()
        uri = sharded.snapshot(f"s3://{bucket}/run/word_shards/step-000000003", endpoint)
        assert np.array_equal(read_snapshot(uri, 2, WORDS, endpoint), saved)
        later = _updates(7, 3)
        for ids, grads in later:
            sharded.push(ids, grads)
        assert not np.allclose(sharded.gather(), saved)
        sharded.restore(uri)
        np.testing.assert_array_equal(sharded.gather(), saved)
        # The optimiser state came back too: the same pushes give the same vectors again.
        for ids, grads in later:
            sharded.push(ids, grads)
        again = sharded.gather()
        sharded.restore(uri)
        for ids, grads in later:
            sharded.push(ids, grads)
        np.testing.assert_array_equal(sharded.gather(), again)
        with pytest.raises(Exception, match="no such file"):
            sharded.restore(f"s3://{bucket}/run/word_shards/missing")
    finally:
        sharded.kill()


@pytest.mark.integration
def test_pretrained_vectors_read_from_s3_are_normalised_like_tags(s3_bucket):
    from tagray.data import storage
    from tagray.data.normalize import NormalizerConfig, TagNormalizer
    from tagray.data.word_vectors import read_word_vectors, word_table_init

    endpoint, bucket = s3_bucket
    uri = f"s3://{bucket}/glove/vectors.txt"
    storage.write_text(uri, "4 3\nBeaches 1 0 0\nbeach 9 9 9\nsea_shore 0 1 0\n2012 0 0 1\n", endpoint)  # word2vec header
    normalizer = TagNormalizer(NormalizerConfig())
    words, vectors = read_word_vectors(uri, normalizer, endpoint_url=endpoint)
    assert words == ["beach", "sea shore"]  # plural merged (first wins), phrase joined, year dropped
    np.testing.assert_array_equal(vectors, [[1, 0, 0], [0, 1, 0]])
    all_words, init, pretrained = word_table_init(("sunset", "beach"), (words, vectors), 3, 0.1)
    assert all_words == ["sunset", "beach", "sea shore"]  # training tags first, then untagged words
    assert pretrained.tolist() == [False, True, True]
    np.testing.assert_array_equal(init[1], [1, 0, 0])
