"""In-process search over some shards of an index, and the merge of several groups' answers.

Linear heads (seed 001 §5.3): a query of tags t₁…t_m ranks images by Π_j P(z_{t_j}=1|x) —
each shard sums its float16 log P rows in float32 (layout.py) and the score is the product,
exp of that sum (in float64, strictly monotone in the sum). Embed head (seed 004 §2): images
ranked by f·q. Search by example: the nearest stored vectors (f for the embed head, the
normalised feature for a linear head) by inner product.

Every shard returns its own top n of the rows that pass the filters and are not deleted
(filters applied inside the shard, before its top-n), by (-score, global row); `merge_hits`
sorts the union the same way and slices [offset, offset + k]. Scores are comparable across
shards (one model, one computation per image), so the merge of K shards equals the
unsharded ranking exactly, ties included (tests/test_index_shards.py).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tagray.config import ConfigError
from tagray.data import schema, storage
from tagray.index import faiss_index, layout
from tagray.index import format as fmt
from tagray.index.model import check_index_matches, example_vector


@dataclass(frozen=True)
class Filters:
    """Restrictions applied inside each shard before its top-k; all optional."""

    user: str | None = None  # manifest user_id equals
    taken_after: str | None = None  # ISO date, inclusive, on the index's date column
    taken_before: str | None = None  # ISO date, inclusive (a prefix compare: "2020-01-31" keeps all of that day)
    equals: tuple[tuple[str, str], ...] = ()  # other kept columns, equality (values compared as strings)

    @property
    def empty(self) -> bool:
        return self.user is None and self.taken_after is None and self.taken_before is None and not self.equals


@dataclass(frozen=True)
class Hit:
    image_id: str
    score: float
    uri: str | None
    row: int  # global position in the index: the deterministic tie-break


class UnknownImage(KeyError):
    """An image_id the shards asked do not hold."""

    def __str__(self) -> str:
        return self.args[0]


def merge_hits(groups: list[list[Hit]], k: int, offset: int = 0) -> list[Hit]:
    """The union of several groups' hits by (-score, row), sliced [offset, offset + k]. Each group
    must have returned its top offset + k for the page to be exact."""
    hits = [h for g in groups for h in g]
    hits.sort(key=lambda h: (-h.score, h.row))
    return hits[offset : offset + k]


@dataclass
class _Shard:
    name: str
    ids: pa.Array
    uris: pa.Array
    rows: np.ndarray
    columns: dict[str, pa.Array]
    log_p: np.ndarray | None
    vectors: object | None  # faiss index
    codes: np.ndarray | None = None  # layout.coarse_codes of log_p (ShardGroup codes=True)
    _masks: dict = field(default_factory=dict)
    _dead: tuple = (None, None)

    def __len__(self) -> int:
        return len(self.ids)

    def local(self, image_id: str) -> int | None:
        i = pc.index(self.ids, pa.scalar(image_id, pa.string())).as_py()
        return None if i is None or i < 0 else i

    def hit(self, i: int, score: float) -> Hit:
        return Hit(self.ids[i].as_py(), score, self.uris[i].as_py(), int(self.rows[i]))


def _load_shard(info: fmt.IndexInfo, name: str, codes: bool = False) -> _Shard:
    uri, endpoint = info.shard_uri(name), info.endpoint_url
    images = schema.read_table(storage.join(uri, fmt.IMAGES_FILE), endpoint_url=endpoint)
    n = images.num_rows
    rows = images.column("row").to_numpy() if "row" in images.column_names else np.arange(n, dtype=np.int64)
    cols = {c: images.column(c).combine_chunks() for c in info.columns}
    log_p = vectors = None
    if info.kind == "predictions":
        file = "predictions.npy" if info.legacy else fmt.LOG_P_FILE
        log_p = np.load(io.BytesIO(storage.read_bytes(storage.join(uri, file), endpoint)))
        if log_p.shape[1] != n:
            raise schema.SchemaError(f"{storage.redact(uri)}: {file} holds {log_p.shape[1]} images, {fmt.IMAGES_FILE} {n}")
    vec = storage.join(uri, "images.faiss" if info.legacy else fmt.VECTORS_FILE)
    if (info.legacy and info.kind == "embeddings") or (not info.legacy and info.meta.get("vectors")):
        vectors = faiss_index.deserialise(storage.read_bytes(vec, endpoint), int(info.meta.get("nprobe", 16)),
                                          int(info.meta.get("ef_search", 64)))
        if vectors.ntotal != n:
            raise schema.SchemaError(f"{storage.redact(vec)}: holds {vectors.ntotal} vectors, {fmt.IMAGES_FILE} {n}")
    return _Shard(name, images.column("image_id").combine_chunks(), images.column("uri").combine_chunks(), rows,
                  cols, log_p, vectors, layout.coarse_codes(log_p) if codes and log_p is not None else None)


class ShardGroup:
    """What one Searcher replica holds: a subset of the shards of one index, loaded whole; a tag
    search scans a shard with `threads` threads (layout.top_and), from the shard's coarse codes
    when `codes` (one byte per image and tag more in RAM, a faster scan of common tags)."""

    def __init__(self, info: fmt.IndexInfo, shard_names: list[str], head, endpoint_url: str | None = None,
                 threads: int = 1, codes: bool = False) -> None:
        if endpoint_url is not None and info.endpoint_url != endpoint_url:
            info = fmt.open_index(info.uri, endpoint_url)
        check_index_matches(info.meta, head, storage.redact(info.uri))
        unknown = [s for s in shard_names if s not in info.shards]
        if unknown:
            raise ConfigError(f"{storage.redact(info.uri)}: no shard(s) {', '.join(unknown)} in version {info.version} "
                              f"(shards: {', '.join(info.shards)})")
        self.info, self.head, self.threads = info, head, max(1, int(threads))
        self.kind = info.kind
        self.shard_names = list(shard_names)
        self.shards = [_load_shard(info, s, codes) for s in shard_names]
        self.images = sum(len(s) for s in self.shards)
        self.date_column = info.meta.get("date_column")

    # --- filters -----------------------------------------------------------------------------
    def _column(self, shard: _Shard, name: str, why: str) -> pa.Array:
        if name not in shard.columns:
            kept = ", ".join(self.info.columns) or "none"
            raise ConfigError(f"filter {why}: the index keeps no column {name!r} (kept: {kept}); rebuild it with "
                              f"`tagray index --columns …,{name}`")
        return shard.columns[name]

    def _mask(self, shard: _Shard, filters: Filters, deleted: frozenset[str]) -> np.ndarray | None:
        """Bool mask of the shard's rows passing `filters` and not in `deleted` (None: all pass)."""
        mask = None
        if not filters.empty:
            mask = shard._masks.get(filters)
            if mask is None:
                m = np.ones(len(shard), bool)
                if filters.user is not None:
                    col = self._column(shard, "user_id", "user")
                    m &= pc.fill_null(pc.equal(col, filters.user), False).to_numpy(zero_copy_only=False)
                if filters.taken_after is not None or filters.taken_before is not None:
                    if self.date_column is None:
                        self._column(shard, "date_taken", "taken_after/taken_before")
                    col = shard.columns[self.date_column]
                    if filters.taken_after is not None:
                        m &= pc.fill_null(pc.greater_equal(col, filters.taken_after), False).to_numpy(zero_copy_only=False)
                    if filters.taken_before is not None:
                        head = pc.utf8_slice_codeunits(col, 0, len(filters.taken_before))
                        m &= pc.fill_null(pc.less_equal(head, filters.taken_before), False).to_numpy(zero_copy_only=False)
                for name, value in filters.equals:
                    col = self._column(shard, name, name)
                    m &= pc.fill_null(pc.equal(col, str(value)), False).to_numpy(zero_copy_only=False)
                if len(shard._masks) > 32:
                    shard._masks.clear()
                shard._masks[filters] = m
                mask = m
        if deleted:
            key, dead = shard._dead
            if key is not deleted and key != deleted:
                dead = pc.is_in(shard.ids, value_set=pa.array(sorted(deleted), pa.string())).to_numpy(zero_copy_only=False)
                shard._dead = (deleted, dead)
            if dead.any():
                mask = ~dead if mask is None else mask & ~dead
        return mask

    # --- searches ----------------------------------------------------------------------------
    def search_tags(self, columns: list[int], n: int, min_score: float | None = None, filters: Filters = Filters(),
                    deleted: frozenset[str] = frozenset()) -> list[Hit]:
        """Top n images by Π_j P(z_{t_j}=1|x) over `columns` (score = the product; min_score in (0, 1]
        keeps only products ≥ it)."""
        if self.kind != "predictions":
            raise ConfigError("search_tags needs an index of a linear head's predictions; this one holds image embeddings")
        _check_n(n)
        if not columns:
            raise ConfigError("empty query: give at least one tag")
        tags = int(self.info.meta.get("tags", 0)) or (self.shards[0].log_p.shape[0] if self.shards else 0)
        bad = [c for c in columns if not 0 <= c < tags]
        if bad:
            raise ConfigError(f"tag column(s) {bad} out of range: the index has {tags} tags")
        if min_score is not None and not 0 < min_score <= 1:
            raise ConfigError(f"min_score must be in (0, 1] (a product of probabilities), got {min_score}")
        hits: list[list[Hit]] = []
        for shard in self.shards:
            if not len(shard):
                continue
            top, sums = layout.top_and(shard.log_p, columns, n, self._mask(shard, filters, deleted), self.threads,
                                       shard.codes)
            hits.append([shard.hit(int(i), float(np.exp(np.float64(s)))) for i, s in zip(top, sums, strict=True)])
        out = merge_hits(hits, n)
        return [h for h in out if h.score >= min_score] if min_score is not None else out

    def search_vector(self, q: np.ndarray, n: int, min_score: float | None = None, filters: Filters = Filters(),
                      deleted: frozenset[str] = frozenset()) -> list[Hit]:
        """Top n images by f·q (embed head)."""
        if self.kind != "embeddings":
            raise ConfigError("search_vector needs an image-embedding index (embed head); this one holds predictions")
        return self._nearest(q, n, min_score, filters, deleted, None)

    def _nearest(self, q: np.ndarray, n: int, min_score, filters: Filters, deleted: frozenset[str],
                 exclude: str | None) -> list[Hit]:
        _check_n(n)
        q = np.asarray(q, np.float32).reshape(-1)
        dim = self.info.meta.get("vector_dim") or self.info.meta.get("dim")
        if dim and len(q) != int(dim):
            raise ConfigError(f"query vector of {len(q)} values; the index's vectors have {dim}")
        hits: list[list[Hit]] = []
        for shard in self.shards:
            if not len(shard):
                continue
            mask = self._mask(shard, filters, deleted)
            if exclude is not None:
                i = shard.local(exclude)
                if i is not None:
                    mask = np.ones(len(shard), bool) if mask is None else mask.copy()
                    mask[i] = False
            scores, rows = faiss_index.search(shard.vectors, q, n, mask)
            hits.append([shard.hit(int(r), float(s)) for s, r in zip(scores, rows, strict=True)])
        out = merge_hits(hits, n)
        return [h for h in out if h.score >= min_score] if min_score is not None else out

    def similar(self, image_id_or_vector, n: int, filters: Filters = Filters(), deleted: frozenset[str] = frozenset(),
                exclude: str | None = None) -> list[Hit]:
        """The n nearest images to an example: an image_id this group holds (then excluded from the
        answer), or a vector of the index's space (`example_vector`; `exclude` names an image_id to leave out)."""
        if not any(s.vectors is not None for s in self.shards) and self.shards:
            raise ConfigError(f"{storage.redact(self.info.uri)}: built without the feature vectors search by example needs "
                              "(--no-similar); rebuild it with `tagray index --similar`")
        if isinstance(image_id_or_vector, str):
            v = self.vector_of(image_id_or_vector)
            if v is None:
                raise UnknownImage(f"image {image_id_or_vector!r} is not in shards {', '.join(self.shard_names)}")
            exclude = image_id_or_vector
        else:
            v = image_id_or_vector
        return self._nearest(v, n, None, filters, deleted, exclude)

    def example_vector(self, x: np.ndarray) -> np.ndarray:
        """The vector `similar` takes for an image of features x (D,) or (1, D)."""
        return example_vector(self.head, np.asarray(x, np.float32).reshape(1, -1))[0]

    def _find(self, image_id: str) -> tuple[_Shard, int] | None:
        for shard in self.shards:
            i = shard.local(image_id)
            if i is not None:
                return shard, i
        return None

    def holds(self, image_id: str) -> bool:
        return self._find(image_id) is not None

    def vector_of(self, image_id: str) -> np.ndarray | None:
        """The stored example vector of an image this group holds (None if not here)."""
        found = self._find(image_id)
        if found is None or found[0].vectors is None:
            return None
        return faiss_index.reconstruct(found[0].vectors, found[1])

    def uri_of(self, image_id: str) -> str | None:
        found = self._find(image_id)
        return None if found is None else found[0].uris[found[1]].as_py()


def _check_n(n: int) -> None:
    if not (isinstance(n, (int, np.integer)) and n >= 1):
        raise ConfigError(f"n must be ≥ 1, got {n}")


def search_all(info: fmt.IndexInfo, head, *, columns: list[int] | None = None, vector: np.ndarray | None = None,
               similar: str | np.ndarray | None = None, k: int = 10, offset: int = 0, min_score: float | None = None,
               filters: Filters = Filters(), endpoint_url: str | None = None) -> list[Hit]:
    """One query over every shard in one ShardGroup, tombstones applied (what `tagray search` does):
    exactly one of `columns` (linear: tag columns), `vector` (embed: q) or `similar` (an image_id or vector)."""
    if sum(x is not None for x in (columns, vector, similar)) != 1:
        raise ConfigError("give exactly one of columns, vector or similar")
    if k < 1 or offset < 0:
        raise ConfigError(f"need k ≥ 1 and offset ≥ 0, got k={k}, offset={offset}")
    group = ShardGroup(info, list(info.shards), head, endpoint_url)
    deleted = frozenset(info.tombstones())
    n = offset + k
    if columns is not None:
        hits = group.search_tags(columns, n, min_score, filters, deleted)
    elif vector is not None:
        hits = group.search_vector(vector, n, min_score, filters, deleted)
    else:
        hits = group.similar(similar, n, filters, deleted)
        if min_score is not None:
            hits = [h for h in hits if h.score >= min_score]
    return merge_hits([hits], k, offset)


def hits_json(hits: list[Hit]) -> list[dict]:
    return [{"image_id": h.image_id, "uri": h.uri, "score": h.score, "row": h.row} for h in hits]


def shard_groups(shards: list[str], groups: int) -> list[list[str]]:
    """The index's shards dealt round robin over `groups` search groups (0: one per shard): shard i
    goes to group i mod G, so with a fixed G appended shards join the existing groups (the running
    Searcher replicas pick them up: tagray/serve/refresh.py) without moving the old ones."""
    count = min(groups or len(shards), len(shards))
    return [shards[g::count] for g in range(count)]
