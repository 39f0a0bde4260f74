"""Ray Data input of the head trainers: feature shards joined with the training targets.

Features are read where they are (local or s3://), one Parquet row group at a time, by a
small actor pool that holds the split's targets (image_id → tag ids) and attaches them,
dropping images of other splits. Tag ids travel padded to a fixed width so batches stay plain arrays; the trainer
makes them multi-hot per minibatch.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tagray.data import storage
from tagray.features import store
from tagray.heads.targets import padded_ids


class ReadWithTargets:
    """Ray Data callable class: reads feature row groups and keeps the images in `targets`
    (one split) with their tag ids. The image_id → row index is built once per actor."""

    def __init__(self, targets_ref, width: int, endpoint_url: str | None) -> None:
        import pandas as pd
        import ray

        targets: pa.Table = ray.get(targets_ref[0])
        self.index = pd.Index(targets.column("image_id").to_numpy(zero_copy_only=False))
        self.ids = padded_ids(targets.column("tag_ids"), width)
        self.endpoint_url = endpoint_url

    def __call__(self, pieces: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        xs, ids = [], []
        for uri, group in zip(pieces["uri"], pieces["row_group"], strict=True):
            fs, path = storage.filesystem_for(str(uri), self.endpoint_url)
            with fs.open_input_file(path) as f:
                table = pq.ParquetFile(f).read_row_group(int(group), columns=["image_id", "feature"])
            rows = self.index.get_indexer(table.column("image_id").to_numpy(zero_copy_only=False))
            keep = rows >= 0
            flat = table.column("feature").combine_chunks()
            x = flat.flatten().to_numpy(zero_copy_only=False).reshape(-1, flat.type.list_size)[keep]
            xs.append(x.astype(np.float32, copy=False))
            ids.append(self.ids[rows[keep]])
        return {"feature": np.concatenate(xs), "tag_ids": np.concatenate(ids)}


def row_groups(files: list[str], endpoint_url: str | None = None) -> list[dict]:
    """(file, row group) pieces of the feature files: the units Ray Data reads in parallel."""
    pieces = []
    for uri in files:
        fs, path = storage.filesystem_for(uri, endpoint_url)
        with fs.open_input_file(path) as f:
            n = pq.ParquetFile(f).metadata.num_row_groups
        pieces.extend({"uri": uri, "row_group": g} for g in range(n))
    return pieces


def training_dataset(
    features_uri: str, targets: pa.Table, width: int, data_cpus: float, readers: int = 1, endpoint_url: str | None = None
):
    """A Ray Dataset of the images in `targets` that have features: feature (D,), tag_ids (width,).

    Built from the files' row groups with a reading actor pool rather than read_parquet, so
    every stage's CPU share is `data_cpus` (training workers keep the rest of the node)."""
    import ray

    files = store.feature_files(features_uri, endpoint_url)
    if not files:
        raise FileNotFoundError(store.missing_message(features_uri))
    ref = [ray.put(targets.select(["image_id", "tag_ids"]))]
    return ray.data.from_items(row_groups(files, endpoint_url)).map_batches(
        ReadWithTargets,
        fn_constructor_kwargs={"targets_ref": ref, "width": width, "endpoint_url": endpoint_url},
        batch_size=1,
        num_cpus=data_cpus,
        compute=ray.data.ActorPoolStrategy(size=readers),
    )


def epoch_batches(shard, per_worker: int, seed: int, epoch: int, rank: int):
    """One epoch of a worker's dataset shard: numpy batches of `per_worker` rows, locally
    shuffled with a seed of (seed, epoch, rank), the last partial batch dropped (every worker
    takes the same number of steps)."""
    return shard.iter_batches(
        batch_size=per_worker, batch_format="numpy", drop_last=True,
        local_shuffle_buffer_size=8 * per_worker, local_shuffle_seed=seed + 1000 * epoch + rank,
    )


def count_with_features(targets: pa.Table, feature_ids: pa.Array) -> int:
    return int(pc.sum(pc.is_in(targets.column("image_id"), value_set=feature_ids)).as_py() or 0)
