"""Tag normalisation and the vocabulary artefact (seed 001 §3.3 and §5, SPEC §1).

Raw user tags → URL-decoded, lower-cased, stripped; the first `max_tags` kept in
upload order (tag accuracy falls with position, seed 001 Fig. 2); plurals merged
by WordNet lemmatisation; optional drop of non-image tags (years, camera makes,
Flickr awards: lists in `configs/non_image_tags.yaml`) and of words WordNet does
not know; duplicates after normalisation kept once, at their first position.

Work is vectorised over the flattened tag column: each distinct raw tag is
normalised once, however many images carry it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import cached_property
from urllib.parse import unquote_plus

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tagray.config import ConfigError, load_yaml, to_dict
from tagray.data import storage
from tagray.data.wordnet import lemmatizer, wordnet, wordnet_version

NORMALIZER_FILE = "normalizer.json"
VOCABULARY_FILE = "vocabulary.json"


@dataclass(frozen=True)
class NormalizerConfig:
    max_tags: int = 20  # keep the first N tags of each image, in upload order (seed 001 §5)
    lemmatize: bool = True  # merge plurals with WordNet's noun lemmatiser (cars → car)
    drop_non_image: bool = True  # drop years, camera makes/models, award tags
    non_image_tags: str = "non_image_tags.yaml"  # lists for drop_non_image (path, or name in configs/)
    wordnet_only: bool = False  # keep only tags that are WordNet words
    min_images: int = 3  # vocabulary: tags carried by at least this many images
    top_k: int | None = None  # vocabulary: keep only the τ most frequent tags (after min_images)

    def __post_init__(self) -> None:
        if self.max_tags < 1:
            raise ConfigError(f"max_tags must be ≥ 1, got {self.max_tags}")
        if self.min_images < 1:
            raise ConfigError(f"min_images must be ≥ 1, got {self.min_images}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be ≥ 1 or null, got {self.top_k}")


class NormalizerMismatch(ValueError):
    """A model or vocabulary made with other normaliser settings than the ones in use."""


@dataclass(frozen=True)
class NonImageLists:
    """Non-image tag lists: regular expressions and exact words."""

    patterns: tuple[str, ...]
    words: frozenset[str]

    @classmethod
    def load(cls, name: str) -> NonImageLists:
        data = load_yaml(name)
        unknown = set(data) - {"patterns", "camera", "awards", "other"}
        if unknown:
            raise ConfigError(f"{name}: unknown list(s) {sorted(unknown)}; expected patterns, camera, awards, other")
        words = {w.lower() for key in ("camera", "awards", "other") for w in data.get(key) or []}
        patterns = tuple(data.get("patterns") or [])
        for p in patterns:
            try:
                re.compile(p)
            except re.error as e:
                raise ConfigError(f"{name}: pattern {p!r} is not a valid regular expression: {e}") from e
        return cls(patterns, frozenset(words))

    @cached_property
    def regex(self) -> re.Pattern | None:
        return re.compile("|".join(f"(?:{p})" for p in self.patterns)) if self.patterns else None

    def matches(self, tag: str) -> bool:
        return tag in self.words or bool(self.regex and self.regex.fullmatch(tag))

    def digest(self) -> str:
        blob = json.dumps([sorted(self.patterns), sorted(self.words)]).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class TagNormalizer:
    """Normalises raw tag lists; its `identity()` is saved next to every model."""

    def __init__(self, cfg: NormalizerConfig | None = None) -> None:
        self.cfg = cfg or NormalizerConfig()
        self.non_image = NonImageLists.load(self.cfg.non_image_tags) if self.cfg.drop_non_image else None
        self._cache: dict[str, str | None] = {}
        if self.cfg.lemmatize or self.cfg.wordnet_only:
            wordnet()  # fail now, with the setup hint, rather than mid-run

    @classmethod
    def from_identity(cls, identity: dict) -> TagNormalizer:
        """The normaliser a saved `identity()` describes (non-image lists from configs/;
        Vocabulary.load(…, expected=it) then checks that their content is the same)."""
        return cls(NormalizerConfig(**identity["settings"]))

    def identity(self) -> dict:
        """Settings plus the digests that change what the normaliser outputs."""
        ident = {
            "settings": to_dict(self.cfg),
            "non_image_digest": self.non_image.digest() if self.non_image else None,
            "wordnet": wordnet_version() if (self.cfg.lemmatize or self.cfg.wordnet_only) else None,
        }
        ident["settings"].pop("non_image_tags")  # where the lists live does not matter, their content does
        ident["fingerprint"] = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
        return ident

    def clean(self, raw: str) -> str:
        """URL-decode (`+` is a space, as in YFCC100M's tags), lower-case, strip, collapse inner
        whitespace, drop a leading '#'."""
        tag = unquote_plus(raw).lower().strip().lstrip("#")
        return " ".join(tag.split())

    def normalize_tag(self, raw: str) -> str | None:
        """One raw tag → its normal form, or None when it is dropped."""
        if raw in self._cache:
            return self._cache[raw]
        tag: str | None = self.clean(raw)
        if not tag or (self.non_image and self.non_image.matches(tag)):
            tag = None
        if tag and self.cfg.lemmatize:
            head, _, last = tag.rpartition(" ")
            if last.isalpha():
                last = lemmatizer().lemmatize(last, pos="n")
            tag = f"{head} {last}" if head else last
            if self.non_image and self.non_image.matches(tag):
                tag = None
        if tag and self.cfg.wordnet_only and not wordnet().synsets(tag.replace(" ", "_")):
            tag = None
        self._cache[raw] = tag
        return tag

    def normalize_flat(self, tags: pa.Array | pa.ChunkedArray, cut: bool = True):
        """Flattened view: (row of each kept tag, its position in the raw list, its id into
        `uniques`, `uniques`). Duplicates within a row are kept; dropped tags are removed."""
        arr = _as_list_array(tags)
        if cut:
            arr = pc.list_slice(arr, 0, self.cfg.max_tags)
        flat = pc.list_flatten(arr)
        parent = pc.list_parent_indices(arr).to_numpy()
        start = np.asarray(arr.offsets)[:-1][parent] if len(parent) else parent
        position = np.arange(len(parent)) - start
        encoded = pc.dictionary_encode(flat)
        normalized = [self.normalize_tag(s) for s in encoded.dictionary.to_pylist()]
        uniques = sorted({t for t in normalized if t is not None})
        index = {t: i for i, t in enumerate(uniques)}
        lookup = np.array([index[t] if t is not None else -1 for t in normalized] + [-1], dtype=np.int64)
        codes = encoded.indices.to_numpy(zero_copy_only=False)
        ids = lookup[np.where(encoded.indices.is_null().to_numpy(zero_copy_only=False), -1, codes)]
        keep = ids >= 0
        return parent[keep], position[keep], ids[keep], uniques

    def normalize_lists(self, tags: pa.Array | pa.ChunkedArray) -> pa.ListArray:
        """Normalised tag lists: first `max_tags` raw tags, normalised, deduplicated in order."""
        arr = _as_list_array(tags)
        parent, _, ids, uniques = self.normalize_flat(arr, cut=True)
        first = _first_occurrences(parent, ids, len(uniques))
        rows, ids = parent[first], ids[first]
        offsets = np.zeros(len(arr) + 1, dtype=np.int32)
        np.cumsum(np.bincount(rows, minlength=len(arr)), out=offsets[1:])
        values = pa.array(uniques, pa.string()).take(pa.array(ids))
        return pa.ListArray.from_arrays(pa.array(offsets), values)


def _as_list_array(tags: pa.Array | pa.ChunkedArray) -> pa.ListArray:
    arr = tags.combine_chunks() if isinstance(tags, pa.ChunkedArray) else tags
    if pa.types.is_large_list(arr.type):
        arr = arr.cast(pa.list_(arr.type.value_type))
    if arr.null_count:
        arr = pc.fill_null(arr, pa.scalar([], arr.type))
    return arr


def lookup_coo(lists: pa.Array | pa.ChunkedArray, values) -> tuple[np.ndarray, np.ndarray]:
    """(row, index into `values`) for every list element found in `values`, vectorised."""
    arr = _as_list_array(lists)
    found = pc.index_in(pc.list_flatten(arr), value_set=pa.array(list(values), pa.string()))
    cols = pc.fill_null(found, -1).to_numpy().astype(np.int64)
    rows = pc.list_parent_indices(arr).to_numpy().astype(np.int64)
    keep = cols >= 0
    return rows[keep], cols[keep]


def _first_occurrences(rows: np.ndarray, ids: np.ndarray, n_ids: int) -> np.ndarray:
    """Indices of the first (row, id) occurrences, in their original order."""
    key = rows.astype(np.int64) * (n_ids + 1) + ids
    _, first = np.unique(key, return_index=True)
    first.sort()
    return first


@dataclass(frozen=True)
class Vocabulary:
    """The tag vocabulary: tags by decreasing image count, with the normaliser that made it."""

    tags: tuple[str, ...]
    counts: tuple[int, ...]  # images carrying each tag
    normalizer: dict  # TagNormalizer.identity()

    @cached_property
    def index(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tags)}

    def __len__(self) -> int:
        return len(self.tags)

    @property
    def version(self) -> str:
        blob = json.dumps([self.tags, self.normalizer["fingerprint"]]).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def build(cls, normalized: pa.ListArray, normalizer: TagNormalizer) -> Vocabulary:
        """Tags on ≥ min_images images, then the top_k most frequent (ties broken by name)."""
        cfg = normalizer.cfg
        counts = pc.value_counts(pc.list_flatten(normalized))
        pairs = [(c, t) for t, c in zip(counts.field(0).to_pylist(), counts.field(1).to_pylist(), strict=True)]
        pairs = sorted((p for p in pairs if p[0] >= cfg.min_images), key=lambda p: (-p[0], p[1]))
        if cfg.top_k is not None:
            pairs = pairs[: cfg.top_k]
        if not pairs:
            from tagray.data.schema import SchemaError

            raise SchemaError(f"empty vocabulary: no tag is on at least min_images={cfg.min_images} images")
        return cls(tuple(t for _, t in pairs), tuple(c for c, _ in pairs), normalizer.identity())

    def to_coo(self, normalized: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
        """(row, tag index) pairs of the in-vocabulary tags of each list."""
        return lookup_coo(normalized, self.tags)

    def save(self, directory: str, endpoint_url: str | None = None) -> None:
        """Writes `normalizer.json` and `vocabulary.json` into `directory` (a model dir)."""
        from tagray import jsonio

        storage.write_text(storage.join(directory, NORMALIZER_FILE), jsonio.dumps(self.normalizer, NORMALIZER_FILE, indent=2),
                           endpoint_url)
        body = {"version": self.version, "tags": list(self.tags), "counts": list(self.counts)}
        storage.write_text(storage.join(directory, VOCABULARY_FILE), jsonio.dumps(body, VOCABULARY_FILE), endpoint_url)

    @classmethod
    def load(cls, directory: str, expected: TagNormalizer | None = None, endpoint_url: str | None = None) -> Vocabulary:
        """Reads a saved vocabulary; NormalizerMismatch when `expected` has other settings."""
        normalizer = json.loads(storage.read_text(storage.join(directory, NORMALIZER_FILE), endpoint_url))
        body = json.loads(storage.read_text(storage.join(directory, VOCABULARY_FILE), endpoint_url))
        if expected is not None:
            check_same_normalizer(normalizer, expected.identity(), directory)
        vocab = cls(tuple(body["tags"]), tuple(body["counts"]), normalizer)
        if vocab.version != body["version"]:
            raise NormalizerMismatch(f"{directory}: vocabulary version {body['version']} does not match its content")
        return vocab


def check_same_normalizer(saved: dict, current: dict, where: str) -> None:
    """Raises NormalizerMismatch naming each setting that differs."""
    if saved.get("fingerprint") == current.get("fingerprint"):
        return
    diffs = [
        f"{k}: saved {saved['settings'].get(k)!r}, now {v!r}"
        for k, v in current["settings"].items()
        if saved["settings"].get(k) != v
    ]
    for key in ("non_image_digest", "wordnet"):
        if saved.get(key) != current.get(key):
            diffs.append(f"{key}: saved {saved.get(key)!r}, now {current.get(key)!r}")
    raise NormalizerMismatch(
        f"{where}: made with a different tag normaliser ({'; '.join(diffs) or 'fingerprint differs'}); "
        "use the normaliser settings saved with it"
    )
