"""A trained linear head on disk (local directory or s3:// prefix):

    weights.safetensors   linear.weight (T×D), linear.bias, EM statistics, β, steps
    tags.parquet          tag, pi, gamma, beta, calibrated, positives (training images tagged)
    model.json            head, dim, tags, the HeadConfig, the features' backbone identity
    normalizer.json       the tag normaliser's settings (loading with another one is an error)
    vocabulary.json       the tags, in column order
    metrics.json          training (and calibration) metrics
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from tagray import jsonio
from tagray.config import from_dict, to_dict
from tagray.data import schema, storage
from tagray.data.normalize import TagNormalizer, Vocabulary
from tagray.heads.fit import HEADS, HeadConfig
from tagray.heads.linear import LinearTagger
from tagray.jsonio import NonFiniteError

WEIGHTS_FILE = "weights.safetensors"
TAGS_FILE = "tags.parquet"
MODEL_FILE = "model.json"
METRICS_FILE = "metrics.json"


@dataclass
class SavedHead:
    model: LinearTagger
    vocab: Vocabulary
    config: HeadConfig
    backbone: dict | None  # identity of the features it was trained on
    positives: np.ndarray  # training images carrying each tag
    calibrated: np.ndarray  # tags whose β was fitted on labelled images
    metrics: dict = field(default_factory=dict)


def finite_state(state: dict[str, torch.Tensor], uri: str) -> dict[str, torch.Tensor]:
    """`state`, or NonFiniteError naming `uri` and the first tensor holding NaN or ±inf: a model
    with such weights answers every request with NaN scores (no tags, null scores)."""
    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise NonFiniteError(f"{uri}: tensor {name!r} has {bad} non-finite value(s) (NaN or ±inf) of {t.numel()}; "
                                 "the model diverged: retrain it (lower lr)")
    return state


def write_weights(state: dict[str, torch.Tensor], uri: str, endpoint_url: str | None = None) -> None:
    """A state dict as safetensors at `uri`; refuses non-finite weights (`finite_state`)."""
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    storage.write_bytes(uri, st_save(finite_state(state, uri)), endpoint_url)


def read_weights(uri: str, endpoint_url: str | None = None) -> dict[str, torch.Tensor]:
    """The safetensors state dict at `uri`; NonFiniteError naming the file and the tensor when a
    weight is NaN or ±inf."""
    return finite_state(st_load(storage.read_bytes(uri, endpoint_url)), uri)


def save_head(head: SavedHead, directory: str, endpoint_url: str | None = None) -> str:
    m = head.model
    finite_state(m.state_dict(), storage.join(directory, WEIGHTS_FILE))  # before anything is written
    storage.makedirs(directory, endpoint_url)
    write_weights(m.state_dict(), storage.join(directory, WEIGHTS_FILE), endpoint_url)
    gamma = m.gamma()
    tags = pa.table(
        {
            "tag": pa.array(head.vocab.tags, pa.string()),
            "pi": m.pi().numpy().astype(np.float32),
            "gamma": (gamma if gamma is not None else torch.ones(m.tags)).numpy().astype(np.float32),
            "beta": m.beta.numpy().astype(np.float32),
            "calibrated": head.calibrated.astype(bool),
            "positives": head.positives.astype(np.int64),
        }
    )
    schema.write_table(tags, storage.join(directory, TAGS_FILE), endpoint_url)
    meta = {
        "head": head.config.head,
        "dim": m.dim,
        "tags": m.tags,
        "config": to_dict(head.config),
        "backbone": head.backbone,
        "vocabulary_version": head.vocab.version,
    }
    storage.write_text(storage.join(directory, MODEL_FILE), jsonio.dumps(meta, MODEL_FILE, indent=1), endpoint_url)
    storage.write_text(storage.join(directory, METRICS_FILE), jsonio.dumps(head.metrics, METRICS_FILE, indent=1, default=str), endpoint_url)
    head.vocab.save(directory, endpoint_url)
    return directory


def state_digest(module: torch.nn.Module) -> str:
    """sha256 prefix of a module's state (names and values): what an index built from its
    outputs belongs to."""
    import hashlib

    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def head_kind(directory: str, endpoint_url: str | None = None) -> str:
    """The `head` a model directory holds (lr, rlr, embed)."""
    if not storage.exists(storage.join(directory, MODEL_FILE), endpoint_url):
        raise FileNotFoundError(f"{directory}: not a tagray model (no {MODEL_FILE}); train one with `tagray train`")
    return json.loads(storage.read_text(storage.join(directory, MODEL_FILE), endpoint_url))["head"]


def load_head(
    directory: str, normalizer: TagNormalizer | None = None, endpoint_url: str | None = None
) -> SavedHead:
    """Reads a saved linear head; NormalizerMismatch when `normalizer` differs from the saved one."""
    kind = head_kind(directory, endpoint_url)
    if kind not in HEADS:
        raise schema.SchemaError(f"{directory}: a {kind!r} head; this needs a linear head ({', '.join(HEADS)})")
    meta = json.loads(storage.read_text(storage.join(directory, MODEL_FILE), endpoint_url))
    cfg = from_dict(HeadConfig, meta["config"], f"{directory}/{MODEL_FILE}")
    vocab = Vocabulary.load(directory, normalizer, endpoint_url)
    if vocab.version != meta["vocabulary_version"] or len(vocab) != meta["tags"]:
        raise schema.SchemaError(f"{directory}: vocabulary.json does not belong to these weights")
    model = LinearTagger(meta["dim"], meta["tags"], cfg.em() if cfg.robust else None)
    model.load_state_dict(read_weights(storage.join(directory, WEIGHTS_FILE), endpoint_url))
    model.eval()
    tags = schema.read_table(storage.join(directory, TAGS_FILE), endpoint_url=endpoint_url)
    metrics_uri = storage.join(directory, METRICS_FILE)
    metrics = json.loads(storage.read_text(metrics_uri, endpoint_url)) if storage.exists(metrics_uri, endpoint_url) else {}
    return SavedHead(
        model=model,
        vocab=vocab,
        config=cfg,
        backbone=meta.get("backbone"),
        positives=tags.column("positives").to_numpy(),
        calibrated=tags.column("calibrated").to_numpy(zero_copy_only=False),
        metrics=metrics,
    )
