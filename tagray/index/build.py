"""Building, appending to, deleting from and compacting a sharded index on Ray Data (issue 15
parts 2 and 4; the on-disk format is tagray/index/format.py).

The driver only does bookkeeping: it reads Parquet footers (row counts), the features' identity,
for an append the image_ids already indexed, plans which global rows go to which shard, and
writes index.json LAST. The work runs in an actor pool — `ray.data.from_items(tasks)
.map_batches(ShardBuilder, …)`, a callable class that loads the head once per actor — where
each task reads its rows of the feature files straight from storage, computes log P(z=1|x)
(linear/refine heads) or f = h(x) (embed head) batch by batch, and writes one shard directory
(`shard.json` last). Each shard covers a contiguous range of global rows, so the global row (the
tie-break of every search) is the row's position in the feature files, in file-name order, for a
fresh build, and continues from the index's `next_row` for an append.

An index needing training (an IVF/PQ factory) is trained once, by one Ray task, on a seeded
sample of `train_sample` rows, and saved as `trained-vN.faiss`; every shard (and every later
append) starts from that file, so scores are comparable across shards.
"""

from __future__ import annotations

import io
import json
import logging
import os
import resource
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from tagray import jsonio
from tagray.config import ConfigError
from tagray.data import schema, storage
from tagray.features import store
from tagray.index import faiss_index, layout
from tagray.index import format as fmt
from tagray.index.model import (
    check_index_matches,
    embed,
    index_kind,
    log_p_true,
    model_identity,
    normalised,
)
from tagray.resources import bounded_start, plan_pool, released

log = logging.getLogger(__name__)

DEFAULT_COLUMNS = ("user_id", "date_taken")


@dataclass(frozen=True)
class IndexBuildConfig:
    """How `tagray index` builds (its flags; these defaults are the only ones)."""

    shards: int = 1  # K: index shards written by this build (or this append)
    columns: tuple[str, ...] | None = None  # manifest columns kept for filters; None: user_id, date_taken where present
    date_column: str = "date_taken"  # the column taken_after / taken_before compare with
    factory: str = "flat"  # faiss index_factory string of the vector store (embed head; linear: similar)
    train_sample: int = 100_000  # rows an IVF/PQ factory is trained on (seeded sample)
    similar: bool = True  # linear heads: keep the normalised features for search by example
    gpu: bool = False  # faiss on a GPU where faiss has GPU support (else CPU, with a log line)
    batch_size: int = 16_384  # rows per forward pass in a worker
    worker_cpus: float = 1.0  # CPUs each builder actor reserves
    workers: int | None = None  # actors at most (default: K, within the cluster's CPUs; starts with those that fit)
    resources_wait_s: float | None = None  # fail when no builder actor gets its CPUs in this time (None: 600 s)
    seed: int = 0  # the training sample's seed
    nprobe: int = 16  # IVF lists searched (stored in index.json, set when a shard loads)
    ef_search: int = 64  # HNSW efSearch

    def __post_init__(self) -> None:
        if not (isinstance(self.shards, int) and self.shards >= 1):
            raise ConfigError(f"--shards must be ≥ 1, got {self.shards}")
        if not self.train_sample >= 1:
            raise ConfigError(f"--train-sample must be ≥ 1, got {self.train_sample}")
        if not self.batch_size >= 1:
            raise ConfigError(f"batch_size must be ≥ 1, got {self.batch_size}")
        if not self.worker_cpus > 0:
            raise ConfigError(f"worker_cpus must be > 0, got {self.worker_cpus}")
        if self.workers is not None and not self.workers >= 1:
            raise ConfigError(f"workers must be ≥ 1, got {self.workers}")
        if self.resources_wait_s is not None and not self.resources_wait_s > 0:
            raise ConfigError(f"resources_wait_s must be > 0 (or null), got {self.resources_wait_s}")
        if not (self.nprobe >= 1 and self.ef_search >= 1):
            raise ConfigError("nprobe and ef_search must be ≥ 1")


# --- planning (driver) -------------------------------------------------------------------------

def file_rows(files: list[str], endpoint_url: str | None) -> list[int]:
    """Row counts of the feature files, from their Parquet footers."""
    counts = []
    for f in files:
        fs, path = storage.filesystem_for(f, endpoint_url)
        counts.append(pq.ParquetFile(path, filesystem=fs).metadata.num_rows)
    return counts


def runs_of(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) runs of True in a bool mask."""
    if not len(mask):
        return []
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist(), strict=True))


def split_runs(runs: list[tuple[int, int, int]], shards: int) -> list[list[tuple[int, int, int]]]:
    """Selected rows, as (file number, start, stop) runs in global order, cut into `shards`
    nearly equal contiguous parts (empty parts dropped)."""
    total = sum(b - a for _, a, b in runs)
    bounds = [total * k // shards for k in range(shards + 1)]
    parts: list[list[tuple[int, int, int]]] = [[] for _ in range(shards)]
    pos = 0
    for f, a, b in runs:
        while a < b:
            k = next(i for i in range(shards) if bounds[i] <= pos < bounds[i + 1])
            take = min(b - a, bounds[k + 1] - pos)
            parts[k].append((f, a, a + take))
            a += take
            pos += take
    return [p for p in parts if p]


def manifest_columns(manifest: str | None, cfg: IndexBuildConfig, endpoint_url: str | None) -> tuple[list[str], str | None]:
    """(kept columns, the date column if kept), checked against the manifest's schema."""
    if manifest is None:
        if cfg.columns:
            raise ConfigError(f"--columns {','.join(cfg.columns)}: needs --manifest (the columns come from it)")
        return [], None
    fs, path = storage.filesystem_for(manifest, endpoint_url)
    try:
        sch = pads.dataset(path, filesystem=fs, format="parquet").schema
    except (FileNotFoundError, pa.ArrowInvalid) as e:
        raise FileNotFoundError(f"{storage.redact(manifest)}: no such manifest ({str(e)[:120]})") from None
    schema.validate_manifest(sch, manifest)
    wanted = list(cfg.columns) if cfg.columns is not None else [c for c in DEFAULT_COLUMNS if c in sch.names]
    for c in wanted:
        if c not in sch.names:
            raise ConfigError(f"--columns: unknown column {c!r}: the manifest {storage.redact(manifest)} has "
                              f"{', '.join(sch.names)}")
        t = sch.field(c).type
        if pa.types.is_nested(t):
            raise ConfigError(f"--columns: column {c!r} is a {schema.describe(t)}; only scalar columns can be kept for filters")
        if c in ("image_id", "uri", "row"):
            raise ConfigError(f"--columns: {c!r} is always kept; list only filter columns")
    return wanted, (cfg.date_column if cfg.date_column in wanted else None)


def read_id_column(files: list[str], endpoint_url: str | None) -> list[pa.Array]:
    out = []
    for f in files:
        fs, path = storage.filesystem_for(f, endpoint_url)
        out.append(pq.read_table(path, filesystem=fs, columns=["image_id"]).column("image_id").combine_chunks())
    return out


# --- the workers ---------------------------------------------------------------------------------

def iter_rows(uri: str, start: int, stop: int, batch_rows: int, endpoint_url: str | None):
    """(image_ids, features (B, D) float32) of rows [start, stop) of a feature file, in batches,
    reading only the row groups that hold them."""
    fs, path = storage.filesystem_for(uri, endpoint_url)
    pf = pq.ParquetFile(path, filesystem=fs)
    lo = 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if lo + n > start and lo < stop:
            pos = lo
            for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[g], columns=["image_id", "feature"]):
                a, b = max(start, pos), min(stop, pos + batch.num_rows)
                if a < b:
                    part = batch.slice(a - pos, b - a)
                    feats = part.column("feature")
                    dim = feats.type.list_size
                    x = feats.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
                    yield part.column("image_id"), np.ascontiguousarray(x, np.float32)
                pos += batch.num_rows
        lo += n
        if lo >= stop:
            break


def _as_strings(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_timestamp(col.type):
        return pc.strftime(col, "%Y-%m-%dT%H:%M:%S")
    if pa.types.is_date(col.type):
        return pc.strftime(col, "%Y-%m-%d")
    return pc.cast(col, pa.string())


def images_table(ids: pa.Array, first_row: int | np.ndarray, manifest: str | None, columns: list[str],
                 endpoint_url: str | None) -> pa.Table:
    """image_id, uri, row and the kept columns (as strings) of a shard's images, read from the
    manifest by this worker (only the rows of these ids)."""
    n = len(ids)
    rows = np.arange(first_row, first_row + n, dtype=np.int64) if np.isscalar(first_row) else first_row
    out = {"image_id": ids, "uri": pa.nulls(n, pa.string()), "row": pa.array(rows, pa.int64())}
    for c in columns:
        out[c] = pa.nulls(n, pa.string())
    if manifest is not None:
        fs, path = storage.filesystem_for(manifest, endpoint_url)
        want = ["image_id", "uri", *columns]
        m = pads.dataset(path, filesystem=fs, format="parquet").to_table(
            columns=want, filter=pc.field("image_id").isin(ids))
        where = pc.index_in(ids, value_set=m.column("image_id"))
        for c in ["uri", *columns]:
            out[c] = _as_strings(pc.take(m.column(c), where))
    return pa.table(out)


def _write_npy(uri: str, array: np.ndarray, endpoint_url: str | None) -> None:
    fs, path = storage.filesystem_for(uri, endpoint_url)
    if isinstance(fs, pa.fs.LocalFileSystem):
        with open(path, "wb") as f:
            np.save(f, array)
    else:
        buf = io.BytesIO()
        np.save(buf, array)
        storage.write_bytes(uri, buf.getvalue(), endpoint_url)


def _read_npy(uri: str, endpoint_url: str | None) -> np.ndarray:
    fs, path = storage.filesystem_for(uri, endpoint_url)
    if isinstance(fs, pa.fs.LocalFileSystem):
        return np.load(path)
    return np.load(io.BytesIO(storage.read_bytes(uri, endpoint_url)))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class ShardBuilder:
    """One actor of the pool: loads the head once, then builds (or compacts) the shards of the
    tasks it is given, each written straight to storage. Returns one JSON row per task: the
    shard's meta plus this worker's pid and peak RSS."""

    def __init__(self, spec: dict) -> None:
        import torch

        from tagray.heads.models import load_image_tagger

        torch.set_num_threads(max(1, int(spec["worker_cpus"])))
        self.spec = spec
        self.endpoint = spec["endpoint_url"]
        self.head = load_image_tagger(spec["model"], self.endpoint) if spec.get("model") else None
        trained = spec.get("trained")
        self.trained = storage.read_bytes(storage.join(spec["out"], trained), self.endpoint) if trained else None

    def __call__(self, batch: dict) -> dict:
        out = []
        for task in batch["task"]:
            task = json.loads(task)
            t0 = time.perf_counter()
            meta = self.build(task) if task["op"] == "build" else self.compact(task)
            meta["worker"] = {"pid": os.getpid(), "peak_rss_mb": peak_rss_mb(), "seconds": time.perf_counter() - t0}
            out.append(jsonio.dumps(meta, "shard meta"))
        return {"meta": np.array(out, dtype=object)}

    def _vectors_of(self, x: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        return out if self.spec["kind"] == "embeddings" else normalised(x)

    def build(self, task: dict) -> dict:
        spec, endpoint = self.spec, self.endpoint
        n = sum(b - a for _, a, b in task["pieces"])
        shard_uri = storage.join(spec["out"], task["shard"])
        storage.makedirs(shard_uri, endpoint)
        kind = spec["kind"]
        log_p = np.empty((spec["tags"], n), np.float16) if kind == "predictions" else None
        vectors = (faiss_index.Filling(self.trained, spec["factory"], spec["vector_dim"], spec["gpu"])
                   if spec["vectors"] else None)
        ids, pos = [], 0
        for f, a, b in task["pieces"]:
            for batch_ids, x in iter_rows(spec["files"][f], a, b, spec["batch_size"], endpoint):
                m = len(batch_ids)
                f_out = None
                if kind == "predictions":
                    log_p[:, pos : pos + m] = layout.to_layout(log_p_true(self.head, x))
                else:
                    f_out = embed(self.head, x)
                if vectors is not None:
                    vectors.add(self._vectors_of(x, f_out))
                ids.append(batch_ids)
                pos += m
        if pos != n:
            raise schema.SchemaError(f"{task['shard']}: read {pos} feature rows, planned {n} (did the feature files change?)")
        ids = pa.concat_arrays([i.combine_chunks() if isinstance(i, pa.ChunkedArray) else i for i in ids])
        images = images_table(ids, task["first_row"], spec["manifest"], spec["columns"], endpoint)
        return self._write(shard_uri, task["shard"], images, log_p, vectors.finish() if vectors is not None else None)

    def compact(self, task: dict) -> dict:
        """Rewrites shard `src` as `dst` without the rows of `drop` (tombstoned image_ids)."""
        spec, endpoint = self.spec, self.endpoint
        src = storage.join(spec["out"], task["src"])
        images = schema.read_table(storage.join(src, fmt.IMAGES_FILE), endpoint_url=endpoint)
        keep = ~pc.is_in(images.column("image_id"), value_set=pa.array(task["drop"], pa.string())).to_numpy(
            zero_copy_only=False)
        rows = np.flatnonzero(keep)
        log_p = None
        if spec["kind"] == "predictions":
            log_p = np.ascontiguousarray(_read_npy(storage.join(src, fmt.LOG_P_FILE), endpoint)[:, rows])
        index = None
        vec_uri = storage.join(src, fmt.VECTORS_FILE)
        if storage.exists(vec_uri, endpoint):
            old = faiss_index.deserialise(storage.read_bytes(vec_uri, endpoint))
            kept = faiss_index.reconstruct_all(old)[rows]
            old.reset()  # keeps the training (IVF lists, PQ codebooks): the same quantiser as every shard
            old.add(np.ascontiguousarray(kept, np.float32))
            index = old
        dst = storage.join(spec["out"], task["dst"])
        storage.makedirs(dst, endpoint)
        return self._write(dst, task["dst"], images.take(pa.array(rows)), log_p, index)

    def _write(self, shard_uri: str, name: str, images: pa.Table, log_p: np.ndarray | None, index) -> dict:
        spec, endpoint = self.spec, self.endpoint
        schema.write_table(images, storage.join(shard_uri, fmt.IMAGES_FILE), endpoint)
        if log_p is not None:
            _write_npy(storage.join(shard_uri, fmt.LOG_P_FILE), log_p, endpoint)
        if index is not None:
            storage.write_bytes(storage.join(shard_uri, fmt.VECTORS_FILE), faiss_index.serialise(index), endpoint)
        n = images.num_rows
        ids, rows = images.column("image_id"), images.column("row")
        meta = {"format": fmt.FORMAT, "format_version": fmt.FORMAT_VERSION, "name": name, "kind": spec["kind"],
                **spec["identity"], "images": n,
                "first_image_id": ids[0].as_py() if n else None, "last_image_id": ids[n - 1].as_py() if n else None,
                "first_row": rows[0].as_py() if n else None, "last_row": rows[n - 1].as_py() if n else None,
                "columns": spec["columns"], "layout": layout.LAYOUT if spec["kind"] == "predictions" else None,
                "factory": spec["factory"] if index is not None else None,
                "bytes": {"log_p": int(log_p.nbytes) if log_p is not None else 0}}
        storage.write_text(storage.join(shard_uri, fmt.SHARD_FILE), jsonio.dumps(meta, fmt.SHARD_FILE, indent=1), endpoint)
        return meta


def _train_task(spec: dict, pieces: list, name: str) -> int:
    """A Ray task: the vectors of the sampled rows, faiss training, `name` written under OUT."""
    from tagray.heads.models import load_image_tagger

    head = load_image_tagger(spec["model"], spec["endpoint_url"])
    chunks = []
    for f, rows in pieces:
        fs, path = storage.filesystem_for(spec["files"][f], spec["endpoint_url"])
        table = pq.read_table(path, filesystem=fs, columns=["feature"]).take(pa.array(rows))
        x = table.column("feature").combine_chunks()
        x = x.flatten().to_numpy(zero_copy_only=False).reshape(-1, x.type.list_size).astype(np.float32)
        chunks.append(embed(head, x) if spec["kind"] == "embeddings" else normalised(x))
    sample = np.concatenate(chunks)
    storage.write_bytes(storage.join(spec["out"], name), faiss_index.train(spec["factory"], sample, spec["gpu"]),
                        spec["endpoint_url"])
    return len(sample)


def run_pool(tasks: list[dict], spec: dict, cfg: IndexBuildConfig) -> list[dict]:
    """The tasks through an actor pool of ShardBuilders (Ray Data map_batches); their metas. The
    pool starts with the builders that fit the free CPUs and grows to `cfg.workers` (default: one
    per task, within the cluster's CPUs) as more free up (tagray.resources)."""
    import ray

    if not tasks:
        return []
    cpus = float(ray.cluster_resources().get("CPU", 1))
    most = max(1, min(len(tasks), cfg.workers or len(tasks), int(cpus // cfg.worker_cpus)))
    gpus = 1 if spec["gpu"] and ray.cluster_resources().get("GPU", 0) >= 1 else 0
    if spec["gpu"] and not gpus:
        log.info("--gpu: the Ray cluster has no GPU; building on CPU")
    spec = dict(spec, gpu=bool(gpus) and spec["gpu"])
    pool = plan_pool("the index builders", most, cfg.worker_cpus, gpus, wait_s=cfg.resources_wait_s)
    ds = ray.data.from_items([{"task": json.dumps(t)} for t in tasks], override_num_blocks=len(tasks))
    out = ds.map_batches(ShardBuilder, fn_constructor_kwargs={"spec": spec}, batch_size=1, batch_format="numpy",
                         compute=pool.strategy(), num_cpus=pool.cpus, num_gpus=pool.gpus)
    failure = None
    try:
        with bounded_start(out, pool):
            metas = [json.loads(r["meta"]) for r in out.take_all()]
    except Exception as e:
        failure = e
    if failure is not None:
        raise released(failure)  # the builders' CPUs free for a re-run in this process
    return sorted(metas, key=lambda m: m["name"])


def _spec(head, model_dir: str, out: str, files: list[str], manifest: str | None, columns: list[str], kind: str,
          factory: str, vectors: bool, vector_dim: int, cfg: IndexBuildConfig, endpoint_url: str | None,
          trained: str | None) -> dict:
    return {"model": model_dir, "out": out, "files": files, "manifest": manifest, "columns": columns, "kind": kind,
            "factory": factory, "vectors": vectors, "vector_dim": vector_dim, "gpu": cfg.gpu,
            "batch_size": cfg.batch_size, "worker_cpus": cfg.worker_cpus, "endpoint_url": endpoint_url,
            "identity": model_identity(head), "tags": int(head.model.tags) if kind == "predictions" else 0,
            "trained": trained}


def _summary(info: fmt.IndexInfo, metas: list[dict], t0: float, what: str) -> dict:
    rows = sum(m["images"] for m in metas)
    secs = time.perf_counter() - t0
    return {"what": what, "index": storage.redact(info.uri), "version": info.version, "kind": info.kind,
            "images": info.images, "shards": len(info.shards), "new_shards": [m["name"] for m in metas],
            "rows": rows, "seconds": secs, "rows_per_s": rows / secs if secs > 0 else None,
            "workers": [m["worker"] for m in metas], "driver_peak_rss_mb": peak_rss_mb()}


def _existing(out: str, endpoint_url: str | None) -> fmt.IndexInfo | None:
    return fmt.open_index(out, endpoint_url) if storage.exists(storage.join(out, fmt.INDEX_FILE), endpoint_url) else None


def _require_sharded(info: fmt.IndexInfo | None, out: str, what: str) -> fmt.IndexInfo:
    if info is None:
        raise FileNotFoundError(f"{storage.redact(out)}: no index to {what} (no {fmt.INDEX_FILE}); build one with `tagray index`")
    if info.legacy:
        raise ConfigError(f"{storage.redact(out)}: a single-directory index of an older tagray cannot {what}; "
                          "rebuild it with `tagray index` (without --append)")
    return info


@dataclass
class Plan:
    """What a build or an append will do, worked out (and checked) before any Ray work starts."""

    files: list[str]
    counts: list[int]
    dim: int
    kind: str
    info: fmt.IndexInfo | None
    columns: list[str]
    date_column: str | None
    factory: str
    vectors: bool
    trained: str | None


def plan(head, model_dir: str, features: str, out: str, manifest: str | None = None,
         cfg: IndexBuildConfig = IndexBuildConfig(), endpoint_url: str | None = None, append: bool = False) -> Plan:
    """Checks the inputs of a build (features' identity against the model, the manifest's columns,
    the factory string, for an append the index's model) from metadata alone: no Ray needed."""
    files = store.feature_files(features, endpoint_url)
    if not files:
        raise FileNotFoundError(store.missing_message(features))
    identity = store.features_identity(features, endpoint_url)
    store.require_same(identity, head.backbone, features, model_dir)
    fs, path0 = storage.filesystem_for(files[0], endpoint_url)
    dim = schema.validate_features(pq.read_schema(path0, filesystem=fs), files[0])
    kind = index_kind(head)
    info = _existing(out, endpoint_url)
    if append:
        info = _require_sharded(info, out, "be appended to")
        check_index_matches(info.meta, head, storage.redact(out))
        columns, date_column = list(info.columns), info.meta.get("date_column")
        if manifest is None and columns:
            raise ConfigError(f"--append: the index keeps columns {', '.join(columns)}: give the --manifest they come from")
        factory, vectors, trained = info.meta.get("factory") or cfg.factory, bool(info.meta.get("vectors")), info.meta.get("trained")
    else:
        columns, date_column = manifest_columns(manifest, cfg, endpoint_url)
        factory, vectors, trained = cfg.factory, kind == "embeddings" or cfg.similar, None
        faiss_index.empty_index(factory, dim if kind == "predictions" else int(head.vectors.shape[1]))  # checks the string
    return Plan(files, file_rows(files, endpoint_url), dim, kind, info, columns, date_column, factory, vectors, trained)


def build_index(head, model_dir: str, features: str, out: str, manifest: str | None = None,
                cfg: IndexBuildConfig = IndexBuildConfig(), endpoint_url: str | None = None,
                append: bool = False) -> dict:
    """Builds the index of `head` over the features at `features` into `out` (a new version of
    whatever is there), or with `append` adds the images not yet indexed as new shards. Ray must
    be initialised. Returns a summary (rows/s, the workers' peak RSS)."""
    t0 = time.perf_counter()
    p = plan(head, model_dir, features, out, manifest, cfg, endpoint_url, append)
    files, counts, dim, kind, info = p.files, p.counts, p.dim, p.kind, p.info
    columns, date_column, factory, vectors, trained = p.columns, p.date_column, p.factory, p.vectors, p.trained
    if append:
        present = info.image_ids()
        runs = []
        for f, ids in enumerate(read_id_column(files, endpoint_url)):
            new = ~pc.is_in(ids, value_set=present).to_numpy(zero_copy_only=False)
            runs += [(f, a, b) for a, b in runs_of(new)]
        base_row, first_shard = int(info.meta.get("next_row", info.images)), fmt.next_shard_number(info, out, endpoint_url)
    else:
        runs = [(f, 0, c) for f, c in enumerate(counts) if c]
        base_row = 0
        first_shard = fmt.next_shard_number(info, out, endpoint_url) if info is not None else 0
    vector_dim = dim if kind == "predictions" else int(head.vectors.shape[1])
    new_rows = sum(b - a for _, a, b in runs)
    if append and new_rows == 0:
        return {**_summary(info, [], t0, "append"), "unchanged": True}

    listed = info.shards if info is not None else ()
    for orphan in fmt.orphans(out, listed, endpoint_url):  # an earlier build's uncommitted shards
        fmt.remove_tree(storage.join(out, orphan), endpoint_url)
    version = (info.version if info is not None else 0) + 1
    storage.makedirs(out, endpoint_url)

    if vectors and not append and faiss_index.needs_training(factory, vector_dim):
        trained = f"trained-v{version}.faiss"
        _train(head, model_dir, out, files, counts, kind, factory, vector_dim, cfg, endpoint_url, trained)

    parts = split_runs(runs, cfg.shards)
    tasks, row = [], base_row
    for k, part in enumerate(parts):
        tasks.append({"op": "build", "shard": fmt.shard_name(first_shard + k), "first_row": row, "pieces": part})
        row += sum(b - a for _, a, b in part)
    spec = _spec(head, model_dir, out, files, manifest, columns, kind, factory, vectors, vector_dim, cfg,
                 endpoint_url, trained)
    metas = run_pool(tasks, spec, cfg)
    keep = list(info.meta["shard_list"]) if append else []
    shard_list = keep + [_listing(m) for m in metas]
    meta = {"kind": kind, "model": model_dir, **model_identity(head), "version": version, "columns": columns,
            "date_column": date_column, "layout": layout.LAYOUT if kind == "predictions" else None,
            "factory": factory if vectors else None, "vectors": vectors, "vector_dim": vector_dim if vectors else None,
            "trained": trained, "nprobe": cfg.nprobe, "ef_search": cfg.ef_search,
            "tombstones": info.meta.get("tombstones") if append else None,
            "shard_list": shard_list, "next_row": row, "next_shard": first_shard + len(tasks),
            "created": info.meta.get("created") if append else time.strftime("%Y-%m-%dT%H:%M:%S"),
            "build": {"shards": cfg.shards, "train_sample": cfg.train_sample, "seed": cfg.seed, "features": features}}
    new = fmt.commit(out, meta, endpoint_url)
    if not append and info is not None:
        _remove_old(out, info, new, endpoint_url)
    return _summary(new, metas, t0, "append" if append else "build")


def _listing(m: dict) -> dict:
    return {k: m[k] for k in ("name", "images", "first_image_id", "last_image_id", "first_row", "last_row")}


def _remove_old(out: str, old: fmt.IndexInfo, new: fmt.IndexInfo, endpoint_url: str | None) -> None:
    """After a commit: the files of the old version that the new one does not use."""
    if old.legacy:
        for name in ("predictions.npy", "images.faiss", "images.parquet"):
            if storage.exists(storage.join(out, name), endpoint_url):
                fmt.remove_tree(storage.join(out, name), endpoint_url)
        return
    for s in set(old.shards) - set(new.shards):
        fmt.remove_tree(storage.join(out, s), endpoint_url)
    for key in ("tombstones", "trained"):
        name = old.meta.get(key)
        if name and name != new.meta.get(key) and storage.exists(storage.join(out, name), endpoint_url):
            fmt.remove_tree(storage.join(out, name), endpoint_url)


def _train(head, model_dir, out, files, counts, kind, factory, vector_dim, cfg, endpoint_url, name) -> None:
    """A seeded sample of `train_sample` global rows → one Ray task trains the factory's index."""
    import ray

    total = sum(counts)
    rng = np.random.default_rng(cfg.seed)
    picked = np.sort(rng.choice(total, size=min(cfg.train_sample, total), replace=False))
    starts = np.cumsum([0, *counts])
    pieces = []
    for f in range(len(files)):
        sel = picked[(picked >= starts[f]) & (picked < starts[f + 1])] - starts[f]
        if len(sel):
            pieces.append((f, sel.tolist()))
    spec = _spec(head, model_dir, out, files, None, [], kind, factory, True, vector_dim, cfg, endpoint_url, None)
    gpus = 1 if cfg.gpu and ray.cluster_resources().get("GPU", 0) >= 1 else 0
    task = ray.remote(num_cpus=cfg.worker_cpus, num_gpus=gpus)(_train_task)
    ray.get(task.remote(dict(spec, gpu=bool(gpus)), pieces, name))


# --- deletes and compaction ----------------------------------------------------------------------

def parse_ids(ids: str, endpoint_url: str | None = None) -> list[str]:
    """--delete: a file of image_ids (one per line) or a comma-separated list."""
    if storage.is_remote(ids) or os.path.isfile(ids):
        found = [line.strip() for line in storage.read_text(ids, endpoint_url).splitlines() if line.strip()]
    else:
        found = [i.strip() for i in ids.split(",") if i.strip()]
    if not found:
        raise ConfigError(f"--delete {ids!r}: no image_ids")
    return found


def delete(out: str, ids: list[str], endpoint_url: str | None = None) -> dict:
    """Tombstones `ids` (those in the index): a new tombstones file and index.json version; the
    shards are untouched and searches leave the ids out until `compact` removes them."""
    info = _require_sharded(_existing(out, endpoint_url), out, "take deletes")
    present = info.image_ids()
    wanted = pa.array(sorted(set(ids)), pa.string())
    found = pc.filter(wanted, pc.is_in(wanted, value_set=present)).to_pylist()
    dead = info.tombstones() | set(found)
    name = f"tombstones-v{info.version + 1}.txt"
    storage.write_text(storage.join(out, name), "".join(f"{i}\n" for i in sorted(dead)), endpoint_url)
    new = fmt.commit(out, dict(info.meta, version=info.version + 1, tombstones=name), endpoint_url)
    old = info.meta.get("tombstones")
    if old and storage.exists(storage.join(out, old), endpoint_url):
        fmt.remove_tree(storage.join(out, old), endpoint_url)
    return {"what": "delete", "version": new.version, "deleted": len(found), "not_in_index": len(set(ids)) - len(found),
            "tombstones": len(dead)}


def compact(out: str, cfg: IndexBuildConfig = IndexBuildConfig(), endpoint_url: str | None = None) -> dict:
    """Rewrites (on the actor pool) every shard holding tombstoned rows as a new shard without
    them, commits the version with no tombstones, then removes the old shards."""
    t0 = time.perf_counter()
    info = _require_sharded(_existing(out, endpoint_url), out, "be compacted")
    dead = info.tombstones()
    if not dead:
        return {"what": "compact", "version": info.version, "rewritten": 0, "unchanged": True}
    for orphan in fmt.orphans(out, info.shards, endpoint_url):
        fmt.remove_tree(storage.join(out, orphan), endpoint_url)
    dead_arr = pa.array(sorted(dead), pa.string())
    number = fmt.next_shard_number(info, out, endpoint_url)
    tasks = []
    for s in info.shards:
        ids = schema.read_table(storage.join(out, s, fmt.IMAGES_FILE), ["image_id"], endpoint_url).column("image_id")
        drop = pc.filter(ids, pc.is_in(ids, value_set=dead_arr)).to_pylist()
        if drop:
            tasks.append({"op": "compact", "src": s, "dst": fmt.shard_name(number), "drop": drop})
            number += 1
    spec = {"model": None, "out": out, "kind": info.kind, "columns": list(info.columns), "factory": info.meta.get("factory"),
            "endpoint_url": endpoint_url, "worker_cpus": cfg.worker_cpus, "gpu": False,
            "identity": {k: info.meta[k] for k in ("kind", "weights_digest", "mlp_digest", "tags", "dim",
                                                   "vocabulary_version") if k in info.meta}}
    metas = run_pool(tasks, spec, cfg)
    by_src = {t["src"]: m for t, m in zip(sorted(tasks, key=lambda t: t["dst"]), metas, strict=True)}
    shard_list = [(_listing(by_src[s["name"]]) if s["name"] in by_src else s) for s in info.meta["shard_list"]]
    shard_list = [s for s in shard_list if s["images"] > 0]
    new = fmt.commit(out, dict(info.meta, version=info.version + 1, tombstones=None, shard_list=shard_list,
                               next_shard=number), endpoint_url)
    _remove_old(out, info, new, endpoint_url)
    return {**_summary(new, metas, t0, "compact"), "rewritten": len(tasks), "removed_rows": len(dead)}


def describe(cfg: IndexBuildConfig) -> dict:
    return asdict(cfg)
