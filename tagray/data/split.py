"""Train / val / test splits by user (seed 001 §5): no user's images in two splits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tagray.config import ConfigError
from tagray.data.schema import SPLITS


@dataclass(frozen=True)
class SplitConfig:
    train: float = 0.8  # share of images (whole users) in the training split
    val: float = 0.1  # share in validation (tuning, early stopping)
    test: float = 0.1  # share in test
    seed: int = 0  # order in which users are dealt out

    def __post_init__(self) -> None:
        fractions = (self.train, self.val, self.test)
        if not all(f >= 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):  # NaN fails too
            raise ConfigError(f"split fractions train/val/test must be ≥ 0 and sum to 1, got {fractions}")


def assign_splits(manifest: pa.Table, cfg: SplitConfig) -> pa.Table:
    """`manifest` with a `split` column. Users are shuffled (seeded) and dealt out whole
    until each split holds its share of images; a split asked for but left empty is an error."""
    users = manifest.column("user_id").combine_chunks()
    encoded = pc.dictionary_encode(users)
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    n_users = len(encoded.dictionary)
    sizes = np.bincount(codes, minlength=n_users)
    order = np.random.default_rng(cfg.seed).permutation(n_users)
    # Cumulative share of images at the middle of each user's block decides their split.
    ends = np.cumsum(sizes[order])
    mid = (ends - sizes[order] / 2) / ends[-1]
    bounds = np.cumsum([cfg.train, cfg.val])
    split_of_user = np.empty(n_users, dtype=np.int64)
    split_of_user[order] = np.searchsorted(bounds, mid, side="right")
    names = np.array(SPLITS)
    split = names[split_of_user[codes]]
    for i, name in enumerate(SPLITS):
        if getattr(cfg, name) > 0 and not (split_of_user == i).any():
            raise ConfigError(
                f"split '{name}' is empty: {n_users} user(s) cannot fill train/val/test = "
                f"{cfg.train}/{cfg.val}/{cfg.test}; add images from more users or set {name}=0"
            )
    if "split" in manifest.column_names:
        manifest = manifest.drop_columns(["split"])
    return manifest.append_column("split", pa.array(split, pa.string()))


def split_sizes(manifest: pa.Table) -> dict[str, dict[str, int]]:
    """Images and users per split."""
    out = {}
    for name in SPLITS:
        part = manifest.filter(pc.equal(manifest.column("split"), name))
        out[name] = {"images": part.num_rows, "users": len(pc.unique(part.column("user_id")))}
    return out
