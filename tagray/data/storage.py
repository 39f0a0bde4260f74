"""Every file and URI tagray reads or writes, behind one pyarrow filesystem interface.

- Local paths and `file://…`: pyarrow's LocalFileSystem.
- `s3://bucket/key`: the endpoint comes from the caller (a config's `endpoint_url`) or the
  `AWS_ENDPOINT_URL` environment variable, so MinIO, Ceph, R2 or a moto server work as
  well as AWS; credentials come from the usual AWS environment and files. One cached
  S3FileSystem per (endpoint, region).
- Any other `scheme://…` that `pyarrow.fs.FileSystem.from_uri` opens — `gs://`, `abfs://`,
  `abfss://`, `hdfs://`, `viewfs://`, and `s3://…?endpoint_override=…&region=…` — through
  that function (https://arrow.apache.org/docs/python/filesystems.html#filesystem-uris),
  one cached filesystem per `scheme://authority/?query`. The query holds the
  filesystem's options: it belongs to the URI and survives `join`. An `s3://` URI with a
  query but no `endpoint_override` gets the caller's endpoint added to it.
- `http(s)://` is no filesystem: featurize reads images from it (tagray.data.http_fetch);
  every function here refuses it with a URIError.

Paths inside URIs are taken as written (never percent-decoded, as tagray always did for
`s3://`); a `?` starts the query. Messages print URIs through `redact`, which hides the
password of `user:password@` and the query's values (signed-URL signatures, tokens).
"""

from __future__ import annotations

import os
import posixpath
import re
from functools import lru_cache
from pathlib import Path

import pyarrow.fs as pafs

from tagray.config import ConfigError

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Query options known to hold no secret (pyarrow's S3, GCS, Azure and HDFS URI options):
# printed as they are; every other query value is printed as ***.
_PLAIN_OPTIONS = frozenset({
    "region", "scheme", "endpoint_override", "allow_bucket_creation", "allow_bucket_deletion",
    "force_virtual_addressing", "connect_timeout", "request_timeout", "retry_limit_seconds",
    "default_bucket_location", "project_id", "blob_storage_authority", "dfs_storage_authority",
    "blob_storage_scheme", "dfs_storage_scheme", "enable_tls", "replication", "buffer_size",
    "default_block_size", "user",
})


class URIError(ConfigError):
    """A URI tagray cannot open: an unknown scheme, an option its filesystem rejects, or
    http(s) where only featurize's images may be read from the web."""


def scheme(uri: str) -> str:
    """The URI's scheme in lower case (`s3`, `gs`, `file`, `https`, …); "" for a plain path."""
    m = _SCHEME.match(uri)
    return m.group(1).lower() if m else ""


def is_remote(uri: str) -> bool:
    """True for URIs other than local paths and `file://` (object stores, HDFS, http(s))."""
    return scheme(uri) not in ("", "file")


def is_http(uri: str) -> bool:
    """True for `http://` and `https://` URLs."""
    return scheme(uri) in ("http", "https")


def _split(uri: str) -> tuple[str, str, str, str]:
    """(scheme as written, authority, path from its leading "/", query) of
    `scheme://authority/path?query`, taken literally."""
    n = _SCHEME.match(uri).end()
    rest, _, query = uri[n:].partition("?")
    authority, slash, path = rest.partition("/")
    return uri[: n - 3], authority, slash + path, query


def _hidden(uri: str) -> tuple[str, list[str]]:
    """(`uri` fit to print, the secret values it hid)."""
    if not is_remote(uri):
        return uri, []
    sch, authority, path, query = _split(uri)
    secrets: list[str] = []
    userinfo, at, host = authority.rpartition("@")
    if at and ":" in userinfo:
        user, _, password = userinfo.partition(":")
        secrets.append(password)
        authority = f"{user}:***@{host}"
    if query:
        items = []
        for item in query.split("&"):
            key, eq, value = item.partition("=")
            if key.lower() in _PLAIN_OPTIONS:
                items.append(item)
            else:
                secrets.append(value if eq else key)
                items.append(f"{key}=***" if eq else "***")
        query = "?" + "&".join(items)
    return f"{sch}://{authority}{path}{query}", [s for s in secrets if s]


def redact(uri: str) -> str:
    """`uri` fit for logs and error messages: `user:***@`, and `key=***` for every query
    value but those of the options known to hold no secret (region, endpoint_override, …)."""
    return _hidden(uri)[0]


def redact_text(text: str, uri: str) -> str:
    """`text` (a library's error message, say) with `uri` and its secrets redacted."""
    shown, secrets = _hidden(uri)
    text = text.replace(uri, shown)
    for secret in sorted(secrets, key=len, reverse=True):
        if len(secret) >= 4:  # shorter values are no secrets, and replacing them would garble the text
            text = text.replace(secret, "***")
    return text


@lru_cache(maxsize=16)
def _s3(endpoint_url: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs: dict = {"region": region or os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
    if endpoint_url:
        kwargs.update(_endpoint_options(endpoint_url))
    return pafs.S3FileSystem(**kwargs)


def _endpoint_options(endpoint_url: str) -> dict[str, str]:
    """`http://host:port` → S3 options endpoint_override=host:port, scheme=http."""
    scheme_, sep, host = endpoint_url.partition("://")
    return {"endpoint_override": host.rstrip("/"), "scheme": scheme_} if sep else {"endpoint_override": endpoint_url}


def _with_endpoint(query: str, endpoint_url: str | None) -> str:
    """An `s3://` URI's query, with the caller's endpoint (and region from the environment)
    where the query names none."""
    keys = {item.partition("=")[0].lower() for item in query.split("&")}
    extra = dict(_endpoint_options(endpoint_url)) if endpoint_url and "endpoint_override" not in keys else {}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region and "region" not in keys:
        extra["region"] = region
    return "&".join([query, *(f"{k}={v}" for k, v in extra.items() if k not in keys)])


@lru_cache(maxsize=32)
def _from_uri(root: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem for `scheme://authority/?query`, and the root's path in it."""
    return pafs.FileSystem.from_uri(root)


def filesystem_for(uri: str, endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem that holds `uri`, and the path inside it."""
    sch = scheme(uri)
    if sch in ("", "file"):
        path = uri[len("file://") :] if sch else uri
        return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())
    if sch in ("http", "https"):
        raise URIError(
            f"{redact(uri)}: http(s) URLs are read only as images, by featurize (a manifest's uri column); "
            "give a local path or an object-store URI (s3://, gs://, abfs://, hdfs://, …) here"
        )
    _, authority, path, query = _split(uri)
    if sch == "s3" and not query:
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        return _s3(endpoint, os.environ.get("AWS_REGION")), authority + path
    if sch == "s3":
        query = _with_endpoint(query, endpoint_url or os.environ.get("AWS_ENDPOINT_URL"))
    root = f"{uri[: len(sch)]}://{authority}/" + (f"?{query}" if query else "")
    try:
        fs, root_path = _from_uri(root)
    except ValueError as e:  # pyarrow.ArrowInvalid: an unknown scheme or a bad option
        message = redact_text(redact_text(str(e), root), uri)
        if "Unrecognized filesystem type" in message:
            message = (f"unsupported URI scheme {sch}://: use a local path, file://, s3://, gs://, abfs://, hdfs:// "
                       "or another URI that pyarrow.fs.FileSystem.from_uri opens")
        raise URIError(f"{redact(uri)}: {message}") from None
    except OSError as e:  # e.g. libhdfs or a JVM not installed, a name node that does not answer
        raise OSError(f"{redact(uri)}: cannot open its {sch} filesystem: {redact_text(redact_text(str(e), root), uri)}") from None
    return fs, (root_path.rstrip("/") + path) or root_path


def join(base: str, *parts: str) -> str:
    """`base`/`parts` for local paths and URIs alike; a URI's query stays at its end
    (`s3://b/p?region=x` + `a` → `s3://b/p/a?region=x`)."""
    if is_remote(base):
        head, q, query = base.partition("?")
        return posixpath.join(head, *parts) + q + query
    if scheme(base) == "file":
        return posixpath.join(base, *parts)
    return str(Path(base, *parts))


def _has_directories(fs: pafs.FileSystem) -> bool:
    """Local disks and HDFS have real directories; object stores have key prefixes."""
    return isinstance(fs, (pafs.LocalFileSystem, pafs.HadoopFileSystem))


def makedirs(uri: str, endpoint_url: str | None = None) -> None:
    """Creates the directory `uri` (a no-op prefix on object stores)."""
    fs, path = filesystem_for(uri, endpoint_url)
    if _has_directories(fs):
        fs.create_dir(path, recursive=True)


def exists(uri: str, endpoint_url: str | None = None) -> bool:
    """Whether a file (or local directory) exists at `uri`."""
    fs, path = filesystem_for(uri, endpoint_url)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str, endpoint_url: str | None = None, limit: int | None = None) -> bytes:
    """The object at `uri` — its first `limit` bytes when a limit is given, so that an
    oversized object costs no more than that; FileNotFoundError names it when it is missing."""
    fs, path = filesystem_for(uri, endpoint_url)
    try:
        with fs.open_input_stream(path) as f:
            return f.read() if limit is None else f.read(limit)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{redact(uri)}: no such file or object") from e
    except OSError as e:
        if "NoSuchKey" in str(e) or "does not exist" in str(e) or "Path does not exist" in str(e):
            raise FileNotFoundError(f"{redact(uri)}: no such file or object") from e
        raise


def write_bytes(uri: str, data: bytes, endpoint_url: str | None = None) -> None:
    """Writes `data` to `uri`, creating parent directories where there are directories."""
    fs, path = filesystem_for(uri, endpoint_url)
    if _has_directories(fs):
        fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_text(uri: str, text: str, endpoint_url: str | None = None) -> None:
    """Writes UTF-8 `text` to `uri`."""
    write_bytes(uri, text.encode("utf-8"), endpoint_url)


def read_text(uri: str, endpoint_url: str | None = None) -> str:
    """The UTF-8 text at `uri`."""
    return read_bytes(uri, endpoint_url).decode("utf-8")
