"""Local paths and `s3://` URIs behind one pyarrow filesystem interface.

The S3 endpoint comes from the caller (a config's `endpoint_url`) or the
`AWS_ENDPOINT_URL` environment variable, so MinIO, Ceph, R2 or a moto server work
as well as AWS; credentials come from the usual AWS environment and files.
"""

from __future__ import annotations

import os
import posixpath
from functools import lru_cache
from pathlib import Path

import pyarrow.fs as pafs


def is_remote(uri: str) -> bool:
    """True for object-store URIs (`s3://…`)."""
    return uri.startswith("s3://")


@lru_cache(maxsize=16)
def _s3(endpoint_url: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs: dict = {"region": region or os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
    if endpoint_url:
        scheme, sep, host = endpoint_url.partition("://")
        if sep:
            kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
        else:
            kwargs["endpoint_override"] = endpoint_url
    return pafs.S3FileSystem(**kwargs)


def filesystem_for(uri: str, endpoint_url: str | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem that holds `uri`, and the path inside it."""
    if is_remote(uri):
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        return _s3(endpoint, os.environ.get("AWS_REGION")), uri[len("s3://") :]
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"{uri}: unsupported URI scheme; use a local path or s3://bucket/key")
    path = uri[len("file://") :] if uri.startswith("file://") else uri
    return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    """`base`/`parts` for local paths and URIs alike."""
    if is_remote(base):
        return posixpath.join(base, *parts)
    return str(Path(base, *parts))


def makedirs(uri: str, endpoint_url: str | None = None) -> None:
    """Creates the directory `uri` (a no-op prefix on object stores)."""
    fs, path = filesystem_for(uri, endpoint_url)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(path, recursive=True)


def exists(uri: str, endpoint_url: str | None = None) -> bool:
    """Whether a file (or local directory) exists at `uri`."""
    fs, path = filesystem_for(uri, endpoint_url)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str, endpoint_url: str | None = None) -> bytes:
    """The whole object at `uri`; FileNotFoundError names it when it is missing."""
    fs, path = filesystem_for(uri, endpoint_url)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{uri}: no such file or object") from e
    except OSError as e:
        if "NoSuchKey" in str(e) or "does not exist" in str(e) or "Path does not exist" in str(e):
            raise FileNotFoundError(f"{uri}: no such file or object") from e
        raise


def write_bytes(uri: str, data: bytes, endpoint_url: str | None = None) -> None:
    """Writes `data` to `uri`, creating local parent directories."""
    fs, path = filesystem_for(uri, endpoint_url)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_text(uri: str, text: str, endpoint_url: str | None = None) -> None:
    """Writes UTF-8 `text` to `uri`."""
    write_bytes(uri, text.encode("utf-8"), endpoint_url)


def read_text(uri: str, endpoint_url: str | None = None) -> str:
    """The UTF-8 text at `uri`."""
    return read_bytes(uri, endpoint_url).decode("utf-8")
