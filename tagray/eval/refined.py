"""Refined tags (seed 002's tag refinement): a refine model's scores for a split's images,
the top-k tags of each with their probabilities, next to the user's own tags."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from tagray.data import schema
from tagray.eval.inputs import load_inputs
from tagray.heads.artifact import head_kind
from tagray.heads.fit import align

REFINED_SCHEMA = pa.schema([("image_id", pa.string()), ("tags", pa.list_(pa.string())),
                            ("scores", pa.list_(pa.float32())), ("user_tags", pa.list_(pa.string()))])


def write_refined(model_dir: str, manifest_uri: str, features_uri: str, out: str, split: str = "train",
                  top_k: int = 10, endpoint_url: str | None = None) -> int:
    """Writes `out` (REFINED_SCHEMA) for the split's images that have features; returns their number."""
    from tagray.heads.refine import refine_scores

    if top_k < 1:
        raise schema.SchemaError(f"--top-k must be ≥ 1, got {top_k}")
    kind = head_kind(model_dir, endpoint_url)
    if kind != "refine":
        raise schema.SchemaError(f"{model_dir}: a {kind!r} head; `tagray refine` needs a refine head "
                                 "(tagray train --head refine)")
    inputs = load_inputs(model_dir, manifest_uri, features_uri, endpoint_url)
    part = inputs.targets.filter(pc.equal(inputs.targets.column("split"), split))
    if part.num_rows == 0:
        raise schema.SchemaError(f"{manifest_uri}: the {split} split is empty")
    x, found = align(inputs.features, part.column("image_id"))
    if len(found) == 0:
        raise schema.SchemaError(f"none of the {part.num_rows} {split} images has features in {features_uri}")
    part = part.take(pa.array(found))
    scores = refine_scores(inputs.head.model, x)
    k = min(top_k, scores.shape[1])
    top = torch.topk(scores, k, dim=1)
    names = np.asarray(inputs.head.vocab.tags, dtype=object)
    offsets = pa.array(np.arange(0, k * len(x) + 1, k, dtype=np.int32))
    user = part.column("tag_ids").combine_chunks()
    table = pa.table({
        "image_id": part.column("image_id"),
        "tags": pa.ListArray.from_arrays(offsets, pa.array(names[top.indices.numpy().ravel()], pa.string())),
        "scores": pa.ListArray.from_arrays(offsets, pa.array(top.values.numpy().ravel(), pa.float32())),
        "user_tags": pa.ListArray.from_arrays(user.offsets, pa.array(names[user.values.to_numpy()], pa.string())),
    }, schema=REFINED_SCHEMA)
    schema.write_table(table, out, endpoint_url)
    return len(x)
