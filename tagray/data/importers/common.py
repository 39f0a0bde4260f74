"""What every importer shares: a streaming manifest writer (Parquet row groups, bounded
memory), the skip counts written as a JSON summary beside the manifest, line-by-line text
reading through `tagray.data.storage`, and the error for a malformed input row.

The manifest is the contract of README *Data contract* / SPEC §1 (`tagray.data.schema`).
Its summary is `<MANIFEST without .parquet>.summary.json` (`summary_uri`).
"""

from __future__ import annotations

import fnmatch
import io
import logging
import os
import posixpath
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tagray import jsonio
from tagray.data import storage
from tagray.data.schema import MANIFEST_SCHEMA, SchemaError, validate_manifest

log = logging.getLogger(__name__)

ROW_GROUP_ROWS = 65_536  # rows held in memory before a Parquet row group is written
EXAMPLES_PER_REASON = 5  # skipped items named in the summary, per reason


class ImportFormatError(SchemaError):
    """An input file of a corpus that does not follow its format; names the file and line."""


def format_error(source: str, line: int | None, what: str) -> ImportFormatError:
    """`source:line: what` (the line is 1-based; None when the file as a whole is wrong)."""
    where = f"{source}:{line}" if line is not None else source
    return ImportFormatError(f"{where}: {what}")


def summary_uri(manifest_uri: str) -> str:
    """The JSON summary beside a manifest: `m.parquet` → `m.summary.json`."""
    base = manifest_uri[: -len(".parquet")] if manifest_uri.endswith(".parquet") else manifest_uri
    return base + ".summary.json"


@dataclass
class ImportSummary:
    """What an import read, wrote and skipped (and why); written as JSON beside the manifest."""

    source: str  # mirflickr | nuswide | yfcc100m | folder
    inputs: list[str]
    rows: int = 0  # manifest rows written
    skipped: Counter = field(default_factory=Counter)  # reason → count
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason → first few items skipped
    counts: dict[str, int] = field(default_factory=dict)  # source-specific figures (e.g. per split)
    notes: list[str] = field(default_factory=list)  # what the user should know (e.g. users unknown)

    def skip(self, reason: str, item: str | None = None, n: int = 1) -> None:
        self.skipped[reason] += n
        if item is not None:
            ex = self.examples.setdefault(reason, [])
            if len(ex) < EXAMPLES_PER_REASON:
                ex.append(item)

    def note(self, text: str, warn: bool = True) -> None:
        """Something the user should know; logged as a warning unless `warn` is False."""
        if warn:
            log.warning("%s", text)
        self.notes.append(text)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "inputs": self.inputs,
            "rows": self.rows,
            "skipped": dict(sorted(self.skipped.items())),
            "skipped_total": sum(self.skipped.values()),
            "examples": self.examples,
            "counts": self.counts,
            "notes": self.notes,
        }


class ManifestWriter:
    """Streams manifest rows into one Parquet file, `row_group_rows` rows per row group.

    Rows go in one at a time (`add`) or as Arrow tables (`add_table`); at most one row
    group is held in memory. The file is written under a temporary name and moved into
    place by `close()`, so a failed import leaves no manifest behind (`abort()`).
    `unique_ids` keeps every image_id seen to refuse duplicates (memory grows with the
    corpus: off for YFCC100M, whose photo ids are unique by construction)."""

    def __init__(
        self,
        uri: str,
        columns: tuple[str, ...] = (),
        endpoint_url: str | None = None,
        row_group_rows: int = ROW_GROUP_ROWS,
        unique_ids: bool = True,
    ) -> None:
        unknown = set(columns) - set(MANIFEST_SCHEMA.names)
        if unknown:
            raise ValueError(f"not manifest columns: {sorted(unknown)}")
        names = [n for n in MANIFEST_SCHEMA.names if n in {"image_id", "user_id", "uri", "tags", *columns}]
        self.schema = pa.schema([MANIFEST_SCHEMA.field(n) for n in names])
        validate_manifest(self.schema, uri)
        self.uri, self.endpoint_url, self.row_group_rows = uri, endpoint_url, row_group_rows
        self.fs, self.path = storage.filesystem_for(uri, endpoint_url)
        self.tmp_path = f"{self.path}.partial-{os.getpid()}"
        if isinstance(self.fs, pafs.LocalFileSystem):
            self.fs.create_dir(posixpath.dirname(self.path), recursive=True)
        self._writer = pq.ParquetWriter(self.tmp_path, self.schema, filesystem=self.fs)
        self._rows: dict[str, list] = {n: [] for n in names}
        self._tables: list[pa.Table] = []
        self._buffered = 0
        self._seen: set[str] | None = set() if unique_ids else None
        self.rows = 0

    @property
    def count(self) -> int:
        """Rows written or buffered so far."""
        return self.rows + self._buffered

    def _check_ids(self, ids, where: str | None) -> None:
        if self._seen is None:
            return
        for i in ids:
            if i in self._seen:
                raise SchemaError(f"{where or self.uri}: duplicate image_id {i!r}")
            self._seen.add(i)

    def add(self, where: str | None = None, **row) -> None:
        """One row (image_id, user_id, uri, tags and the optional columns given at open);
        `where` (file:line) names the input in a duplicate-id error."""
        self._check_ids((row["image_id"],), where)
        for name, values in self._rows.items():
            values.append(row[name])
        self._buffered += 1
        if self._buffered >= self.row_group_rows:
            self.flush()

    def add_table(self, table: pa.Table, where: str | None = None) -> None:
        """Rows as an Arrow table with (at least) the manifest's columns."""
        if table.num_rows == 0:
            return
        table = table.select(self.schema.names).cast(self.schema)
        self._check_ids(table.column("image_id").to_pylist() if self._seen is not None else (), where)
        self._tables.append(table)
        self._buffered += table.num_rows
        if self._buffered >= self.row_group_rows:
            self.flush()

    def flush(self) -> None:
        """Writes what is buffered as row groups."""
        if self._rows["image_id"]:
            self._tables.append(pa.table(self._rows, schema=self.schema))
            self._rows = {n: [] for n in self._rows}
        if self._tables:
            table = pa.concat_tables(self._tables)
            self._writer.write_table(table, row_group_size=self.row_group_rows)
            self.rows += table.num_rows
        self._tables, self._buffered = [], 0

    def close(self) -> None:
        """Flushes, closes and moves the file into place; refuses an empty manifest."""
        self.flush()
        self._writer.close()
        if self.rows == 0:
            self.fs.delete_file(self.tmp_path)
            raise SchemaError(f"{self.uri}: nothing to import (0 rows); see the skip counts above")
        self.fs.move(self.tmp_path, self.path)

    def abort(self) -> None:
        """Closes and deletes the partial file."""
        try:
            self._writer.close()
        finally:
            if self.fs.get_file_info(self.tmp_path).type != pafs.FileType.NotFound:
                self.fs.delete_file(self.tmp_path)


def write_summary(summary: ImportSummary, manifest_uri: str, started: float,
                  endpoint_url: str | None = None) -> str:
    """Writes the summary JSON beside the manifest and returns its URI."""
    data = summary.to_dict()
    data["manifest"] = manifest_uri
    data["seconds"] = round(time.perf_counter() - started, 3)
    data["rows_per_second"] = round(summary.rows / data["seconds"], 1) if data["seconds"] > 0 else None
    uri = summary_uri(manifest_uri)
    storage.write_text(uri, jsonio.dumps(data, uri, indent=1, ensure_ascii=False) + "\n", endpoint_url)
    return uri


def is_dir(uri: str, endpoint_url: str | None = None) -> bool:
    """Whether `uri` is a local directory or an object-store prefix holding objects."""
    fs, path = storage.filesystem_for(uri, endpoint_url)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def list_files(uri: str, endpoint_url: str | None = None, recursive: bool = True) -> list[str]:
    """Paths (relative to `uri`, '/'-separated, sorted) of the files under a directory or prefix."""
    fs, path = storage.filesystem_for(uri, endpoint_url)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{uri}: no such directory")
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    base = path.rstrip("/") + "/"
    return sorted(i.path[len(base):] for i in infos if i.type == pafs.FileType.File)


def expand_inputs(patterns: list[str], endpoint_url: str | None = None) -> list[str]:
    """Input files from paths or glob patterns (`*`, `?`, `[…]` in the last path component),
    local or object store, in order; a pattern matching nothing is an error."""
    out: list[str] = []
    for pattern in patterns:
        head, _, tail = pattern.rpartition("/")
        if not any(c in tail for c in "*?["):
            if not storage.exists(pattern, endpoint_url):
                raise FileNotFoundError(f"{pattern}: no such file or object")
            out.append(pattern)
            continue
        parent = head or "."
        names = [n for n in list_files(parent, endpoint_url, recursive=False) if fnmatch.fnmatchcase(n, tail)]
        if not names:
            raise FileNotFoundError(f"{pattern}: matches no file")
        out.extend(storage.join(parent, n) for n in names)
    return out


def open_text(uri: str, endpoint_url: str | None = None) -> io.TextIOWrapper:
    """A UTF-8 text stream of the file at `uri` (`.gz` / `.bz2` decompressed by extension);
    lines split on '\\n' only; undecodable bytes kept as surrogate escapes (`read_lines`
    turns them into an error naming the line)."""
    fs, path = storage.filesystem_for(uri, endpoint_url)
    try:
        stream = fs.open_input_stream(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{uri}: no such file or object") from e
    return io.TextIOWrapper(stream, encoding="utf-8", errors="surrogateescape", newline="\n")


def read_lines(uri: str, endpoint_url: str | None = None) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its end) of a UTF-8 text file; a line that is not
    UTF-8 is an ImportFormatError naming the file and line."""
    with open_text(uri, endpoint_url) as f:
        for number, line in enumerate(f, 1):
            if not line.isascii():
                try:
                    line.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise format_error(uri, number, f"not UTF-8 text (byte {e.start + 1} of the line)") from None
            yield number, line.rstrip("\r\n")
