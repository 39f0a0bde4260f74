from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tagray.data import schema, storage


def _manifest(**overrides) -> pa.Table:
    cols = {
        "image_id": pa.array(["a", "b"]),
        "user_id": pa.array(["u1", "u2"]),
        "uri": pa.array(["/x/a.jpg", "/x/b.jpg"]),
        "tags": pa.array([["Beach", "sunset"], []], pa.list_(pa.string())),
        "labels": pa.array([["beach"], ["dog"]], pa.list_(pa.string())),
    }
    cols.update(overrides)
    return pa.table({k: v for k, v in cols.items() if v is not None})


def test_valid_manifest_round_trips(tmp_path):
    uri = str(tmp_path / "m.parquet")
    schema.write_manifest(_manifest(), uri)
    back = schema.read_manifest(uri, need=("labels",))
    assert back.column("tags").to_pylist() == [["Beach", "sunset"], []]


def test_missing_column_names_file_and_column(tmp_path):
    uri = str(tmp_path / "bad.parquet")
    pq.write_table(_manifest(user_id=None), uri)
    with pytest.raises(schema.SchemaError, match=r"bad\.parquet: missing column 'user_id' \(expected string\)"):
        schema.read_manifest(uri)


def test_wrong_type_names_column_and_expected(tmp_path):
    uri = str(tmp_path / "bad.parquet")
    pq.write_table(_manifest(tags=pa.array([[1, 2], [3]], pa.list_(pa.int64()))), uri)
    with pytest.raises(schema.SchemaError, match=r"column 'tags' has type list<int64>; expected list<string>"):
        schema.read_manifest(uri)


def test_missing_optional_column_needed_by_stage(tmp_path):
    uri = str(tmp_path / "m.parquet")
    schema.write_manifest(_manifest(labels=None), uri)
    with pytest.raises(schema.SchemaError, match="missing column 'labels'"):
        schema.read_manifest(uri, need=("labels",))


def test_duplicate_ids_empty_split_and_bad_split_values(tmp_path):
    with pytest.raises(schema.SchemaError, match="duplicate"):
        schema.validate_manifest(_manifest(image_id=pa.array(["a", "a"])), "m")
    with pytest.raises(schema.SchemaError, match=r"'split' has value\(s\) \['dev'\]"):
        schema.validate_manifest(_manifest().append_column("split", pa.array(["train", "dev"])), "m")
    uri = str(tmp_path / "m.parquet")
    schema.write_manifest(_manifest().append_column("split", pa.array(["train", "train"])), uri)
    with pytest.raises(schema.SchemaError, match="split 'test' is empty"):
        schema.read_manifest(uri, split="test")


def test_not_parquet_and_missing_file(tmp_path):
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet")
    with pytest.raises(schema.SchemaError, match="junk.parquet: cannot be read as Parquet"):
        schema.read_manifest(str(junk))
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        schema.read_manifest(str(tmp_path / "nope.parquet"))


def test_features_schema_and_backbone_identity():
    s = schema.with_backbone_identity(schema.features_schema(8), {"name": "resnet18", "digest": "abc"})
    assert schema.validate_features(s, "f") == 8
    assert schema.backbone_identity(s) == {"name": "resnet18", "digest": "abc"}
    bad = pa.schema([("image_id", pa.string()), ("feature", pa.list_(pa.float64()))])
    with pytest.raises(schema.SchemaError, match=r"column 'feature' has type .*expected fixed_size_list<float32>"):
        schema.validate_features(bad, "f.parquet")


@pytest.mark.integration
def test_manifest_round_trips_through_s3(s3_bucket):
    endpoint, bucket = s3_bucket
    uri = f"s3://{bucket}/corpus/manifest.parquet"
    schema.write_manifest(_manifest(), uri, endpoint_url=endpoint)
    assert storage.exists(uri, endpoint)
    back = schema.read_manifest(uri, endpoint_url=endpoint)
    assert back.column("image_id").to_pylist() == ["a", "b"]
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        storage.read_bytes(f"s3://{bucket}/missing.jpg", endpoint)


@pytest.mark.integration
def test_endpoint_from_environment(s3_bucket, monkeypatch):
    endpoint, bucket = s3_bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    storage.write_text(f"s3://{bucket}/a.txt", "hello")
    assert storage.read_text(f"s3://{bucket}/a.txt") == "hello"
