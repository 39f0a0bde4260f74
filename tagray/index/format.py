"""The sharded index on disk or object storage (issue 15, parts 2 and 4).

    OUT/index.json            the commit point, written LAST by the driver: format, kind, model
                              digest, `version` (bumped by every build, append, delete and
                              compact), the shards it consists of, the tombstones file
    OUT/shard-NNNNN/          one self-describing directory per shard, written by a Ray worker:
        shard.json            written last inside the shard: format, kind, model digest, image
                              count, image range (first/last image_id, first/last global row),
                              columns kept, layout or faiss factory
        images.parquet        image_id, uri, row (global position: the tie-break), kept columns
        log_p.npy             linear heads: log P(z=1|x), (T, n) float16, tag-major (layout.py)
        vectors.faiss         embed head: f = h(x); linear heads: the L2-normalised features
                              ("search by example", optional)
    OUT/tombstones-vN.txt     image_ids deleted since the last compaction, one per line (a new
                              file per version, so the file index.json names never changes)

A shard directory that index.json does not list is garbage from a build that did not commit
(`orphans` names them; a build removes them before it writes), so a crash mid-build leaves the
index at its old version and a re-run writes the same shard names again without duplicates.
A single-directory index of older tagray versions (index.json without `format`) is read as one
shard named "." (read only: appends, deletes and compactions ask for a rebuild).
"""

from __future__ import annotations

import json
import posixpath
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs

from tagray import jsonio
from tagray.config import ConfigError
from tagray.data import schema, storage

FORMAT = "tagray-index"
FORMAT_VERSION = 2
INDEX_FILE = "index.json"
SHARD_FILE = "shard.json"
IMAGES_FILE = "images.parquet"
LOG_P_FILE = "log_p.npy"
VECTORS_FILE = "vectors.faiss"
SHARD_PREFIX = "shard-"
LEGACY_SHARD = "."
KINDS = ("predictions", "embeddings")


def shard_name(number: int) -> str:
    return f"{SHARD_PREFIX}{number:05d}"


def shard_number(name: str) -> int:
    return int(name[len(SHARD_PREFIX):])


@dataclass(frozen=True)
class IndexInfo:
    """What index.json says: enough to plan a build or hand shards to Searcher replicas."""

    uri: str
    kind: str  # "predictions" | "embeddings"
    version: int
    shards: tuple[str, ...]
    meta: dict = field(hash=False, compare=False)
    columns: tuple[str, ...] = ()
    endpoint_url: str | None = None

    @property
    def legacy(self) -> bool:
        return self.shards == (LEGACY_SHARD,)

    @property
    def images(self) -> int:
        return int(self.meta.get("images", 0))

    def shard_meta(self, name: str) -> dict:
        for s in self.meta.get("shard_list", []):
            if s["name"] == name:
                return s
        raise ConfigError(f"{storage.redact(self.uri)}: no shard {name!r} in version {self.version} "
                          f"(shards: {', '.join(self.shards)})")

    def shard_uri(self, name: str) -> str:
        return self.uri if name == LEGACY_SHARD else storage.join(self.uri, name)

    def tombstones(self) -> set[str]:
        """The image_ids deleted since the last compaction (applied at query time)."""
        name = self.meta.get("tombstones")
        if not name:
            return set()
        text = storage.read_text(storage.join(self.uri, name), self.endpoint_url)
        return {line for line in text.splitlines() if line}

    def image_ids(self) -> pa.Array:
        """Every indexed image_id (tombstoned ones included), shard by shard in row order."""
        chunks = [schema.read_table(storage.join(self.shard_uri(s), IMAGES_FILE), ["image_id"], self.endpoint_url)
                  .column("image_id").combine_chunks() for s in self.shards]
        return pa.concat_arrays(chunks) if chunks else pa.array([], pa.string())


def open_index(uri: str, endpoint_url: str | None = None) -> IndexInfo:
    """The index at `uri` as of its index.json (cheap: no shard is read)."""
    meta_uri = storage.join(uri, INDEX_FILE)
    if not storage.exists(meta_uri, endpoint_url):
        raise FileNotFoundError(f"{storage.redact(uri)}: not a tagray index (no {INDEX_FILE}); build one with `tagray index`")
    meta = json.loads(storage.read_text(meta_uri, endpoint_url))
    if meta.get("format") is None:  # a single-directory index of an older tagray
        return IndexInfo(uri, meta.get("kind", "embeddings"), 0, (LEGACY_SHARD,), meta, (), endpoint_url)
    if meta.get("format") != FORMAT or int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise schema.SchemaError(f"{storage.redact(meta_uri)}: index format {meta.get('format')!r} version "
                                 f"{meta.get('format_version')}; this tagray reads {FORMAT} ≤ {FORMAT_VERSION}")
    if meta.get("kind") not in KINDS:
        raise schema.SchemaError(f"{storage.redact(meta_uri)}: kind {meta.get('kind')!r}; expected one of {KINDS}")
    shards = tuple(s["name"] for s in meta.get("shard_list", []))
    return IndexInfo(uri, meta["kind"], int(meta["version"]), shards, meta, tuple(meta.get("columns", ())), endpoint_url)


def read_shard_meta(shard_uri: str, endpoint_url: str | None = None) -> dict:
    return json.loads(storage.read_text(storage.join(shard_uri, SHARD_FILE), endpoint_url))


def write_json_atomic(uri: str, obj: dict, what: str, endpoint_url: str | None = None) -> None:
    """One JSON file replaced atomically: a rename on local disks, one PUT on object stores."""
    text = jsonio.dumps(obj, what, indent=1)
    fs, path = storage.filesystem_for(uri, endpoint_url)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{uri}.tmp-{time.monotonic_ns()}"
        storage.write_text(tmp, text, endpoint_url)
        fs.move(storage.filesystem_for(tmp, endpoint_url)[1], path)
    else:
        storage.write_text(uri, text, endpoint_url)


def commit(uri: str, meta: dict, endpoint_url: str | None = None) -> IndexInfo:
    """Writes index.json (the commit point) and returns the index it now describes."""
    meta = dict(meta, format=FORMAT, format_version=FORMAT_VERSION, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    meta["images"] = sum(int(s["images"]) for s in meta["shard_list"])
    write_json_atomic(storage.join(uri, INDEX_FILE), meta, INDEX_FILE, endpoint_url)
    return open_index(uri, endpoint_url)


def listed_entries(uri: str, endpoint_url: str | None = None) -> list[str]:
    """Names directly under `uri` (directories and files; key prefixes on object stores)."""
    fs, path = storage.filesystem_for(uri, endpoint_url)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return []
    entries = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    names = set()
    for e in entries:
        names.add(posixpath.relpath(e.path, path).split("/")[0])
    return sorted(names)


def orphans(uri: str, listed: tuple[str, ...], endpoint_url: str | None = None) -> list[str]:
    """Shard directories under `uri` that index.json does not list (an uncommitted build's)."""
    return [n for n in listed_entries(uri, endpoint_url) if n.startswith(SHARD_PREFIX) and n not in listed]


def remove_tree(uri: str, endpoint_url: str | None = None) -> None:
    fs, path = storage.filesystem_for(uri, endpoint_url)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)
    else:  # an object-store prefix
        for e in fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True)):
            if e.type == pafs.FileType.File:
                fs.delete_file(e.path)


def next_shard_number(info: IndexInfo | None, uri: str, endpoint_url: str | None = None) -> int:
    """The first shard number a new build of `uri` may use: past every listed shard. Unlisted
    (orphan) directories are removed before writing, so their numbers are reused."""
    if info is None or info.legacy or not info.shards:
        return int(info.meta.get("next_shard", 0)) if info is not None and not info.legacy else 0
    return max(int(info.meta.get("next_shard", 0)), max(shard_number(s) for s in info.shards) + 1)
