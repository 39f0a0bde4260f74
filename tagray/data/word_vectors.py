"""Pretrained word vectors in the GloVe / word2vec text format (`word v1 … vd` per line; an
optional word2vec header line `count dim`), and the synthetic ones the demo and tests use.

Words pass through the tag normaliser, so a pretrained "Beaches" meets the tag "beach";
the first vector of a normal form wins (files list frequent words first).
"""

from __future__ import annotations

import io
import logging

import numpy as np

from tagray.data import storage
from tagray.data.normalize import TagNormalizer

log = logging.getLogger(__name__)


class WordVectorError(ValueError):
    pass


def write_word_vectors(uri: str, words: list[str], vectors: np.ndarray, endpoint_url: str | None = None) -> str:
    """Writes (words, vectors) in the text format `read_word_vectors` reads (e.g. CLIP's text
    vectors once, to pass as `--vectors FILE` to later runs)."""
    storage.write_text(uri, format_word_vectors(words, vectors), endpoint_url)
    return uri


def read_word_vectors(
    uri: str,
    normalizer: TagNormalizer,
    max_words: int | None = None,
    endpoint_url: str | None = None,
) -> tuple[list[str], np.ndarray]:
    """(normalised words, (n, d) float32 vectors) of a GloVe / word2vec text file, local or on
    an object store. (`--vectors open_clip:…`, CLIP's text tower, is read by
    `tagray.features.open_clip_backbone.pretrained_vectors`, which falls back to this.)"""
    if not storage.exists(uri, endpoint_url):
        raise FileNotFoundError(f"{uri}: no such word-vector file")
    text = io.TextIOWrapper(io.BytesIO(storage.read_bytes(uri, endpoint_url)), encoding="utf-8", errors="replace")
    words: list[str] = []
    rows: list[np.ndarray] = []
    seen: set[str] = set()
    dim = None
    for number, line in enumerate(text, start=1):
        parts = line.rstrip("\n").rstrip().split(" ")
        if number == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
            continue  # word2vec header
        if len(parts) < 2:
            continue
        if dim is None:
            dim = len(parts) - 1
        if len(parts) - 1 != dim:
            raise WordVectorError(f"{uri}:{number}: {len(parts) - 1} values, but the file's vectors have {dim}")
        try:
            vector = np.asarray(parts[1:], dtype=np.float32)
        except ValueError as e:
            raise WordVectorError(f"{uri}:{number}: not a number in the vector of {parts[0]!r} ({e})") from None
        word = normalizer.normalize_tag(parts[0].replace("_", " "))
        if word is None or word in seen:
            continue
        seen.add(word)
        words.append(word)
        rows.append(vector)
        if max_words is not None and len(words) >= max_words:
            break
    if not rows:
        raise WordVectorError(f"{uri}: no word vectors (expected lines of `word v1 … vd`)")
    return words, np.stack(rows)


def format_word_vectors(words: list[str], vectors: np.ndarray) -> str:
    return "".join(f"{w.replace(' ', '_')} {' '.join(f'{v:.5f}' for v in row)}\n" for w, row in zip(words, vectors, strict=True))


def synthetic_word_vectors(truth: dict, dim: int = 50, filler: int = 200, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Stand-in for a GloVe file, for a synthetic corpus's `truth.json`: each concept word gets a
    random direction; its synonym and its untagged related word (words.UNTAGGED_RELATED) lie
    near it; free-tag words and `filler` made-up words are random. Text vectors know nothing
    of the images: only training ties them to the visual concepts."""
    from tagray.data.words import FREE_WORDS, UNTAGGED_RELATED

    rng = np.random.default_rng([seed, 4])
    words: list[str] = []
    rows: list[np.ndarray] = []

    def add(word: str | None, vector: np.ndarray) -> None:
        if word and word not in words:
            words.append(word)
            rows.append(vector)

    scale = 1.0 / np.sqrt(dim)
    for concept in truth["concepts"]:
        base = rng.standard_normal(dim) * scale * 2
        add(concept["tag"], base)
        if concept.get("synonym"):
            add(concept["synonym"], base + 0.4 * scale * rng.standard_normal(dim))
        add(UNTAGGED_RELATED.get(concept["tag"]), base + 0.4 * scale * rng.standard_normal(dim))
    for word in FREE_WORDS:
        add(word, rng.standard_normal(dim) * scale * 2)
    for i in range(filler):
        add(f"filler{i:05d}", rng.standard_normal(dim) * scale * 2)
    return words, np.stack(rows).astype(np.float32)


def write_synthetic_word_vectors(truth_uri: str, out_uri: str, dim: int = 50, seed: int = 0,
                                 endpoint_url: str | None = None) -> str:
    import json

    truth = json.loads(storage.read_text(truth_uri, endpoint_url))
    words, vectors = synthetic_word_vectors(truth, dim, seed=seed)
    storage.write_text(out_uri, format_word_vectors(words, vectors), endpoint_url)
    return out_uri


def word_table_init(
    tags: tuple[str, ...] | list[str],
    pretrained: tuple[list[str], np.ndarray] | None,
    word_dim: int,
    init_scale: float,
    seed: int = 0,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The initial word matrix V_∪ = [V_I | V_D] (seed 004 §2.1): the training tags first, in
    vocabulary order (so tag ids index it), then pretrained words no training image carries.
    Returns (words, (V, d) vectors, (V,) bool: vector came from the pretrained file).
    Tags missing from the file start random, at the file's typical scale."""
    rng = np.random.default_rng([seed, 5])
    if pretrained is None:
        vectors = (rng.standard_normal((len(tags), word_dim)) * init_scale).astype(np.float32)
        return list(tags), vectors, np.zeros(len(tags), bool)
    p_words, p_vectors = pretrained
    where = {w: i for i, w in enumerate(p_words)}
    dim = p_vectors.shape[1]
    scale = float(p_vectors.std()) or init_scale
    tag_rows = np.empty((len(tags), dim), np.float32)
    from_file = np.zeros(len(tags), bool)
    for i, tag in enumerate(tags):
        j = where.get(tag)
        if j is None:
            tag_rows[i] = rng.standard_normal(dim) * scale
        else:
            tag_rows[i] = p_vectors[j]
            from_file[i] = True
    tag_set = set(tags)
    extra = [i for i, w in enumerate(p_words) if w not in tag_set]
    words = list(tags) + [p_words[i] for i in extra]
    vectors = np.concatenate([tag_rows, p_vectors[extra]]).astype(np.float32)
    return words, vectors, np.concatenate([from_file, np.ones(len(extra), bool)])
