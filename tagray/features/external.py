"""Features computed elsewhere → tagray's feature shards (`tagray features import`).

Sources, each read as a stream of row batches (memory: one batch, one output shard and
8 bytes an id for the duplicate check):

- **Parquet** (a file, or a directory whose `*.parquet` files are read in name order): an
  id column (`id_column`; strings or integers) and the features as one list /
  large_list / fixed_size_list column of numbers, or as several numeric columns (one
  dimension each, in the order given, else the file's order).
- **.npy** (NumPy format 1.0 / 2.0: a 2-D array of numbers, C order;
  https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html), row i for the
  i-th id of an id list.
- **Whitespace-separated text**: one image a line, numbers separated by spaces or tabs:
  NUS-WIDE's low-level feature files (`Normalized_CH.dat`, `BoW_int.dat`, …, one line per
  image in `ImageList/Imagelist.txt` order; the `Train_*` / `Test_*` files in
  `TrainImagelist.txt` / `TestImagelist.txt` order). `.gz` / `.bz2` are decompressed.

An id list is a text file (one id a line), a Parquet file's `id_column`, or NUS-WIDE's
Imagelist: lines `<concept>\\<NNNN>_<photo id>.jpg`, whose id is the Flickr photo id (the
number after the `_`, as `tagray import nuswide` names the images).

The shards carry an identity of kind "external" (`store.identity_kind`) where a
torchvision backbone's goes: {"kind": "external", "name", "dim", "source", "source_digest":
"sha256:<hex of the source bytes>", "format", and "ids", "ids_digest" for an id list}.
URIs are recorded without credentials; a directory's digest is that of its files' bytes
concatenated in name order. Every stage compares identities with `store.comparable`, so
a model trained on one import refuses features of another name or source.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import re
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tagray.config import ConfigError
from tagray.data import schema, storage
from tagray.features import store

FORMATS = ("auto", "parquet", "npy", "text")
ID_FORMATS = ("auto", "lines", "nuswide", "parquet")
SUMMARY_FILE = "summary.json"
# NUS-WIDE ImageList/Imagelist.txt: `actor\0001_2124494179.jpg` (some copies carry a full Windows path);
# the id is the photo id after the first `_` of the file name, as `tagray import nuswide` reads it.
NUSWIDE_LINE = re.compile(r"^(?:.*[\\/])?[^\\/_]*_(\d+)\.[^.\\/]+$")
# What `--ids-format auto` takes for an Imagelist: the first line has a folder and `<NNNN>_<photo id>.jpg`.
NUSWIDE_DETECT = re.compile(r"^.*[\\/]\d+_\d+\.jpg$", re.IGNORECASE)
# Query parameters kept in a recorded URI (anything else may be a credential or a signature).
PUBLIC_QUERY = ("endpoint_override", "region", "scheme")
READ_BLOCK = 1 << 22  # bytes per read of a stream


@dataclass(frozen=True)
class ImportConfig:
    name: str  # what the features are (e.g. "clip-vit-b32", "nuswide-ch"); part of their identity
    format: str = "auto"  # parquet | npy | text; auto: .parquet or a directory, .npy, else text
    id_column: str = "image_id"  # Parquet: the id column of the source (or of a Parquet id list)
    feature_columns: tuple[str, ...] = ()  # Parquet: one list column, or several numeric ones; default: the one list column, else every floating column
    ids: str | None = None  # .npy / text: the id list, one id per row of the source
    ids_format: str = "auto"  # lines | nuswide | parquet; auto: parquet by suffix, nuswide if the first line is an Imagelist line, else lines
    batch_rows: int = 8192  # rows read and checked at a time
    shard_rows: int = 0  # rows per output shard; 0: about 64 MiB of features a shard

    def __post_init__(self) -> None:
        if not self.name or not self.name.strip() or len(self.name) > 200:
            raise ConfigError(f"--name must be a non-empty name (at most 200 characters), got {self.name!r}")
        if self.format not in FORMATS:
            raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.ids_format not in ID_FORMATS:
            raise ConfigError(f"--ids-format must be one of {', '.join(ID_FORMATS)}, got {self.ids_format!r}")
        if self.batch_rows < 1 or self.shard_rows < 0:
            raise ConfigError(f"batch_rows must be ≥ 1 and shard_rows ≥ 0, got {self.batch_rows} and {self.shard_rows}")


@dataclass
class Batch:
    """Rows read from one source file: ids, values (n, D), and where they were."""

    ids: list[str]
    values: np.ndarray  # (n, D), the source's number type
    source: str  # the file they came from
    first: int  # position of row 0: 0-based row index (Parquet, .npy) or 1-based line number (text)
    unit: str  # "row" or "line"

    def where(self, i: int) -> str:
        return f"{self.source}: {self.unit} {self.first + i} (image_id {self.ids[i]!r})"


def public_uri(uri: str) -> str:
    """`uri` as recorded in an identity: no `user:password@`, no query parameters other than
    endpoint / region (signatures, tokens and keys are dropped); local paths unchanged."""
    parts = urllib.parse.urlsplit(uri)
    if len(parts.scheme) < 2:  # a local path (or a Windows drive letter)
        return uri
    netloc = parts.netloc.rpartition("@")[2]
    query = urllib.parse.urlencode([(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k in PUBLIC_QUERY])
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _require(uri: str, endpoint_url: str | None) -> pafs.FileInfo:
    fs, path = storage.filesystem_for(uri, endpoint_url)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri}: no such file or object")
    return info


def source_digest(uris: list[str], endpoint_url: str | None = None) -> str:
    """sha256 of the bytes of `uris`, in order, as stored (not decompressed): "sha256:<hex>"."""
    h = hashlib.sha256()
    for uri in uris:
        fs, path = storage.filesystem_for(uri, endpoint_url)
        with fs.open_input_stream(path, compression=None) as f:
            while block := f.read(READ_BLOCK):
                h.update(block)
    return "sha256:" + h.hexdigest()


def parquet_files(uri: str, endpoint_url: str | None = None) -> list[str]:
    """A Parquet source's files: the file itself, or a directory's `*.parquet` in name order."""
    info = _require(uri, endpoint_url)
    if info.type == pafs.FileType.File:
        return [uri]
    fs, path = storage.filesystem_for(uri, endpoint_url)
    entries = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    names = sorted(e.base_name for e in entries if e.type == pafs.FileType.File and e.base_name.endswith(".parquet")
                   and not e.base_name.startswith(("_", ".")))
    if not names:
        raise FileNotFoundError(f"{uri}: a directory without .parquet files")
    return [storage.join(uri, n) for n in names]


def source_format(uri: str, fmt: str, endpoint_url: str | None = None) -> str:
    """The format of `uri`: `fmt` unless "auto", then by suffix (a directory is Parquet)."""
    info = _require(uri, endpoint_url)
    if fmt != "auto":
        return fmt
    name = uri.rstrip("/").lower()
    if info.type == pafs.FileType.Directory or name.endswith((".parquet", ".pq")):
        return "parquet"
    return "npy" if name.endswith(".npy") else "text"


def iter_lines(uri: str, endpoint_url: str | None = None) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line without its end) of a text file, streamed."""
    fs, path = storage.filesystem_for(uri, endpoint_url)
    with fs.open_input_stream(path) as f:  # compression detected from the suffix (.gz, .bz2)
        rest, no = b"", 0
        while block := f.read(READ_BLOCK):
            lines = (rest + block).split(b"\n")
            rest = lines.pop()
            for line in lines:
                no += 1
                yield no, line.rstrip(b"\r")
        if rest:
            yield no + 1, rest.rstrip(b"\r")


def _contiguous(uri: str, lines: Iterator[tuple[int, bytes]], what: str) -> Iterator[tuple[int, bytes]]:
    """Non-empty lines; an empty line is allowed only at the end (it would shift every later row)."""
    blank = None
    for no, line in lines:
        if not line.strip():
            blank = blank or no
            continue
        if blank is not None:
            raise schema.SchemaError(f"{uri}: line {blank} is empty; every line must hold one {what}")
        yield no, line


class IdList:
    """The ids of a .npy or text source's rows, in order, streamed from a list."""

    def __init__(self, uri: str, fmt: str, id_column: str, batch_rows: int, endpoint_url: str | None = None) -> None:
        self.uri, self.endpoint_url, self.batch_rows, self.id_column = uri, endpoint_url, batch_rows, id_column
        _require(uri, endpoint_url)
        if fmt == "auto" and uri.lower().endswith((".parquet", ".pq")):
            fmt = "parquet"
        self.format = fmt
        self._chunks = self._parquet() if fmt == "parquet" else self._text()
        self._buf: list[str] = []
        self.taken = 0

    def _parquet(self) -> Iterator[list[str]]:
        fs, path = storage.filesystem_for(self.uri, self.endpoint_url)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            _id_field(pf.schema_arrow, self.id_column, self.uri)
            row = 0
            for batch in pf.iter_batches(batch_size=self.batch_rows, columns=[self.id_column]):
                ids = _ids(batch.column(0), self.uri, row)
                row += len(ids)
                yield ids

    def _text(self) -> Iterator[list[str]]:
        lines = _contiguous(self.uri, iter_lines(self.uri, self.endpoint_url), "id")
        first = next(lines, None)
        if first is None:
            return
        fmt = self.format
        if fmt == "auto":
            fmt = "nuswide" if NUSWIDE_DETECT.match(first[1].strip().decode("utf-8", "replace")) else "lines"
        self.format = fmt
        chunk: list[str] = []
        for no, raw in itertools.chain([first], lines):
            try:
                line = raw.strip().decode("utf-8")
            except UnicodeDecodeError as e:
                raise schema.SchemaError(f"{self.uri}: line {no} is not UTF-8 ({e})") from None
            if fmt == "nuswide":
                m = NUSWIDE_LINE.match(line)
                if not m:
                    raise schema.SchemaError(f"{self.uri}: line {no}: {line!r} is not a NUS-WIDE Imagelist line "
                                             "(<concept>\\<NNNN>_<photo id>.jpg); pass --ids-format lines for one id a line")
                line = m.group(1)
            chunk.append(line)
            if len(chunk) >= self.batch_rows:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def take(self, n: int, source: str) -> list[str]:
        """The next `n` ids; SchemaError when the list ends first."""
        while len(self._buf) < n:
            chunk = next(self._chunks, None)
            if chunk is None:
                raise schema.SchemaError(f"{self.uri}: has {self.taken + len(self._buf)} ids, but {source} has more rows "
                                         "(the id list must have one id per row, in the same order)")
            self._buf.extend(chunk)
        out, self._buf = self._buf[:n], self._buf[n:]
        self.taken += n
        return out

    def finish(self, source: str) -> None:
        """SchemaError when ids are left over after the source's last row."""
        extra = len(self._buf) + sum(len(c) for c in self._chunks)
        if extra:
            raise schema.SchemaError(f"{self.uri}: has {self.taken + extra} ids, but {source} has {self.taken} rows "
                                     "(the id list must have one id per row, in the same order)")


def _id_field(s: pa.Schema, id_column: str, uri: str) -> pa.Field:
    if id_column not in s.names:
        raise schema.SchemaError(f"{uri}: no id column '{id_column}' (set --id-column); columns present: {', '.join(s.names)}")
    field = s.field(id_column)
    if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type) or pa.types.is_integer(field.type)):
        raise schema.SchemaError(f"{uri}: id column '{id_column}' has type {schema.describe(field.type)}; "
                                 "expected strings or integers")
    return field


def _ids(column: pa.Array, uri: str, first: int) -> list[str]:
    if column.null_count:
        i = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise schema.SchemaError(f"{uri}: row {first + i}: the id is null")
    ids = pc.cast(column, pa.string()).to_pylist()
    if "" in ids:
        raise schema.SchemaError(f"{uri}: row {first + ids.index('')}: the id is empty")
    return ids


def _numeric(t: pa.DataType) -> bool:
    return pa.types.is_floating(t) or pa.types.is_integer(t)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def feature_layout(s: pa.Schema, id_column: str, columns: tuple[str, ...], uri: str) -> tuple[str, list[str]]:
    """("list", [column]) or ("columns", [c1, c2, …]): where a Parquet source keeps its features."""
    _id_field(s, id_column, uri)
    for name in columns:
        if name not in s.names:
            raise schema.SchemaError(f"{uri}: no feature column '{name}'; columns present: {', '.join(s.names)}")
    others = [f for f in s if f.name != id_column]
    if not columns:
        lists = [f.name for f in others if _is_list(f.type)]
        if len(lists) > 1:
            raise schema.SchemaError(f"{uri}: several list columns ({', '.join(lists)}): choose one with --feature-column")
        columns = tuple(lists) or tuple(f.name for f in others if pa.types.is_floating(f.type))
        if not columns:
            raise schema.SchemaError(f"{uri}: no feature columns (a list of numbers, or floating-point columns) besides "
                                     f"'{id_column}'; columns present: {', '.join(s.names)}")
    types = {n: s.field(n).type for n in columns}
    if len(columns) == 1 and _is_list(types[columns[0]]):
        if not _numeric(types[columns[0]].value_type):
            raise schema.SchemaError(f"{uri}: column '{columns[0]}' has type {schema.describe(types[columns[0]])}; "
                                     "expected a list of numbers")
        return "list", list(columns)
    for n, t in types.items():
        if not _numeric(t):
            raise schema.SchemaError(f"{uri}: feature column '{n}' has type {schema.describe(t)}; expected numbers "
                                     "(or give one list column)")
    return "columns", list(columns)


def _list_values(arr: pa.Array, batch: Batch, dim: int | None) -> np.ndarray:
    """(n, D) values of a list column; SchemaError naming the row of a null or a ragged list."""
    if arr.null_count:
        i = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise schema.SchemaError(f"{batch.where(i)}: the feature is null")
    if pa.types.is_fixed_size_list(arr.type):
        lengths = np.full(len(arr), arr.type.list_size)
    else:
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    d = dim if dim is not None else int(lengths[0])
    bad = np.flatnonzero(lengths != d)
    if bad.size:
        raise schema.SchemaError(f"{batch.where(int(bad[0]))}: has {lengths[bad[0]]} values; the rows before have {d}")
    values = arr.flatten()
    if values.null_count:
        j = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        raise schema.SchemaError(f"{batch.where(j // d)}: value {j % d} is null")
    return values.to_numpy(zero_copy_only=False).reshape(len(arr), d)


def read_parquet(uri: str, cfg: ImportConfig, endpoint_url: str | None = None) -> Iterator[Batch]:
    """Batches of a Parquet source (a file or a directory of files with the same columns)."""
    layout, dim, expected = None, None, None
    for f in parquet_files(uri, endpoint_url):
        fs, path = storage.filesystem_for(f, endpoint_url)
        with fs.open_input_file(path) as handle:
            pf = pq.ParquetFile(handle)
            mode, columns = feature_layout(pf.schema_arrow, cfg.id_column, cfg.feature_columns, f)
            types = [pf.schema_arrow.field(c).type for c in columns]
            if expected is None:
                layout, expected = (mode, columns), types
            elif (mode, columns) != layout or types != expected:
                raise schema.SchemaError(f"{f}: feature columns {columns} of types {[schema.describe(t) for t in types]}, "
                                         f"but the files before have {layout[1]} of types {[schema.describe(t) for t in expected]}")
            row = 0
            for rb in pf.iter_batches(batch_size=cfg.batch_rows, columns=[cfg.id_column, *columns]):
                ids = _ids(rb.column(cfg.id_column), f, row)
                batch = Batch(ids, np.empty((0, 0)), f, row, "row")
                if mode == "list":
                    batch.values = _list_values(rb.column(columns[0]), batch, dim)
                else:
                    for c in columns:
                        col = rb.column(c)
                        if col.null_count:
                            i = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
                            raise schema.SchemaError(f"{batch.where(i)}: column '{c}' is null")
                    batch.values = np.column_stack([rb.column(c).to_numpy(zero_copy_only=False) for c in columns])
                dim = batch.values.shape[1]
                row += len(ids)
                yield batch


def _read_exact(f, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        block = f.read(n - got)
        if not block:
            break
        parts.append(block)
        got += len(block)
    return b"".join(parts)


def read_npy(uri: str, ids: IdList, batch_rows: int, endpoint_url: str | None = None) -> Iterator[Batch]:
    """Batches of a 2-D .npy array, read from a stream (its header, then `batch_rows` rows at a time)."""
    fmt = np.lib.format
    fs, path = storage.filesystem_for(uri, endpoint_url)
    with fs.open_input_stream(path) as f:
        try:
            version = fmt.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = fmt.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = fmt.read_array_header_2_0(f)
            else:
                raise ValueError(f"format version {version} (1.0 and 2.0 are read)")
        except ValueError as e:
            raise schema.SchemaError(f"{uri}: not a .npy file tagray reads: {e}") from None
        if dtype.hasobject or dtype.kind not in "fiu":
            raise schema.SchemaError(f"{uri}: an array of {dtype}; expected numbers (float or integer)")
        if len(shape) != 2:
            raise schema.SchemaError(f"{uri}: an array of shape {shape}; expected 2-D (images, D)")
        n, d = shape
        if fortran and min(n, d) > 1:
            raise schema.SchemaError(f"{uri}: a Fortran-ordered array; save it with np.save(path, np.ascontiguousarray(x))")
        for start in range(0, n, batch_rows):
            k = min(batch_rows, n - start)
            buf = _read_exact(f, k * d * dtype.itemsize)
            if len(buf) < k * d * dtype.itemsize:
                raise schema.SchemaError(f"{uri}: ends after row {start + len(buf) // max(1, d * dtype.itemsize)} "
                                         f"of the {n} its header announces (truncated?)")
            yield Batch(ids.take(k, uri), np.frombuffer(buf, dtype).reshape(k, d), uri, start, "row")
    ids.finish(uri)


def _parse_lines(uri: str, lines: list[bytes], start: int, dim: int | None, first_line: int) -> np.ndarray:
    """(n, D) float64 of consecutive lines `start`, `start` + 1, …: numpy's C reader, and
    where it fails (or the width differs from `dim`), a line-by-line pass naming the line."""
    try:
        x = np.loadtxt(io.BytesIO(b"\n".join(lines)), dtype=np.float64, ndmin=2, comments=None)
        if x.shape[0] == len(lines) and (dim is None or x.shape[1] == dim):
            return x
    except ValueError:
        pass
    for i, line in enumerate(lines):
        tokens = line.split()
        if dim is None:
            dim = len(tokens)
        if len(tokens) != dim:
            raise schema.SchemaError(f"{uri}: line {start + i} has {len(tokens)} values; "
                                     f"lines {first_line}-{start + i - 1} have {dim}")
        for j, t in enumerate(tokens):
            try:
                float(t)
            except ValueError:
                raise schema.SchemaError(f"{uri}: line {start + i}: value {j} {t.decode('utf-8', 'replace')!r} "
                                         "is not a number") from None
    raise schema.SchemaError(f"{uri}: lines {start}-{start + len(lines) - 1} cannot be read as numbers")


def read_text(uri: str, ids: IdList, batch_rows: int, endpoint_url: str | None = None) -> Iterator[Batch]:
    """Batches of a whitespace-separated text file (one image a line, e.g. NUS-WIDE's `.dat`)."""
    dim, first_line, start = None, 1, 1
    lines: list[bytes] = []
    for no, line in _contiguous(uri, iter_lines(uri, endpoint_url), "image's features"):
        if not lines:
            start = no
        lines.append(line)
        if len(lines) >= batch_rows:
            x = _parse_lines(uri, lines, start, dim, first_line)
            dim = x.shape[1]
            yield Batch(ids.take(len(lines), uri), x, uri, start, "line")
            lines = []
    if lines:
        yield Batch(ids.take(len(lines), uri), _parse_lines(uri, lines, start, dim, first_line), uri, start, "line")
    ids.finish(uri)


def checked_values(batch: Batch) -> np.ndarray:
    """The batch's values as float32; SchemaError naming the row and id of a NaN, ±inf, or a
    value beyond float32's range."""
    x = batch.values
    if x.shape[1] == 0:
        raise schema.SchemaError(f"{batch.where(0)}: has no values")
    with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf: reported below
        x32 = x.astype(np.float32, copy=False)
    for values, what in ((x, "is not finite"), (x32, "overflows float32")):
        bad = ~np.isfinite(values)
        if bad.any():
            i, j = (int(v) for v in np.argwhere(bad)[0])
            raise schema.SchemaError(f"{batch.where(i)}: value {j} is {float(x[i, j])}, which {what}; "
                                     "features must be finite numbers")
    return x32


def default_shard_rows(dim: int) -> int:
    """About 64 MiB of float32 features a shard (at least 1,024 rows, at most 1,048,576)."""
    return max(1024, min(1 << 20, (64 << 20) // (4 * dim)))


def _id_hashes(ids: list[str]) -> np.ndarray:
    import pandas as pd

    return pd.util.hash_array(np.asarray(ids, dtype=object))


def _check_unique(hashes: list[np.ndarray], places: list[tuple[int, str, int, str]], writer: store.ShardWriter,
                  src: str) -> None:
    """SchemaError naming both rows of the first duplicate id. Compares 64-bit hashes of the
    ids; the ids themselves are read back from the written shards only to confirm a match."""
    h = np.concatenate(hashes)
    order = np.argsort(h, kind="stable")
    same = np.flatnonzero(h[order][1:] == h[order][:-1])
    if not same.size:
        return
    written = [storage.filesystem_for(u, writer.endpoint_url) for u in writer.shards]
    all_ids = pq.ParquetDataset([p for _, p in written], filesystem=written[0][0]).read(columns=["image_id"])
    all_ids = all_ids.column("image_id").to_pylist()
    starts = np.array([p[0] for p in places])
    for k in same:
        a, b = sorted((int(order[k]), int(order[k + 1])))
        if all_ids[a] == all_ids[b]:
            where = []
            for r in (a, b):
                s, source, first, unit = places[int(np.searchsorted(starts, r, side="right")) - 1]
                where.append(f"{source}: {unit} {first + r - s}")
            raise schema.SchemaError(f"{src}: duplicate image_id {all_ids[a]!r}, at {where[0]} and at {where[1]}")


def _existing(out: str, identity: dict, endpoint_url: str | None) -> dict | None:
    """The summary of an identical finished import into `out`; SchemaError when `out`
    holds other feature files; None when it holds none."""
    if not store.feature_files(out, endpoint_url):
        return None
    found = store.features_identity(out, endpoint_url)
    summary_uri = storage.join(out, SUMMARY_FILE)
    same = found is not None and store.comparable({k: v for k, v in found.items() if k != "dim"}) == store.comparable(identity)
    if same and storage.exists(summary_uri, endpoint_url):
        summary = json.loads(storage.read_text(summary_uri, endpoint_url))
        if summary.get("rows") == len(store.featurized_ids(out, endpoint_url)):
            return {**summary, "already_imported": True}
    raise schema.SchemaError(f"{out} already holds feature files ({store.describe_identity(found)}); "
                             "import into an empty --out")


def import_features(src: str, out: str, cfg: ImportConfig, endpoint_url: str | None = None) -> dict:
    """Reads `src`, checks every row (finite values, one dimension, unique non-empty ids) and
    writes tagray feature shards with an external identity to `out`; returns the summary,
    also written to `out`/summary.json. Nothing is left in `out` when a check fails."""
    t0 = time.perf_counter()
    fmt = source_format(src, cfg.format, endpoint_url)
    if fmt == "parquet" and cfg.ids:
        raise ConfigError(f"--ids is for .npy and text sources; the Parquet source {src} holds its ids (--id-column)")
    if fmt != "parquet" and not cfg.ids:
        raise ConfigError(f"{src} is read as {fmt}: give its image ids with --ids (one id a line, a Parquet column, "
                          "or NUS-WIDE's ImageList/Imagelist.txt)")
    files = parquet_files(src, endpoint_url) if fmt == "parquet" else [src]
    identity: dict = {"kind": "external", "name": cfg.name, "source": public_uri(src), "format": fmt,
                      "source_digest": source_digest(files, endpoint_url)}
    if cfg.ids:
        identity.update(ids=public_uri(cfg.ids), ids_digest=source_digest([cfg.ids], endpoint_url))
    if done := _existing(out, identity, endpoint_url):
        return done
    if fmt == "parquet":
        batches = read_parquet(src, cfg, endpoint_url)
    else:
        ids = IdList(cfg.ids, cfg.ids_format, cfg.id_column, cfg.batch_rows, endpoint_url)
        batches = (read_npy if fmt == "npy" else read_text)(src, ids, cfg.batch_rows, endpoint_url)
    writer: store.ShardWriter | None = None
    hashes: list[np.ndarray] = []
    places: list[tuple[int, str, int, str]] = []  # (first global row, file, first row / line, unit): a duplicate's place
    rows = 0
    try:
        for batch in batches:
            x = checked_values(batch)
            if writer is None:
                identity["dim"] = x.shape[1]
                writer = store.ShardWriter(out, x.shape[1], identity, cfg.shard_rows or default_shard_rows(x.shape[1]),
                                           endpoint_url)
            hashes.append(_id_hashes(batch.ids))
            places.append((rows, batch.source, batch.first, batch.unit))  # no arrays: they would stay alive
            writer.add(np.asarray(batch.ids, dtype=object), x)
            rows += len(batch.ids)
        if writer is None:
            raise schema.SchemaError(f"{src}: no rows")
        writer.close()
        _check_unique(hashes, places, writer, src)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    seconds = time.perf_counter() - t0
    summary = {"source": public_uri(src), "out": out, "identity": identity, "rows": rows, "dim": identity["dim"],
               "shards": len(writer.shards), "seconds": seconds, "rows_per_second": rows / max(seconds, 1e-9)}
    storage.write_text(storage.join(out, SUMMARY_FILE), json.dumps(summary, indent=1), endpoint_url)
    return summary
