from __future__ import annotations

import pyarrow as pa
import pytest

from tagray.config import ConfigError
from tagray.data.split import SplitConfig, assign_splits, split_sizes
from tagray.data.synth import SynthConfig, generate


@pytest.fixture(scope="module")
def manifest():
    return generate(SynthConfig(images=6000, seed=4), "/x").manifest


def test_no_user_in_two_splits_and_shares_close(manifest):
    out = assign_splits(manifest, SplitConfig(train=0.7, val=0.1, test=0.2))
    pairs = set(zip(out.column("user_id").to_pylist(), out.column("split").to_pylist(), strict=True))
    users = [u for u, _ in pairs]
    assert len(users) == len(set(users))
    sizes = split_sizes(out)
    n = manifest.num_rows
    for name, share in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        assert abs(sizes[name]["images"] / n - share) < 0.05, sizes


def test_seeded(manifest):
    a = assign_splits(manifest, SplitConfig(seed=1)).column("split")
    b = assign_splits(manifest, SplitConfig(seed=1)).column("split")
    c = assign_splits(manifest, SplitConfig(seed=2)).column("split")
    assert a.equals(b) and not a.equals(c)


def test_too_few_users_is_a_clear_error():
    one_user = pa.table({
        "image_id": ["a", "b"], "user_id": ["u", "u"], "uri": ["a", "b"],
        "tags": pa.array([[], []], pa.list_(pa.string())),
    })
    with pytest.raises(ConfigError, match=r"split 'val' is empty: 1 user\(s\)"):
        assign_splits(one_user, SplitConfig())
    out = assign_splits(one_user, SplitConfig(train=1.0, val=0.0, test=0.0))
    assert out.column("split").to_pylist() == ["train", "train"]
