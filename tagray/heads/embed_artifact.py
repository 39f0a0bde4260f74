"""A trained word-embedding head on disk (local directory or s3:// prefix):

    weights.safetensors        h's layers (TagMLP state)
    word_vectors.safetensors   vectors (V × d): the training tags first (vocabulary order), then
                               the pretrained words no training image carries (snapped, eq. 3–4)
    words.parquet              word, seen (a training tag), positives (training images), pretrained
    user_tags.safetensors      scale a, offset b (T each): per-tag Platt scaling of the user-tag scores,
                               P(y_t=1|x) = σ(a_t f·v_t + b_t) (absent: a = 1, b = log q(t) of the sampler)
    model.json                 head "embed", dim, word_dim, tags, words, the EmbedConfig, backbone,
                               where the initial vectors came from, how user_tags was fitted
    normalizer.json, vocabulary.json, metrics.json   as the linear heads
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
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
    read_weights,
    state_digest,
    write_weights,
)
from tagray.heads.embedding import EmbedConfig, EmbedTagger, TagMLP, tag_log_prior
from tagray.heads.standardize import as_saved

VECTORS_FILE = "word_vectors.safetensors"
WORDS_FILE = "words.parquet"
USER_TAGS_FILE = "user_tags.safetensors"


@dataclass
class SavedEmbedHead:
    mlp: TagMLP
    vectors: torch.Tensor  # (V, d)
    words: list[str]  # V words; words[:T] are vocab.tags
    vocab: Vocabulary
    config: EmbedConfig
    backbone: dict | None
    positives: np.ndarray  # (V,) training images carrying each word (0 beyond the training tags)
    pretrained: np.ndarray  # (V,) bool: the initial vector came from the pretrained file
    vectors_source: str  # URI of the pretrained file, or "random"
    metrics: dict = field(default_factory=dict)
    user_tags: tuple[torch.Tensor, torch.Tensor] | None = None  # (a, b) of Platt scaling, (T,) each
    user_tags_fit: dict | None = None  # how (a, b) were fitted: method, split, images

    @property
    def model(self) -> EmbedTagger:
        """h with the training tags' vectors: the evaluation interface (tagray.eval.report.Tagger)."""
        tags = len(self.vocab)
        if self.user_tags is not None:
            scale, offset = self.user_tags
            return EmbedTagger(self.mlp, self.vectors[:tags].clone(), offset.clone(), scale.clone()).eval()
        prior = tag_log_prior(self.config, self.positives[:tags])
        return EmbedTagger(self.mlp, self.vectors[:tags].clone(), prior).eval()

    @property
    def mlp_digest(self) -> str:
        """Identity of h: image embeddings (and an image index) belong to this digest."""
        return state_digest(self.mlp)

    @property
    def calibrated(self) -> np.ndarray:
        return np.zeros(len(self.vocab), bool)


def save_embed_head(head: SavedEmbedHead, directory: str, endpoint_url: str | None = None) -> str:
    if head.words[: len(head.vocab)] != list(head.vocab.tags):
        raise ValueError("the first words must be the vocabulary's tags, in order")
    vectors = {"vectors": head.vectors.detach().cpu().float()}
    finite_state(head.mlp.state_dict(), storage.join(directory, WEIGHTS_FILE))  # before anything is written
    finite_state(vectors, storage.join(directory, VECTORS_FILE))
    user_tags = None
    if head.user_tags is not None:
        if not head.user_tags_fit:
            raise ValueError("user_tags_fit must say how user_tags were fitted (model.json records it; the loader "
                             "reads the calibration only where it is recorded)")
        user_tags = {"scale": head.user_tags[0].detach().cpu().float(), "offset": head.user_tags[1].detach().cpu().float()}
        if any(v.shape != (len(head.vocab),) for v in user_tags.values()):
            raise ValueError(f"user-tag calibration must have one scale and one offset per tag ({len(head.vocab)})")
        finite_state(user_tags, storage.join(directory, USER_TAGS_FILE))
    storage.makedirs(directory, endpoint_url)
    write_weights(head.mlp.state_dict(), storage.join(directory, WEIGHTS_FILE), endpoint_url)
    write_weights(vectors, storage.join(directory, VECTORS_FILE), endpoint_url)
    if user_tags is not None:
        write_weights(user_tags, storage.join(directory, USER_TAGS_FILE), endpoint_url)
    seen = np.zeros(len(head.words), bool)
    seen[: len(head.vocab)] = True
    words = pa.table({
        "word": pa.array(head.words, pa.string()),
        "seen": seen,
        "positives": head.positives.astype(np.int64),
        "pretrained": head.pretrained.astype(bool),
    })
    schema.write_table(words, storage.join(directory, WORDS_FILE), endpoint_url)
    meta = {
        "head": "embed",
        "dim": head.mlp.dim,
        "word_dim": int(head.vectors.shape[1]),
        "tags": len(head.vocab),
        "words": len(head.words),
        "config": to_dict(head.config),
        "backbone": head.backbone,
        "vocabulary_version": head.vocab.version,
        "vectors_source": head.vectors_source,
        "user_tags": head.user_tags_fit if head.user_tags is not None else None,
    }
    storage.write_text(storage.join(directory, MODEL_FILE), jsonio.dumps(meta, MODEL_FILE, indent=1), endpoint_url)
    storage.write_text(storage.join(directory, METRICS_FILE), jsonio.dumps(head.metrics, METRICS_FILE, indent=1, default=str), endpoint_url)
    head.vocab.save(directory, endpoint_url)
    return directory


def load_embed_head(directory: str, normalizer: TagNormalizer | None = None, endpoint_url: str | None = None) -> SavedEmbedHead:
    meta = json.loads(storage.read_text(storage.join(directory, MODEL_FILE), endpoint_url))
    if meta.get("head") != "embed":
        raise schema.SchemaError(f"{directory}: a {meta.get('head')!r} head, not an embed head")
    cfg = from_dict(EmbedConfig, meta["config"], f"{directory}/{MODEL_FILE}")
    vocab = Vocabulary.load(directory, normalizer, endpoint_url)
    if vocab.version != meta["vocabulary_version"]:
        raise schema.SchemaError(f"{directory}: vocabulary.json does not belong to these weights")
    mlp = TagMLP(meta["dim"], cfg.hidden, meta["word_dim"], cfg.dropout)
    state = read_weights(storage.join(directory, WEIGHTS_FILE), endpoint_url)
    cfg = as_saved(cfg, state, meta["config"])
    mlp.load_state_dict(state)
    mlp.eval()
    vectors = read_weights(storage.join(directory, VECTORS_FILE), endpoint_url)["vectors"]
    words = schema.read_table(storage.join(directory, WORDS_FILE), endpoint_url=endpoint_url)
    if words.num_rows != len(vectors) or words.column("word").to_pylist()[: len(vocab)] != list(vocab.tags):
        raise schema.SchemaError(f"{directory}: {WORDS_FILE} does not belong to {VECTORS_FILE}")
    metrics_uri = storage.join(directory, METRICS_FILE)
    metrics = json.loads(storage.read_text(metrics_uri, endpoint_url)) if storage.exists(metrics_uri, endpoint_url) else {}
    user_tags = None
    if meta.get("user_tags") is not None:  # written by a version with user-tag calibration, and fitted
        fitted = read_weights(storage.join(directory, USER_TAGS_FILE), endpoint_url)
        if any(fitted[k].shape != (len(vocab),) for k in ("scale", "offset")):
            raise schema.SchemaError(f"{directory}: {USER_TAGS_FILE} does not have one scale and offset per tag")
        user_tags = (fitted["scale"], fitted["offset"])
    return SavedEmbedHead(
        mlp=mlp, vectors=vectors, words=words.column("word").to_pylist(), vocab=vocab, config=cfg,
        backbone=meta.get("backbone"), positives=words.column("positives").to_numpy(),
        pretrained=words.column("pretrained").to_numpy(zero_copy_only=False),
        vectors_source=meta.get("vectors_source", "random"), metrics=metrics,
        user_tags=user_tags, user_tags_fit=meta.get("user_tags"),
    )
