"""What calibrate and evaluate read: a saved head, its normaliser, a manifest's targets, features."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from tagray.data import schema
from tagray.data.normalize import TagNormalizer
from tagray.features import store
from tagray.heads.artifact import SavedHead
from tagray.heads.embed_artifact import SavedEmbedHead
from tagray.heads.models import load_model
from tagray.heads.targets import build_targets


@dataclass
class Inputs:
    head: SavedHead | SavedEmbedHead
    normalizer: TagNormalizer
    targets: pa.Table  # build_targets() of the whole manifest
    features: pa.Table  # image_id, feature


def load_inputs(model_dir: str, manifest_uri: str, features_uri: str, endpoint_url: str | None = None,
                head: SavedHead | SavedEmbedHead | None = None) -> Inputs:
    """Loads the head (unless the caller has: `head`) with the normaliser it was saved with, and
    refuses features of a backbone other than the one it was trained on."""
    head = head if head is not None else load_model(model_dir, endpoint_url)
    normalizer = TagNormalizer.from_identity(head.vocab.normalizer)
    features, identity = store.read_features(features_uri, endpoint_url)
    store.require_same(identity, head.backbone, features_uri, model_dir)
    schema.validate_features(features.schema, features_uri)
    manifest = schema.read_manifest(manifest_uri, need=("split",), endpoint_url=endpoint_url)
    return Inputs(head, normalizer, build_targets(manifest, normalizer, head.vocab), features)
