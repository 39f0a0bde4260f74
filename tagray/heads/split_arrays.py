"""What the neighbourhood heads (seeds 002, 003) train and evaluate on: one split's features,
targets and neighbours as in-memory arrays.

Neighbourhood models look up other images' features at every step (seed 003: the sampled
neighbours; seed 002: the candidates of Algorithm 1), so a split's features are one (N, D)
float32 array that the driver puts in Ray's object store once; the workers on a node read it
zero-copy. At 1M images × 512 floats that is 2 GiB of shared memory per node.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tagray.data import schema
from tagray.data.jaccard import indicator_matrix, jaccard_neighbors, metadata_vocabulary
from tagray.data.jaccard_lsh import jaccard_neighbors_lsh
from tagray.data.normalize import TagNormalizer, Vocabulary
from tagray.features import store
from tagray.heads.fit import align
from tagray.heads.neighborhood import NeighborsConfig
from tagray.heads.targets import build_targets, multi_hot, padded_ids, prepare_vocabulary

log = logging.getLogger(__name__)


@dataclass
class SplitArrays:
    """One split's images that have features, in manifest order."""

    split: str
    rows: np.ndarray  # (N,) rows of the manifest / targets table
    image_ids: np.ndarray  # (N,) str
    x: np.ndarray  # (N, D) float32 features
    tag_ids: np.ndarray  # (N, W) int32 user-tag ids, −1 padded
    label_ids: np.ndarray  # (N, W') int32 ground-truth label ids, −1 padded
    labelled: np.ndarray  # (N,) bool

    def __len__(self) -> int:
        return len(self.x)

    def targets(self, kind: str) -> np.ndarray:
        """The ids a head learns from: user tags, or ground-truth labels."""
        return self.tag_ids if kind == "tags" else self.label_ids


def truth_of(part: SplitArrays, tags: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(rows, columns, 0/1 truth (rows × columns), kind): labelled images × label tags when the
    split has labels, else every image × every tag with its user tags."""
    if part.labelled.any():
        rows = np.nonzero(part.labelled)[0]
        labels = multi_hot(part.label_ids[rows], tags).numpy()
        cols = np.nonzero(labels.any(0))[0]
        if len(cols):
            return rows, cols, labels[:, cols], "labels"
    rows = np.arange(len(part))
    return rows, np.arange(tags), multi_hot(part.tag_ids, tags).numpy(), "tags"


def split_arrays(targets: pa.Table, features: pa.Table, split: str, width: int = 64) -> SplitArrays:
    """The split's rows of `targets` (build_targets) that have features; SchemaError if none."""
    rows = np.nonzero(pc.equal(targets.column("split"), split).to_numpy(zero_copy_only=False))[0]
    if len(rows) == 0:
        raise schema.SchemaError(f"the manifest's {split} split is empty: run `tagray split` first, or check its split column")
    part = targets.take(pa.array(rows))
    x, found = align(features, part.column("image_id"))
    if len(found) == 0:
        raise schema.SchemaError(f"none of the {len(rows)} images of the {split} split has features: featurize them first")
    part = part.take(pa.array(found))
    return SplitArrays(
        split=split,
        rows=rows[found],
        image_ids=part.column("image_id").to_numpy(zero_copy_only=False),
        x=x.numpy(),
        tag_ids=padded_ids(part.column("tag_ids"), width),
        label_ids=padded_ids(part.column("label_ids"), width),
        labelled=part.column("labelled").to_numpy(zero_copy_only=False),
    )


def metadata_lists(manifest: pa.Table, metadata: str, normalizer: TagNormalizer) -> pa.ListArray:
    """Each image's metadata set: normalised tags, or the manifest's `sets` / `groups`."""
    if metadata == "tags":
        return normalizer.normalize_lists(manifest.column("tags"))
    if metadata not in manifest.column_names:
        raise schema.SchemaError(
            f"the manifest has no {metadata!r} column: neighbourhoods by {metadata} need it (or use metadata=tags)")
    column = manifest.column(metadata).combine_chunks()
    return pc.if_else(pc.is_null(column), pa.scalar([], column.type), column)


def metadata_neighbors(
    lists: pa.ListArray, split: pa.ChunkedArray | pa.Array, parts: list[SplitArrays], cfg: NeighborsConfig,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """The M = `cfg.max_rank` nearest images of every image by Jaccard distance on its metadata
    `cfg.metadata` (`lists`, one per manifest row; `split` the manifest's split column), among
    the images of its own split (seed 003 §3.1): {split: (N, M) rows into that split}. Tags use
    the τ most frequent normalised tags of the train split; sets and groups their whole
    vocabulary within the split (new sets at test time are the point of seed 003 §5.2). Search
    by `cfg.search`: the inverted index (`jaccard_neighbors`, exact unless `max_posting`) or
    MinHash LSH (`jaccard_neighbors_lsh`, approximate)."""
    metadata, max_rank, lsh = cfg.metadata, cfg.max_rank, cfg.lsh_settings()
    train_rows = np.nonzero(pc.equal(split, "train").to_numpy(zero_copy_only=False))[0]
    shared_vocab = metadata_vocabulary(lists.take(pa.array(train_rows)), cfg.tau) if metadata == "tags" else None
    out = {}
    for part in parts:
        mine = lists.take(pa.array(part.rows))
        vocab = shared_vocab if shared_vocab is not None else metadata_vocabulary(mine)
        a = indicator_matrix(mine, vocab)
        if lsh is not None:
            nn, _ = jaccard_neighbors_lsh(a, max_rank, **lsh, progress=progress)
        else:
            nn, _ = jaccard_neighbors(a, max_rank, progress=progress, max_posting=cfg.max_posting)
        found = (nn >= 0).sum(1)
        log.info("%s split: %d images, Jaccard neighbours by %s (%d values, %s): mean %.2f of M=%d, %.1f%% with none",
                 part.split, len(part), metadata, len(vocab), "MinHash LSH" if lsh else "inverted index",
                 found.mean(), max_rank, 100 * (found == 0).mean())
        out[part.split] = nn
    return out


class SplitsData:
    """The manifest, the train split's vocabulary and the train / val / test splits' arrays, read
    once into the driver's memory; `shared()` is what goes into the object store for the loops."""

    def __init__(self, manifest_uri: str, features_uri: str, normalizer: TagNormalizer, endpoint_url: str | None = None,
                 splits: tuple[str, ...] = ("train", "val", "test"), vocab: Vocabulary | None = None) -> None:
        self.manifest = schema.read_manifest(manifest_uri, need=("split",), endpoint_url=endpoint_url)
        self.vocab: Vocabulary = vocab or prepare_vocabulary(self.manifest, normalizer)
        targets = build_targets(self.manifest, normalizer, self.vocab)
        features, self.identity = store.read_features(features_uri, endpoint_url)
        schema.validate_features(features.schema, features_uri)
        self.parts = {s: split_arrays(targets, features, s) for s in splits}
        train = targets.filter(pc.equal(targets.column("split"), "train"))
        self.counts = np.bincount(pc.list_flatten(train.column("tag_ids")).to_numpy(), minlength=len(self.vocab))

    @property
    def tags(self) -> int:
        return len(self.vocab)

    def validation(self, split: str = "val") -> dict:
        """A split's features and its truth (rows, columns, 0/1) for the loops' validation mAP."""
        part = self.parts[split]
        rows, cols, truth, _ = truth_of(part, self.tags)
        return {"x": part.x, "rows": rows, "cols": cols, "truth": truth}
