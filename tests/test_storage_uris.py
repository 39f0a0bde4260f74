"""tagray.data.storage over every URI pyarrow's FileSystem.from_uri opens: local paths and
file://, s3:// with the endpoint argument / AWS_ENDPOINT_URL and s3://…?endpoint_override=…
against the moto server over HTTP; gs://, abfs:// and hdfs:// dispatched to pyarrow's
filesystems (not exercised against real services here); query strings through join;
secrets redacted from messages."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from tagray import cli
from tagray.data import schema, storage
from tagray.data.storage import URIError
from tagray.features import store


def test_schemes():
    assert [storage.scheme(u) for u in ("runs/x", "/abs/x", "file:///x", "S3://b/k", "gs://b", "abfss://c@a/p",
                                        "hdfs://nn:8020/x", "HTTPS://h/x", "C:\\x")] == \
        ["", "", "file", "s3", "gs", "abfss", "hdfs", "https", ""]
    assert [storage.is_remote(u) for u in ("runs/x", "file:///x", "s3://b/k", "gs://b/k", "abfs://c@a/p",
                                           "hdfs://nn/x", "http://h/x")] == [False, False, True, True, True, True, True]
    assert storage.is_http("http://h/x") and storage.is_http("https://h/x") and not storage.is_http("s3://b/k")


def test_join_keeps_the_query_and_file_uris():
    q = "s3://b/p?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join(q, "a", "x.parquet") == "s3://b/p/a/x.parquet?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join("gs://bucket", "x") == "gs://bucket/x"
    assert storage.join("abfs://c@acct.dfs.core.windows.net/p/", "x") == "abfs://c@acct.dfs.core.windows.net/p/x"
    assert storage.join("hdfs://nn:8020/d", "x") == "hdfs://nn:8020/d/x"
    assert storage.join("file:///tmp/d", "x") == "file:///tmp/d/x"  # not file:/tmp/d/x
    assert storage.join("runs/d", "x") == "runs/d/x"


def test_redact_hides_passwords_and_query_values():
    uri = "abfs://container:S3CRETKEY99@acct.dfs.core.windows.net/p?sig=abcdef123&region=x&flagtoken"
    assert storage.redact(uri) == "abfs://container:***@acct.dfs.core.windows.net/p?sig=***&region=x&***"
    signed = "https://h.example/x.jpg?X-Amz-Signature=deadbeef42&X-Amz-Expires=60"
    assert storage.redact(signed) == "https://h.example/x.jpg?X-Amz-Signature=***&X-Amz-Expires=***"
    plain = "s3://b/k?endpoint_override=127.0.0.1:9000&scheme=http&region=us-east-1"
    assert storage.redact(plain) == plain and storage.redact("runs/x?y") == "runs/x?y"
    text = f"failed to open {uri}; key S3CRETKEY99 refused, flagtoken"
    shown = storage.redact_text(text, uri)
    assert "S3CRETKEY99" not in shown and "abcdef123" not in shown and "flagtoken" not in shown


def test_local_paths_and_file_uris_are_the_same_files(tmp_path):
    base = f"file://{tmp_path}"
    storage.makedirs(storage.join(base, "d", "e"))
    assert (tmp_path / "d" / "e").is_dir()
    storage.write_bytes(storage.join(base, "d", "x.bin"), b"hello")
    assert storage.read_bytes(str(tmp_path / "d" / "x.bin")) == b"hello"
    assert storage.exists(storage.join(base, "d", "x.bin")) and not storage.exists(storage.join(base, "nope"))
    assert storage.read_bytes(str(tmp_path / "d" / "x.bin"), limit=3) == b"hel"
    fs, path = storage.filesystem_for(base)
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path)


def test_unsupported_and_http_uris_refused_with_a_user_error(tmp_path, capsys):
    with pytest.raises(URIError, match=r"foo://x/y: unsupported URI scheme foo://"):
        storage.filesystem_for("foo://x/y")
    with pytest.raises(URIError, match="http\\(s\\) URLs are read only as images, by featurize"):
        storage.read_bytes("http://example.com/m.parquet")
    with pytest.raises(URIError, match=r"s3://b/k\?bogus=\*\*\*: Unexpected query parameter in S3 URI: 'bogus'") as e:
        storage.filesystem_for("s3://b/k?bogus=TOPSECRETVALUE")
    assert "TOPSECRETVALUE" not in str(e.value)
    # a command prints one line and exits 2
    rc = cli.main(["split", "--manifest", "foo://x/m.parquet", "--out", str(tmp_path / "s.parquet"),
                   "train=0.8", "val=0.1", "test=0.1"])
    assert rc == 2 and "unsupported URI scheme foo://" in capsys.readouterr().err


def test_gs_abfs_hdfs_dispatched_to_pyarrow():
    """Dispatch only: no GCS, Azure or HDFS service is reachable here."""
    fs, path = storage.filesystem_for("gs://bucket/a/b.jpg")
    assert isinstance(fs, pafs.GcsFileSystem) and path == "bucket/a/b.jpg"
    assert storage.filesystem_for("gs://bucket/c.jpg")[0] is fs  # one filesystem per bucket, cached
    fs, path = storage.filesystem_for("abfs://container@acct.dfs.core.windows.net/p/q.jpg")
    assert isinstance(fs, pafs.AzureFileSystem) and path == "container/p/q.jpg"
    fs, path = storage.filesystem_for("abfss://acct.dfs.core.windows.net/container/p")
    assert isinstance(fs, pafs.AzureFileSystem) and path.lstrip("/") == "container/p"
    try:
        fs, path = storage.filesystem_for("hdfs://reader:hunter2pw@nn.invalid:8020/data/x.jpg")
    except OSError as e:  # no JVM / libhdfs on this machine: pyarrow's HDFS loader says so
        message = str(e)
        assert message.startswith("hdfs://reader:***@nn.invalid:8020/data/x.jpg: cannot open its hdfs filesystem")
        assert any(w in message for w in ("libjvm", "libhdfs", "JAVA_HOME", "hdfs")) and "hunter2pw" not in message
    else:
        assert isinstance(fs, pafs.HadoopFileSystem) and path == "/data/x.jpg"


@pytest.mark.integration
def test_s3_endpoint_argument_env_and_query(s3_bucket, monkeypatch):
    endpoint, bucket = s3_bucket
    host = endpoint.split("://", 1)[1]
    plain = f"s3://{bucket}/d"
    # today's way: the endpoint argument, one cached S3FileSystem for every bucket
    storage.write_bytes(storage.join(plain, "a.bin"), b"one", endpoint)
    fs_a = storage.filesystem_for(storage.join(plain, "a.bin"), endpoint)[0]
    assert fs_a is storage.filesystem_for(f"s3://{bucket}-other/x", endpoint)[0]
    # the endpoint in the URI itself: the same object, and a query that survives join
    query = f"s3://{bucket}/d?endpoint_override={host}&scheme=http"
    assert storage.read_bytes(storage.join(query, "a.bin")) == b"one"
    storage.write_bytes(storage.join(query, "b.bin"), b"two")
    assert storage.read_bytes(storage.join(plain, "b.bin"), endpoint) == b"two"
    assert storage.exists(storage.join(query, "b.bin")) and not storage.exists(storage.join(query, "c.bin"))
    fs_q, path = storage.filesystem_for(storage.join(query, "b.bin"))
    assert isinstance(fs_q, pafs.S3FileSystem) and path == f"{bucket}/d/b.bin"
    assert storage.filesystem_for(storage.join(query, "zzz"))[0] is fs_q  # cached per bucket and query
    with pytest.raises(FileNotFoundError, match=r"d/c.bin\?endpoint_override=.*: no such file or object"):
        storage.read_bytes(storage.join(query, "c.bin"))
    # Parquet and feature listings through the query URI (what featurize/train do)
    table = pa.table({"image_id": ["a", "b"]})
    schema.write_table(table, storage.join(query, "part-0-0.parquet"))
    assert schema.read_table(storage.join(query, "part-0-0.parquet")).equals(table)
    assert store.feature_files(query) == [storage.join(query, "part-0-0.parquet")]
    storage.makedirs(storage.join(query, "sub"))  # a no-op on object stores: no marker object
    assert not storage.exists(storage.join(query, "sub"))
    # a query without an endpoint gets the caller's (or AWS_ENDPOINT_URL's)
    assert storage.read_bytes(f"s3://{bucket}/d/a.bin?region=us-east-1", endpoint) == b"one"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    assert storage.read_bytes(f"s3://{bucket}/d/b.bin") == b"two"
    assert storage.read_bytes(f"s3://{bucket}/d/b.bin?region=us-east-1") == b"two"
