"""The embed head's user-tag calibration fitted on a manifest split: a seeded sample of its tagged
images (`store.sample_features`: only the feature files the sample needs are opened), their user
tags, and per-tag Platt scaling of h(x)·v_t (`embedding.calibrate_user_tags`). Run at the end of
`tagray train --head embed` (the val split) and by `tagray calibrate` on an embed model."""

from __future__ import annotations

import logging
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from tagray.features import store
from tagray.heads.embedding import TagMLP, calibrate_user_tags
from tagray.heads.fit import align
from tagray.heads.targets import padded_ids

log = logging.getLogger(__name__)


def fit_on_split(mlp: TagMLP, tag_vectors: torch.Tensor, targets: pa.Table, features_uri: str, split: str,
                 limit: int, seed: int, width: int, endpoint_url: str | None = None,
                 ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, dict]:
    """((a, b), how) fitted on up to `limit` tagged images of `split` (`targets`: build_targets of
    the manifest), or (None, why not) when the split has no tagged image with features."""
    part = targets.filter(pc.and_(pc.equal(targets.column("split"), split),
                                  pc.greater(pc.list_value_length(targets.column("tag_ids")), 0)))
    found = np.zeros(0, np.int64)
    if part.num_rows:
        features = store.sample_features(features_uri, part.column("image_id"), limit, seed, endpoint_url=endpoint_url)
        if features.num_rows:
            part = part.filter(pc.is_in(part.column("image_id"), value_set=features.column("image_id")))
            x, found = align(features, part.column("image_id"))
    if not len(found):
        return None, {"method": None, "reason": f"no tagged {split} images with features"}
    t0 = time.perf_counter()
    scale, offset = calibrate_user_tags(mlp, tag_vectors, x,
                                        padded_ids(part.column("tag_ids").take(pa.array(found)), width))
    return (scale, offset), {"method": "platt", "split": split, "images": len(found),
                             "tags_with_scale_0": int((scale == 0).sum()), "seconds": round(time.perf_counter() - t0, 3)}
