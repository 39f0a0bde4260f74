"""A trained network head on disk — the neighbourhood model (seed 003) and the refinement
network (seed 002) — in a local directory or s3:// prefix:

    weights.safetensors   the network's state
    model.json            head, dim, tags, the head's config, the features' backbone identity
    normalizer.json, vocabulary.json, metrics.json   as the linear heads
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tagray import jsonio
from tagray.config import from_dict, to_dict
from tagray.data import schema, storage
from tagray.data.normalize import TagNormalizer, Vocabulary
from tagray.heads.artifact import (
    METRICS_FILE,
    MODEL_FILE,
    WEIGHTS_FILE,
    finite_state,
    head_kind,
    read_weights,
    write_weights,
)
from tagray.heads.standardize import as_saved

NET_HEADS = ("neighbors", "refine")


def _builder(kind: str) -> tuple[type, Any]:
    """head → (config class, network constructor (dim, tags, cfg))."""
    if kind == "neighbors":
        from tagray.heads.neighborhood import NeighborhoodNet, NeighborsConfig

        return NeighborsConfig, lambda dim, tags, c: NeighborhoodNet(dim, tags, c.hidden, c.dropout)
    from tagray.heads.refine import RefineConfig, RefineNet

    return RefineConfig, lambda dim, tags, c: RefineNet(dim, tags, c.hidden, c.dropout)


@dataclass
class SavedNetHead:
    model: torch.nn.Module  # NeighborhoodNet or RefineNet, in eval mode
    vocab: Vocabulary
    config: Any  # NeighborsConfig or RefineConfig
    backbone: dict | None
    positives: np.ndarray  # training images carrying each tag
    metrics: dict = field(default_factory=dict)
    calibrated: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # never: these heads are not calibrated


def save_net_head(head: SavedNetHead, directory: str, endpoint_url: str | None = None) -> str:
    finite_state(head.model.state_dict(), storage.join(directory, WEIGHTS_FILE))  # before anything is written
    storage.makedirs(directory, endpoint_url)
    write_weights(head.model.state_dict(), storage.join(directory, WEIGHTS_FILE), endpoint_url)
    meta = {"head": head.config.head, "dim": head.model.dim, "tags": head.model.tags, "config": to_dict(head.config),
            "backbone": head.backbone, "vocabulary_version": head.vocab.version,
            "positives": [int(c) for c in head.positives]}
    storage.write_text(storage.join(directory, MODEL_FILE), jsonio.dumps(meta, MODEL_FILE, indent=1), endpoint_url)
    storage.write_text(storage.join(directory, METRICS_FILE), jsonio.dumps(head.metrics, METRICS_FILE, indent=1, default=str), endpoint_url)
    head.vocab.save(directory, endpoint_url)
    return directory


def load_net_head(directory: str, normalizer: TagNormalizer | None = None, endpoint_url: str | None = None) -> SavedNetHead:
    kind = head_kind(directory, endpoint_url)
    if kind not in NET_HEADS:
        raise schema.SchemaError(f"{directory}: a {kind!r} head; this needs one of {', '.join(NET_HEADS)}")
    meta = json.loads(storage.read_text(storage.join(directory, MODEL_FILE), endpoint_url))
    config_cls, build = _builder(kind)
    cfg = from_dict(config_cls, meta["config"], f"{directory}/{MODEL_FILE}")
    vocab = Vocabulary.load(directory, normalizer, endpoint_url)
    if vocab.version != meta["vocabulary_version"] or len(vocab) != meta["tags"]:
        raise schema.SchemaError(f"{directory}: vocabulary.json does not belong to these weights")
    model = build(meta["dim"], meta["tags"], cfg)
    state = read_weights(storage.join(directory, WEIGHTS_FILE), endpoint_url)
    if kind == "neighbors":
        cfg = as_saved(cfg, state, meta["config"])
    model.load_state_dict(state)
    model.eval()
    metrics_uri = storage.join(directory, METRICS_FILE)
    metrics = json.loads(storage.read_text(metrics_uri, endpoint_url)) if storage.exists(metrics_uri, endpoint_url) else {}
    return SavedNetHead(model, vocab, cfg, meta.get("backbone"), np.asarray(meta.get("positives", []), np.int64),
                        metrics, np.zeros(meta["tags"], bool))
