"""Open-vocabulary tagging and search with the embedding head (seed 004 §2, SPEC §3.2), on faiss.

Tagging: the top-k words by f·v over every word vector (an inner-product index over V).
Search: the images whose embedding f = h(x) has the largest inner product with the query
vector. A query of several words uses the sum of their vectors, q = Σ_w v_w, so an image
scores Σ_w f·v_w: the sum of the words' logits, i.e. images are ranked by the product of the
words' odds σ(f·v_w)/(1−σ(f·v_w)) — every word has to fit (an AND), and no single word
dominates by its vector's length alone more than it does in tagging.

The sharded index `tagray index` writes now lives in tagray/index/ (format, Ray Data build,
ShardGroup search); this module keeps the single-directory index of earlier versions (what
`build_*_index` / `save_*_index` still write, and what `load_any_index` reads — it also reads a
sharded index whole, tombstones applied, for callers not yet on tagray.index), the word index of
the embed head and UnknownWord.

A single-directory index holds images.faiss (exact inner-product index over f), images.parquet
(row → image_id, uri) and index.json (the model it was built with).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from tagray import jsonio
from tagray.data import schema, storage
from tagray.data.normalize import TagNormalizer
from tagray.heads.embed_artifact import SavedEmbedHead
from tagray.index.model import check_index_matches, head_digest  # noqa: F401  (re-exported: serve, commands)

INDEX_FILE = "images.faiss"
IMAGES_FILE = "images.parquet"
META_FILE = "index.json"


class UnknownWord(KeyError):
    """A query word that is not in the model's vocabulary (after normalisation)."""

    def __init__(self, word: str, normalized: str | None) -> None:
        self.word = word
        shown = f"{word!r}" + (f" (normalised: {normalized!r})" if normalized and normalized != word else "")
        super().__init__(f"unknown word {shown}: not among the model's words")

    def __str__(self) -> str:
        return self.args[0]


class WordIndex:
    """Every word vector of an embed head, searchable by inner product."""

    def __init__(self, words: list[str], vectors: np.ndarray, normalizer: TagNormalizer | None = None) -> None:
        import faiss

        self.words = words
        self.where = {w: i for i, w in enumerate(words)}
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self.normalizer = normalizer
        self.index = faiss.IndexFlatIP(self.vectors.shape[1])
        self.index.add(self.vectors)

    @classmethod
    def of(cls, head: SavedEmbedHead) -> WordIndex:
        return cls(head.words, head.vectors.numpy(), TagNormalizer.from_identity(head.vocab.normalizer))

    def word_id(self, word: str) -> int:
        normalized = self.normalizer.normalize_tag(word) if self.normalizer else word.strip().lower()
        if normalized is None or normalized not in self.where:
            raise UnknownWord(word, normalized)
        return self.where[normalized]

    def query_vector(self, words: list[str]) -> np.ndarray:
        """q = Σ_w v_w (see the module docstring)."""
        if not words:
            raise ValueError("empty query: give at least one word")
        return self.vectors[[self.word_id(w) for w in words]].sum(0)

    def top_words(self, f: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores f·v, word ids) of the k best words per row of f (B, d)."""
        scores, ids = self.index.search(np.ascontiguousarray(f, dtype=np.float32), min(k, len(self.words)))
        return scores, ids


@dataclass
class ImageIndex:
    index: object  # faiss.Index over image embeddings
    image_ids: list[str]
    uris: list[str | None]
    meta: dict

    def search(self, query: np.ndarray, k: int) -> list[tuple[str, str | None, float]]:
        """(image_id, uri, score f·q) of the k best images."""
        scores, rows = self.index.search(np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1),
                                         min(k, len(self.image_ids)))
        return [(self.image_ids[r], self.uris[r], float(s)) for s, r in zip(scores[0], rows[0], strict=True) if r >= 0]


def embed_images(head: SavedEmbedHead, x: torch.Tensor, batch_size: int = 65_536) -> np.ndarray:
    """f = h(x) for every row of x, in batches."""
    out = []
    with torch.inference_mode():
        for lo in range(0, len(x), batch_size):
            out.append(head.mlp(x[lo : lo + batch_size]).numpy())
    return np.concatenate(out) if out else np.zeros((0, head.vectors.shape[1]), np.float32)


def build_image_index(head: SavedEmbedHead, features: pa.Table, manifest: pa.Table | None = None,
                      model_dir: str = "") -> ImageIndex:
    """An exact inner-product index over h(x) of every featurized image."""
    import faiss

    from tagray.heads.fit import align

    ids = features.column("image_id")
    x, _ = align(features, ids)
    f = embed_images(head, x)
    index = faiss.IndexFlatIP(f.shape[1])
    index.add(np.ascontiguousarray(f))
    uris = _uris_of(ids, manifest)
    meta = {"kind": "embeddings", "model": model_dir, "mlp_digest": head.mlp_digest, "images": len(f), "dim": int(f.shape[1]),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return ImageIndex(index, ids.to_pylist(), uris, meta)


def save_image_index(index: ImageIndex, directory: str, endpoint_url: str | None = None) -> str:
    import faiss

    storage.makedirs(directory, endpoint_url)
    storage.write_bytes(storage.join(directory, INDEX_FILE), faiss.serialize_index(index.index).tobytes(), endpoint_url)
    schema.write_table(pa.table({"image_id": pa.array(index.image_ids, pa.string()),
                                 "uri": pa.array(index.uris, pa.string())}),
                       storage.join(directory, IMAGES_FILE), endpoint_url)
    storage.write_text(storage.join(directory, META_FILE), jsonio.dumps(index.meta, META_FILE, indent=1), endpoint_url)
    return directory


def load_image_index(directory: str, endpoint_url: str | None = None) -> ImageIndex:
    import faiss

    read_index_meta(directory, endpoint_url)
    blob = storage.read_bytes(storage.join(directory, INDEX_FILE), endpoint_url)
    index = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
    images = schema.read_table(storage.join(directory, IMAGES_FILE), endpoint_url=endpoint_url)
    meta = json.loads(storage.read_text(storage.join(directory, META_FILE), endpoint_url))
    if index.ntotal != images.num_rows:
        raise schema.SchemaError(f"{directory}: {INDEX_FILE} holds {index.ntotal} images, {IMAGES_FILE} {images.num_rows}")
    return ImageIndex(index, images.column("image_id").to_pylist(), images.column("uri").to_pylist(), meta)


def read_index_meta(directory: str, endpoint_url: str | None = None) -> dict:
    """index.json of an index directory (cheap: the index itself is not read)."""
    if not storage.exists(storage.join(directory, META_FILE), endpoint_url):
        raise FileNotFoundError(f"{directory}: not a tagray index (no {META_FILE}); build one with `tagray index`")
    return json.loads(storage.read_text(storage.join(directory, META_FILE), endpoint_url))


# --- linear heads: an index of the corpus's predictions --------------------------------------

PREDICTIONS_FILE = "predictions.npy"


@dataclass
class PredictionIndex:
    """log P(z=1|x) (calibrated) of every indexed image, stored tag-major (T, N) float16 so a
    query reads one contiguous row per tag. Multi-tag queries rank images by the product of
    the tags' probabilities (seed 001 §5.3): the sum of these rows."""

    log_p: np.ndarray  # (T, N) float16
    image_ids: list[str]
    uris: list[str | None]
    meta: dict

    def search(self, columns: list[int], k: int) -> list[tuple[str, str | None, float]]:
        """(image_id, uri, Π_t P(z_t=1|x)) of the k best images for the AND of `columns`."""
        total = self.log_p[columns[0]].astype(np.float32)
        for c in columns[1:]:
            total += self.log_p[c]
        k = min(k, len(total))
        # ties broken by row, as tagray.index.layout ranks (argpartition's order among equal
        # float16 sums differs between numpy builds and CPUs)
        kth = -np.partition(-total, k - 1)[k - 1]
        above = np.flatnonzero(total > kth)
        top = np.concatenate([above, np.flatnonzero(total == kth)[: k - len(above)]])
        top = top[np.lexsort((top, -total[top]))]
        return [(self.image_ids[i], self.uris[i], float(np.exp(total[i]))) for i in top]


def build_prediction_index(head, features: pa.Table, manifest: pa.Table | None = None, model_dir: str = "",
                           batch_size: int = 65_536) -> PredictionIndex:
    """Scores every featurized image with a linear head (log P(z=1|x), with β when calibrated)."""
    from tagray.heads.fit import align

    ids = features.column("image_id")
    x, _ = align(features, ids)
    log_p = np.empty((head.model.tags, len(x)), np.float16)
    with torch.inference_mode():
        for lo in range(0, len(x), batch_size):
            _, log_true = head.model.probabilities(x[lo : lo + batch_size])
            log_p[:, lo : lo + batch_size] = log_true.numpy().T.clip(-60, 0)
    meta = {"kind": "predictions", "model": model_dir, "vocabulary_version": head.vocab.version,
            "weights_digest": head_digest(head), "images": len(x), "tags": head.model.tags,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return PredictionIndex(log_p, ids.to_pylist(), _uris_of(ids, manifest), meta)


def _uris_of(ids, manifest: pa.Table | None) -> list[str | None]:
    if manifest is None or "uri" not in manifest.column_names:
        return [None] * len(ids)
    return pc.take(manifest.column("uri"), pc.index_in(ids, value_set=manifest.column("image_id"))).to_pylist()


def save_prediction_index(index: PredictionIndex, directory: str, endpoint_url: str | None = None) -> str:
    import io

    storage.makedirs(directory, endpoint_url)
    buf = io.BytesIO()
    np.save(buf, index.log_p)
    storage.write_bytes(storage.join(directory, PREDICTIONS_FILE), buf.getvalue(), endpoint_url)
    schema.write_table(pa.table({"image_id": pa.array(index.image_ids, pa.string()),
                                 "uri": pa.array(index.uris, pa.string())}),
                       storage.join(directory, IMAGES_FILE), endpoint_url)
    storage.write_text(storage.join(directory, META_FILE), jsonio.dumps(index.meta, META_FILE, indent=1), endpoint_url)
    return directory


def load_any_index(directory: str, endpoint_url: str | None = None) -> ImageIndex | PredictionIndex:
    """The index in `directory`: predictions of a linear head, or image embeddings of an embed head."""
    import io

    meta = read_index_meta(directory, endpoint_url)
    if meta.get("format") is not None:
        return _load_sharded_whole(directory, endpoint_url)
    if meta.get("kind") != "predictions":
        return load_image_index(directory, endpoint_url)
    log_p = np.load(io.BytesIO(storage.read_bytes(storage.join(directory, PREDICTIONS_FILE), endpoint_url)))
    images = schema.read_table(storage.join(directory, IMAGES_FILE), endpoint_url=endpoint_url)
    if log_p.shape[1] != images.num_rows:
        raise schema.SchemaError(f"{directory}: {PREDICTIONS_FILE} holds {log_p.shape[1]} images, {IMAGES_FILE} {images.num_rows}")
    return PredictionIndex(log_p, images.column("image_id").to_pylist(), images.column("uri").to_pylist(), meta)


def _load_sharded_whole(directory: str, endpoint_url: str | None = None) -> ImageIndex | PredictionIndex:
    """A sharded index (tagray/index/format.py) read into one in-memory index, tombstoned rows left
    out, rows in global order; the vector store is copied into an exact IndexFlatIP when it is flat
    (an IVF/PQ/HNSW store is decoded into one: approximate vectors)."""
    import faiss

    from tagray.index import format as fmt
    from tagray.index import search as isearch

    info = fmt.open_index(directory, endpoint_url)
    dead = info.tombstones()
    shards = [isearch._load_shard(info, s) for s in info.shards]
    ids, uris, parts = [], [], []
    for sh in shards:
        keep = np.ones(len(sh), bool) if not dead else ~pc.is_in(sh.ids, value_set=pa.array(sorted(dead), pa.string())).to_numpy(
            zero_copy_only=False)
        rows = np.flatnonzero(keep)
        ids += sh.ids.take(pa.array(rows)).to_pylist()
        uris += sh.uris.take(pa.array(rows)).to_pylist()
        if info.kind == "predictions":
            parts.append(sh.log_p[:, rows])
        else:
            from tagray.index.faiss_index import reconstruct_all

            parts.append(reconstruct_all(sh.vectors)[rows])
    meta = dict(info.meta, images=len(ids))
    if info.kind == "predictions":
        log_p = np.concatenate(parts, axis=1) if parts else np.zeros((int(info.meta.get("tags", 0)), 0), np.float16)
        return PredictionIndex(log_p, ids, uris, meta)
    dim = int(info.meta.get("vector_dim") or info.meta.get("dim"))
    index = faiss.IndexFlatIP(dim)
    if parts:
        index.add(np.ascontiguousarray(np.concatenate(parts), np.float32))
    return ImageIndex(index, ids, uris, meta)
