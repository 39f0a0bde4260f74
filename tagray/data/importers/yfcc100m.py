"""YFCC100M dataset files → manifest (Thomee et al., *YFCC100M: The New Data in Multimedia
Research*, CACM 2016; the dataset file's column list).

Tab-separated, no header, one photo or video a line, either 25 columns

    line number, photo id, md5, user NSID, nickname, date taken, date uploaded, device,
    title, description, user tags, machine tags, longitude, latitude, accuracy, page URL,
    download URL, license name, license URL, server, farm, secret, original secret,
    original extension, marker (0 photo / 1 video)

or the 23 of the Webscope release (the same without line number and md5), detected per
file from its first line. image_id = photo id, user_id = NSID, uri = download URL or a
`uri_template` (`s3://bucket/{photo_id}.jpg`; any column name above in snake case),
tags = the user tags: comma-separated, URL-encoded with `+` for a space, decoded here.
Videos are skipped and counted.

Streaming: pyarrow's CSV reader hands over blocks of `block_bytes`; each block is checked,
filtered and converted with Arrow compute and written as it comes (`ManifestWriter`), so
memory does not grow with the file (100M rows). `.bz2` / `.gz` files are decompressed by
extension.
"""

from __future__ import annotations

import string
from urllib.parse import unquote_plus

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from tagray.config import ConfigError
from tagray.data import storage
from tagray.data.importers.common import ImportSummary, ManifestWriter, format_error, open_text

COLUMNS_25 = (
    "line_number", "photo_id", "md5", "user_nsid", "nickname", "date_taken", "date_uploaded", "device",
    "title", "description", "user_tags", "machine_tags", "longitude", "latitude", "accuracy", "page_url",
    "download_url", "license_name", "license_url", "server", "farm", "secret", "original_secret",
    "original_extension", "marker",
)
COLUMNS_23 = tuple(c for c in COLUMNS_25 if c not in ("line_number", "md5"))
BLOCK_BYTES = 4 << 20  # CSV bytes per parsed block; pyarrow reads blocks ahead, so memory is a multiple of this, not of the file


def template_fields(template: str) -> list[str]:
    """The column names a `--uri-template` uses; unknown ones are a ConfigError naming the flag."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ConfigError(f"--uri-template {template!r}: {e}") from e
    bad = [f for f in fields if f not in COLUMNS_23]
    if bad or not fields:
        raise ConfigError(f"--uri-template {template!r}: "
                          + (f"unknown field(s) {bad}; " if bad else "no {field}; ")
                          + f"use columns of the dataset file, e.g. {{photo_id}}: {', '.join(COLUMNS_23)}")
    return fields


def _template_uris(template: str, batch: pa.RecordBatch) -> pa.Array:
    """`template` filled in per row, with Arrow string joins (no Python loop over rows)."""
    pieces: list = []
    for literal, name, spec, conv in string.Formatter().parse(template):
        if literal:
            pieces.append(pa.scalar(literal.replace("{{", "{").replace("}}", "}")))
        if name is not None:
            if spec or conv:
                raise ConfigError(f"--uri-template {template!r}: format specs and conversions are not supported")
            pieces.append(batch.column(name))
    if len(pieces) == 1:
        return pieces[0]
    return pc.binary_join_element_wise(*pieces, "")


def decode_tags(user_tags: pa.Array) -> pa.ListArray:
    """'new+york,statue+of+liberty' → ['new york', 'statue of liberty'] per row: split on
    ',', URL-decoded with `+` as a space (each distinct tag decoded once), empty tags dropped."""
    lists = pc.split_pattern(user_tags, ",")
    flat = pc.list_flatten(lists)
    parent = pc.list_parent_indices(lists).to_numpy()
    encoded = pc.dictionary_encode(flat)
    decoded = [unquote_plus(t).strip() for t in encoded.dictionary.to_pylist()]
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    keep = np.array([bool(t) for t in decoded], dtype=bool)[codes]
    values = pa.array(decoded, pa.string()).take(pa.array(codes[keep]))
    offsets = np.zeros(len(user_tags) + 1, dtype=np.int32)
    np.cumsum(np.bincount(parent[keep], minlength=len(user_tags)), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def _columns_of(uri: str, endpoint_url: str | None) -> tuple[str, ...] | None:
    """25 or 23 columns from the first line (None for an empty file)."""
    with open_text(uri, endpoint_url) as f:
        first = f.readline()
    if not first.strip():
        return None
    n = first.rstrip("\r\n").count("\t") + 1
    if n == 25:
        return COLUMNS_25
    if n == 23:
        return COLUMNS_23
    raise format_error(uri, 1, f"has {n} tab-separated columns; a YFCC100M dataset file has 25 "
                               "(with line number and md5) or 23 (the Webscope release)")


def _first_bad(mask: pa.Array) -> int | None:
    """Index of the first True in a boolean array, or None."""
    if not pc.any(mask).as_py():
        return None
    return int(np.flatnonzero(mask.to_numpy(zero_copy_only=False))[0])


def _check(batch: pa.RecordBatch, uri: str, first_line: int, need_url: bool) -> None:
    """A malformed row is an error naming file and line (the marker, photo id, NSID, URL)."""
    marker, photo_id = batch.column("marker"), batch.column("photo_id")
    checks = [
        ("marker", pc.invert(pc.is_in(marker, pa.array(["0", "1"]))), "0 (photo) or 1 (video)"),
        ("photo_id", pc.invert(pc.match_substring_regex(photo_id, r"^[0-9]+$")), "digits"),
        ("user_nsid", pc.equal(batch.column("user_nsid"), ""), "a user NSID"),
    ]
    if need_url:
        no_url = pc.and_(pc.equal(marker, "0"), pc.equal(batch.column("download_url"), ""))
        checks.append(("download_url", no_url, "a URL for a photo (or pass --uri-template)"))
    for column, mask, expected in checks:
        i = _first_bad(mask)
        if i is not None:
            value = batch.column(column)[i].as_py()
            raise format_error(uri, first_line + i, f"{column} {value!r}; expected {expected}")


def _bad_line(uri: str, n_columns: int, endpoint_url: str | None) -> tuple[int, int] | None:
    """(line, columns) of the first line without `n_columns` columns: looked for only after
    the parser failed, because its threaded mode does not report where."""
    with open_text(uri, endpoint_url) as f:
        for number, line in enumerate(f, 1):
            n = line.rstrip("\r\n").count("\t") + 1
            if n != n_columns:
                return number, n
    return None


def _read_file(uri: str, columns: tuple[str, ...], include: list[str], endpoint_url: str | None,
               block_bytes: int):
    """Record batches (the `include` columns, as strings) of one dataset file, with the
    1-based line of each batch's first row; parsing runs on pyarrow's threads."""
    fs, path = storage.filesystem_for(uri, endpoint_url)
    stream = fs.open_input_stream(path)
    try:
        reader = pacsv.open_csv(
            stream,
            read_options=pacsv.ReadOptions(column_names=list(columns), block_size=block_bytes, use_threads=True),
            parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False,
                                             ignore_empty_lines=False),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in include},
                                                 include_columns=include, strings_can_be_null=False),
        )
        line = 1
        for batch in reader:
            yield line, batch
            line += batch.num_rows
    except pa.ArrowInvalid as e:
        bad = _bad_line(uri, len(columns), endpoint_url)
        if bad:
            raise format_error(uri, bad[0], f"has {bad[1]} tab-separated columns; "
                                            f"expected {len(columns)} like line 1") from None
        raise format_error(uri, None, f"cannot be read as a YFCC100M dataset file: {e}") from e
    finally:
        stream.close()


def import_yfcc100m(
    inputs: list[str],
    out: str,
    uri_template: str | None = None,
    limit: int | None = None,
    endpoint_url: str | None = None,
    block_bytes: int = BLOCK_BYTES,
) -> ImportSummary:
    """Writes the manifest of the photos in the YFCC100M dataset file(s) `inputs` to `out`."""
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be ≥ 1, got {limit}")
    seen = {}
    for uri in inputs:
        key = uri if storage.is_remote(uri) else str(storage.filesystem_for(uri)[1])
        if key in seen:
            raise ConfigError(f"{uri}: given twice (as {seen[key]}); each photo would be imported twice")
        seen[key] = uri
    summary = ImportSummary("yfcc100m", list(inputs))
    summary.note("image ids are YFCC100M photo ids, unique in the dataset; they are not re-checked "
                 "for duplicates (that would hold every id in memory)", warn=False)
    include = ["photo_id", "user_nsid", "user_tags", "download_url", "marker"]
    include += [f for f in (template_fields(uri_template) if uri_template else []) if f not in include]
    writer = ManifestWriter(out, (), endpoint_url, unique_ids=False)
    per_format = {"files_25_columns": 0, "files_23_columns": 0}
    try:
        for uri in inputs:
            if limit is not None and writer.count >= limit:
                break
            columns = _columns_of(uri, endpoint_url)
            if columns is None:
                summary.skip("empty input file", uri)
                continue
            per_format[f"files_{len(columns)}_columns"] += 1
            for line, batch in _read_file(uri, columns, include, endpoint_url, block_bytes):
                _check(batch, uri, line, need_url=uri_template is None)
                photos = pc.equal(batch.column("marker"), "0")
                videos = batch.num_rows - pc.sum(photos).as_py() if batch.num_rows else 0
                if videos:
                    summary.skip("video (marker 1)", n=videos)
                batch = batch.filter(photos)
                room = None if limit is None else limit - writer.count
                if room is not None and batch.num_rows > room:
                    batch = batch.slice(0, room)
                uris = _template_uris(uri_template, batch) if uri_template else batch.column("download_url")
                writer.add_table(pa.table({
                    "image_id": batch.column("photo_id"),
                    "user_id": batch.column("user_nsid"),
                    "uri": uris,
                    "tags": decode_tags(batch.column("user_tags")),
                }))
                if room is not None and writer.count >= limit:
                    summary.note(f"--limit {limit}: stopped in {uri} after {limit} photos")
                    break
        writer.close()
    except BaseException:
        writer.abort()
        raise
    summary.rows = writer.rows
    summary.counts = {"photos": writer.rows, **per_format}
    return summary
