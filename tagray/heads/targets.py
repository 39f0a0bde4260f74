"""Targets of the heads: a manifest's normalised tags (y) and labels (z) as vocabulary ids.

Kept sparse (one list of ids per image) until a minibatch is densified, so a corpus of
millions of images × thousands of tags never exists as a dense matrix.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from tagray.data import schema
from tagray.data.normalize import TagNormalizer, Vocabulary, lookup_coo
from tagray.heads.recipe import shared_tensor

TARGETS_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("split", pa.string()),
        ("tag_ids", pa.list_(pa.int32())),  # in-vocabulary normalised user tags (y = 1)
        ("label_ids", pa.list_(pa.int32())),  # in-vocabulary ground-truth labels (z = 1)
        ("labelled", pa.bool_()),  # the image carries ground-truth labels (may be an empty list)
    ]
)


PAD = -1


def padded_ids(lists: pa.Array | pa.ChunkedArray, width: int) -> np.ndarray:
    """(N, width) int32 of each list's ids, padded with −1 (lists are cut at `width`)."""
    arr = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    n = len(arr)
    out = np.full((n, width), PAD, dtype=np.int32)
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy()
    lengths = np.minimum(np.diff(offsets), width)
    rows = np.repeat(np.arange(n), lengths)
    pos = np.arange(len(rows)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[rows, pos] = values[np.repeat(offsets[:-1], lengths) + pos]
    return out


def multi_hot(tag_ids, tags: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, W) ids padded with −1 (numpy or torch) → (B, tags) 0/1: the one densifier of
    sparse targets (y or z of a minibatch), on the ids' device."""
    ids = shared_tensor(np.asarray(tag_ids) if not isinstance(tag_ids, torch.Tensor) else tag_ids)
    y = torch.zeros(ids.shape[0], tags + 1, dtype=dtype, device=ids.device)
    y.scatter_(1, torch.where(ids >= 0, ids, tags).long(), 1.0)
    return y[:, :tags]


def _id_lists(rows: np.ndarray, cols: np.ndarray, n: int) -> pa.ListArray:
    order = np.lexsort((cols, rows))
    rows, cols = rows[order], cols[order]
    keep = np.r_[True, (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])] if len(rows) else np.zeros(0, bool)
    rows, cols = rows[keep], cols[keep]
    offsets = np.searchsorted(rows, np.arange(n + 1)).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(cols.astype(np.int32)))


def build_targets(manifest: pa.Table, normalizer: TagNormalizer, vocab: Vocabulary) -> pa.Table:
    """One row per image: its tag ids and (where the manifest has labels) label ids.

    Labels go through the same normaliser as tags, so the label `cars` is the tag `car`.
    """
    n = manifest.num_rows
    tag_lists = _id_lists(*vocab.to_coo(normalizer.normalize_lists(manifest.column("tags"))), n)
    if "labels" in manifest.column_names:
        raw = manifest.column("labels").combine_chunks()
        labelled = pc.invert(pc.is_null(raw))
        every_label = TagNormalizer(dataclasses.replace(normalizer.cfg, max_tags=10_000))  # labels are not cut at 20
        label_lists = _id_lists(*lookup_coo(every_label.normalize_lists(raw), vocab.tags), n)
    else:
        labelled = pa.array(np.zeros(n, bool))
        label_lists = _id_lists(np.zeros(0, np.int64), np.zeros(0, np.int64), n)
    split = manifest.column("split") if "split" in manifest.column_names else pa.nulls(n, pa.string())
    return pa.table(
        {
            "image_id": manifest.column("image_id"),
            "split": split,
            "tag_ids": tag_lists,
            "label_ids": label_lists,
            "labelled": labelled,
        },
        schema=TARGETS_SCHEMA,
    )


def label_vocabulary(targets: pa.Table, tags: int) -> np.ndarray:
    """Indices of the tags that occur as a ground-truth label somewhere (the annotation tags)."""
    flat = pc.list_flatten(targets.column("label_ids")).to_numpy()
    return np.unique(flat).astype(np.int64) if len(flat) else np.zeros(0, np.int64)


def dense(lists: pa.Array | pa.ChunkedArray, tags: int) -> torch.Tensor:
    """A multi-hot (N, T) float32 tensor from lists of ids."""
    arr = lists.combine_chunks() if isinstance(lists, pa.ChunkedArray) else lists
    n = len(arr)
    out = torch.zeros(n, tags)
    rows = pc.list_parent_indices(arr).to_numpy()
    cols = pc.list_flatten(arr).to_numpy()
    if len(cols):
        out[torch.from_numpy(rows.astype(np.int64)), torch.from_numpy(cols.astype(np.int64))] = 1.0
    return out


def prepare_vocabulary(manifest, normalizer: TagNormalizer) -> Vocabulary:
    """The vocabulary of the training split's normalised tags."""
    train = manifest.filter(pc.equal(manifest.column("split"), "train"))
    if train.num_rows == 0:
        raise schema.SchemaError("the manifest's train split is empty: run `tagray split` first, or check its split column")
    try:
        return Vocabulary.build(normalizer.normalize_lists(train.column("tags")), normalizer)
    except schema.SchemaError:
        raise
    except ValueError as e:  # "empty vocabulary: …": the data's fault, a one-line user error
        raise schema.SchemaError(f"{e} of the {train.num_rows} training images; lower min_images in the "
                                 "normalizer config (normalizer: …) or train on more images") from e
