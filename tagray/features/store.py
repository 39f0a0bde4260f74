"""Feature shards on disk or object storage: `DIR/part-*.parquet` plus
`DIR/errors.parquet`. A shard appears under its final name only once it is complete
(written under a `_tmp-` name readers ignore, then moved: a rename on a local disk, a
server-side copy + delete on S3, where an object appears whole or not at all), so a
killed run leaves nothing half-written behind and a re-run resumes from the shards that
exist. Every shard carries the backbone identity; files of different backbones are
never read together.

`tagray featurize` writes its shards from the Ray workers (`write_feature_block`), named
by their content (`shard_name`): a retried task rewrites the same file, never a second
copy of its rows. `tagray features import` writes from one process (`ShardWriter`).

Identities are of two kinds (`identity_kind`): "torchvision" (`tagray featurize`, no
"kind" key: name, weights, weights_digest, preprocessing, dim) and "external"
(`tagray features import`: name, dim, source, source_digest, format). A file without an
identity is refused with a message naming `tagray features import`.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import uuid
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tagray.data import schema, storage

SHARD_PATTERN = "part-*.parquet"
ERRORS_FILE = "errors.parquet"
ERRORS_SCHEMA = pa.schema(
    [("image_id", pa.string()), ("uri", pa.string()), ("stage", pa.string()), ("reason", pa.string())]
)
TMP_PREFIX = "_tmp-"  # a shard being written; never matches SHARD_PATTERN
# What a featurize worker sends the driver for each block it wrote: one row per shard
# (shard = its file name, rows = its row count, the rest null) and one row per failed image
# (shard null, rows 0, the ERRORS_SCHEMA fields); first_embedded_at: the wall-clock time
# (time.time()) the block's first batch left the backbone, on every row of the block, and
# first_batch_rows: how many of the block's images that batch held, on the block's first row
# (0 on the others). Never a feature.
RECORDS_SCHEMA = pa.schema([("shard", pa.string()), ("rows", pa.int64()), *ERRORS_SCHEMA,
                            ("first_embedded_at", pa.float64()), ("first_batch_rows", pa.int64())])


def feature_files(uri: str, endpoint_url: str | None = None) -> list[str]:
    """The feature files at `uri`: the file itself, or a directory's `part-*.parquet` shards."""
    fs, path = storage.filesystem_for(uri, endpoint_url)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [uri]
    if info.type == pafs.FileType.NotFound:
        return []
    entries = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    names = sorted(e.base_name for e in entries if e.type == pafs.FileType.File)
    return [storage.join(uri, n) for n in names if fnmatch.fnmatch(n, SHARD_PATTERN)]


IMPORT_HINT = schema.IMPORT_HINT
# Where a file may move without its features changing: the weights' and the source's URIs
# (their digests stay in the identity and must match).
MOVABLE = ("weights", "source", "ids")


def missing_message(uri: str) -> str:
    """What to say when `uri` holds no feature files at all."""
    return (f"{uri}: no feature files (expected a .parquet file or {SHARD_PATTERN} shards, written by "
            f"`tagray featurize`, or by `tagray features import` for features computed elsewhere)")


def identity_kind(identity: dict | None) -> str | None:
    """"external" (`tagray features import`) or "torchvision" (identities without a "kind",
    written by `tagray featurize`; the synthetic corpus's too); None without an identity."""
    if identity is None:
        return None
    return str(identity.get("kind", "torchvision"))


def comparable(identity: dict | None) -> dict | None:
    """The identity fields that must match for features to be mixed (the weights' or the
    source's URI may move; their digests may not), in JSON form so tuples and lists compare equal."""
    if identity is None:
        return None
    return json.loads(json.dumps({k: v for k, v in identity.items() if k not in MOVABLE}))


def describe_identity(identity: dict | None) -> str:
    """One line naming features for messages: `external features 'clip' (sha256:ab12…, D=512)`
    or `backbone 'resnet18' (weights random-seed-0, D=512)`."""
    if identity is None:
        return "features without an identity"
    if identity_kind(identity) == "external":
        digest = str(identity.get("source_digest", "?"))
        return f"external features {identity.get('name')!r} ({digest[:19]}…, D={identity.get('dim')})"
    return f"backbone {identity.get('name')!r} (weights {identity.get('weights_digest')}, D={identity.get('dim')})"


def require_same(found: dict | None, trained_on: dict | None, features_uri: str, model_dir: str) -> None:
    """SchemaError unless the features at `features_uri` are of the identity the model in
    `model_dir` was trained on (what evaluate, calibrate, index and serve check)."""
    if trained_on is not None and comparable(found) != comparable(trained_on):
        if identity_kind(trained_on) == "external":
            fix = f"import the same source under the same name with `tagray features import` ({trained_on.get('source')})"
        else:
            fix = "featurize with the same backbone and weights"
        raise schema.SchemaError(
            f"{features_uri}: {describe_identity(found)}, but {model_dir} was trained on "
            f"{describe_identity(trained_on)}: {fix}"
        )


def features_identity(uri: str, endpoint_url: str | None = None) -> dict | None:
    """The one backbone identity of all feature files at `uri` (None if there are no files);
    SchemaError when a file has no identity, its dimension disagrees with its column, or
    the files mix backbones."""
    found: dict | None = None
    first = None
    for f in feature_files(uri, endpoint_url):
        fs, path = storage.filesystem_for(f, endpoint_url)
        s = pq.read_schema(path, filesystem=fs)
        dim = schema.validate_features(s, f)
        try:
            ident = schema.backbone_identity(s)
        except schema.SchemaError as e:
            raise schema.SchemaError(f"{f}: {e}") from None
        if ident is None:
            raise schema.SchemaError(
                f"{f}: a feature file without an identity (no '{schema.BACKBONE_METADATA_KEY.decode()}' "
                f"metadata), so tagray cannot tell which features these are; {IMPORT_HINT}"
            )
        if ident.get("dim") is not None and int(ident["dim"]) != dim:
            raise schema.SchemaError(f"{f}: its identity says dim {ident['dim']}, its 'feature' column has {dim} values")
        if first is None:
            found, first = ident, f
        elif comparable(ident) != comparable(found):
            raise schema.SchemaError(
                f"{uri}: mixes features of different backbones: {first} holds {describe_identity(found)} "
                f"{found}, {f} holds {describe_identity(ident)} {ident}"
            )
    return found


def read_features(uri: str, endpoint_url: str | None = None) -> tuple[pa.Table, dict | None]:
    """All features at `uri` (a file or a shard directory) and their backbone identity."""
    files = feature_files(uri, endpoint_url)
    if not files:
        raise FileNotFoundError(missing_message(uri))
    identity = features_identity(uri, endpoint_url)
    fs, _ = storage.filesystem_for(uri, endpoint_url)
    paths = [storage.filesystem_for(f, endpoint_url)[1] for f in files]
    return pq.ParquetDataset(paths, filesystem=fs).read(), identity


def sample_features(uri: str, image_ids: pa.Array | pa.ChunkedArray, limit: int, seed: int = 0, spread: int = 8,
                    endpoint_url: str | None = None) -> pa.Table:
    """Features of at most `limit` of `image_ids` (fewer only when fewer have features), chosen
    file by file in a seeded random order: each file's image_id column is read until enough
    matches are found, at most ⌈limit / spread⌉ from any one file on the first pass (so a sample
    spans at least `spread` files when they hold enough), then topped up from the files already
    opened. Only the chosen files' rows are then read. What a calibration sample of a feature
    store of any size costs: the files it opens, not the store (a filtered read of every file would
    decode all features)."""
    files = feature_files(uri, endpoint_url)
    if not files:
        raise FileNotFoundError(missing_message(uri))
    fs, _ = storage.filesystem_for(uri, endpoint_url)
    rng = np.random.default_rng(seed)
    per_file = -(-limit // max(1, spread))
    wanted = pa.array(image_ids).cast(pa.string()) if not isinstance(image_ids, pa.ChunkedArray) \
        else image_ids.combine_chunks().cast(pa.string())
    opened: list[tuple[str, pa.Array, np.ndarray]] = []  # (path, its image ids, its matching rows shuffled)
    taken: list[int] = []
    found = 0
    for i in rng.permutation(len(files)):
        if found >= limit:
            break
        path = storage.filesystem_for(files[i], endpoint_url)[1]
        ids = pq.read_table(path, filesystem=fs, columns=["image_id"]).column("image_id").combine_chunks()
        rows = np.nonzero(pc.is_in(ids, value_set=wanted).to_numpy(zero_copy_only=False))[0]
        if len(rows):
            opened.append((path, ids, rng.permutation(rows)))
            taken.append(min(len(rows), per_file, limit - found))
            found += taken[-1]
    for j, (_, _, rows) in enumerate(opened):  # top up from the files already opened
        more = min(len(rows) - taken[j], limit - found)
        taken[j] += more
        found += more
    parts = [pq.read_table(path, filesystem=fs, filters=pc.field("image_id").isin(ids.take(pa.array(rows[:n]))))
             for (path, ids, rows), n in zip(opened, taken, strict=True) if n]
    if not parts:
        return pa.table({"image_id": pa.array([], pa.string())})
    return pa.concat_tables(parts, promote_options="permissive")


def featurized_ids(uri: str, endpoint_url: str | None = None) -> pa.Array:
    """image_ids already featurised at `uri` (empty when there is nothing yet)."""
    files = feature_files(uri, endpoint_url)
    if not files:
        return pa.array([], pa.string())
    fs, _ = storage.filesystem_for(uri, endpoint_url)
    paths = [storage.filesystem_for(f, endpoint_url)[1] for f in files]
    return pq.ParquetDataset(paths, filesystem=fs).read(columns=["image_id"]).column("image_id").combine_chunks()


def read_errors(out: str, endpoint_url: str | None = None) -> pa.Table:
    uri = storage.join(out, ERRORS_FILE)
    if not storage.exists(uri, endpoint_url):
        return ERRORS_SCHEMA.empty_table()
    return schema.read_table(uri, endpoint_url=endpoint_url).select(ERRORS_SCHEMA.names).cast(ERRORS_SCHEMA)


def write_errors(table: pa.Table, out: str, endpoint_url: str | None = None) -> str:
    uri = storage.join(out, ERRORS_FILE)
    schema.write_table(table.cast(ERRORS_SCHEMA), uri, endpoint_url)
    return uri


def shard_name(image_ids: Sequence[str]) -> str:
    """The file name of the shard holding exactly these image_ids: `part-<h>.parquet` with h
    the first 20 hex digits of SHA-256 over the sorted ids, one per line. A name made from the
    content is what makes a retried write idempotent: the same rows land in the same file."""
    h = hashlib.sha256()
    for image_id in sorted(image_ids):
        h.update(image_id.encode("utf-8") + b"\n")
    return f"part-{h.hexdigest()[:20]}.parquet"


def write_shard(table: pa.Table, out: str, name: str, endpoint_url: str | None = None) -> str:
    """Writes `table` as `out`/`name`, first under a `_tmp-` name of its own and then moved into
    place, so a reader listing `out` sees the whole shard or none of it; returns its URI. An
    existing file of that name is replaced (the same rows again, when `name` is `shard_name`)."""
    final = storage.join(out, name)
    tmp = storage.join(out, f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}")
    schema.write_table(table, tmp, endpoint_url)
    fs, tmp_path = storage.filesystem_for(tmp, endpoint_url)
    fs.move(tmp_path, storage.filesystem_for(final, endpoint_url)[1])
    return final


def remove_temporaries(out: str, endpoint_url: str | None = None) -> int:
    """Deletes the `_tmp-` files a killed run left in `out` (never read: they are not
    `part-*.parquet`); returns how many. Only for a directory no other run is writing to."""
    fs, path = storage.filesystem_for(out, endpoint_url)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return 0
    stale = [e.path for e in fs.get_file_info(pafs.FileSelector(path, recursive=False))
             if e.type == pafs.FileType.File and e.base_name.startswith(TMP_PREFIX)]
    for p in stale:
        fs.delete_file(p)
    return len(stale)


def feature_table(image_ids: Sequence[str], features: np.ndarray, dim: int, identity: dict) -> pa.Table:
    """(image_id, feature) rows in the features schema with `identity` in its metadata."""
    features = np.ascontiguousarray(features, dtype=np.float32).reshape(len(image_ids), dim)
    return pa.table(
        {
            "image_id": pa.array(list(image_ids), pa.string()),
            "feature": pa.FixedSizeListArray.from_arrays(pa.array(features.ravel()), dim),
        },
        schema=schema.with_backbone_identity(schema.features_schema(dim), identity),
    )


def write_feature_block(batch: dict[str, np.ndarray], out: str, dim: int, identity: dict,
                        endpoint_url: str | None = None) -> pa.Table:
    """Ray Data stage of `tagray featurize`, run by the workers: the images of one block
    (`image_id`, `uri`, `stage`, `reason`, `feature`, and `embedded_at` when the backbone
    stamped it; reason "" when it was featurised) → its featurised rows written as one shard
    (`write_shard` under `shard_name`), and the block's bookkeeping in RECORDS_SCHEMA (the
    shard's name and rows, the failed images, the first stamp and its batch's image count)
    returned to the driver in their place."""
    reason = np.asarray(batch["reason"], dtype=object)
    ok = reason == ""
    at = batch.get("embedded_at")
    first = {"first_embedded_at": float(np.min(at)) if at is not None and len(at) else None, "first_batch_rows": 0}
    records: list[dict] = []
    if ok.any():
        ids = [str(i) for i in np.asarray(batch["image_id"], dtype=object)[ok]]
        feats = np.asarray(batch["feature"])[ok]
        name = shard_name(ids)
        write_shard(feature_table(ids, feats, dim, identity), out, name, endpoint_url)
        records.append({"shard": name, "rows": len(ids)} | first)
    for i in np.nonzero(~ok)[0]:
        records.append({"rows": 0} | {k: None if batch[k][i] is None else str(batch[k][i])
                                      for k in ERRORS_SCHEMA.names} | first)
    if records and first["first_embedded_at"] is not None:  # a batch's rows share its one stamp
        records[0]["first_batch_rows"] = int(np.count_nonzero(at == first["first_embedded_at"]))
    return pa.Table.from_pylist(records, RECORDS_SCHEMA)


class ShardWriter:
    """Buffers (image_id, feature) rows and writes shards of `shard_rows` rows, each first
    under a temporary name and then moved into place."""

    def __init__(self, out: str, dim: int, identity: dict, shard_rows: int, endpoint_url: str | None = None):
        self.out, self.dim, self.shard_rows, self.endpoint_url = out, dim, shard_rows, endpoint_url
        self.schema = schema.with_backbone_identity(schema.features_schema(dim), identity)
        self.run_id = uuid.uuid4().hex[:8]
        self.ids: list[np.ndarray] = []
        self.feats: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[str] = []
        self.rows = 0
        storage.makedirs(out, endpoint_url)

    def add(self, image_ids: np.ndarray, features: np.ndarray) -> None:
        self.ids.append(np.asarray(image_ids, dtype=object))
        self.feats.append(np.asarray(features, dtype=np.float32))
        self.buffered += len(image_ids)
        while self.buffered >= self.shard_rows:
            self._flush(self.shard_rows)

    def close(self) -> None:
        if self.buffered:
            self._flush(self.buffered)

    def _flush(self, n: int) -> None:
        ids, feats = np.concatenate(self.ids), np.concatenate(self.feats)
        self.ids, self.feats = [ids[n:]], [feats[n:]]
        self.buffered -= n
        table = pa.table(
            {
                "image_id": pa.array(ids[:n].tolist(), pa.string()),
                "feature": pa.FixedSizeListArray.from_arrays(pa.array(feats[:n].ravel()), self.dim),
            },
            schema=self.schema,
        )
        name = f"part-{self.run_id}-{len(self.shards):05d}.parquet"
        self.shards.append(write_shard(table, self.out, name, self.endpoint_url))
        self.rows += n

    def abort(self) -> None:
        """Deletes the shards this writer wrote (a failed import leaves nothing behind)."""
        self.ids, self.feats, self.buffered = [], [], 0
        for uri in self.shards:
            fs, path = storage.filesystem_for(uri, self.endpoint_url)
            fs.delete_file(path)
        self.shards, self.rows = [], 0

