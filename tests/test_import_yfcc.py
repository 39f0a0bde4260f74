"""`tagray import yfcc100m` on dataset files in the 25- and 23-column layouts, the manifest
writer's row groups, and the normaliser's `+` decoding."""

from __future__ import annotations

import bz2
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tagray import cli
from tagray.data.importers.common import ManifestWriter
from tagray.data.importers.yfcc100m import decode_tags, import_yfcc100m
from tagray.data.normalize import NormalizerConfig, TagNormalizer
from tagray.data.schema import SchemaError, read_manifest
from tests.test_import_layouts import yfcc_row

TAGS = ["new york", "statue of liberty", "東京", "c++", "100%"]


def _write(path, rows: range, columns: int = 25, video_every: int = 4, compress: bool = False) -> None:
    text = "".join(yfcc_row(i, TAGS[: i % 5 + 1] if i % 7 else [], f"{i % 3}@N0{i % 2}",
                            video=i % video_every == 0, columns=columns) + "\n" for i in rows)
    path.write_bytes(bz2.compress(text.encode()) if compress else text.encode())


def _import(*argv) -> int:
    return cli.main(["import", "yfcc100m", *map(str, argv)])


def test_25_and_23_columns_glob_videos_tags(tmp_path):
    _write(tmp_path / "yfcc100m_dataset-0", range(0, 40))
    _write(tmp_path / "yfcc100m_dataset-1.bz2", range(40, 80), columns=23, compress=True)
    assert _import(tmp_path / "yfcc100m_dataset-*", "--out", tmp_path / "m.parquet") == 0
    m = read_manifest(str(tmp_path / "m.parquet")).to_pylist()
    photos = [i for i in range(80) if i % 4]
    assert [r["image_id"] for r in m] == [str(10_000_000 + i) for i in photos]
    for r, i in zip(m, photos, strict=True):
        assert r["tags"] == (TAGS[: i % 5 + 1] if i % 7 else [])  # '+' → space, %-escapes decoded
        assert r["user_id"] == f"{i % 3}@N0{i % 2}"
        assert r["uri"] == f"http://farm6.staticflickr.com/5/{10_000_000 + i}_s3c.jpg"
    summary = json.loads((tmp_path / "m.summary.json").read_text())
    assert summary["skipped"] == {"video (marker 1)": 20}
    assert summary["counts"] == {"photos": 60, "files_25_columns": 1, "files_23_columns": 1}


def test_uri_template_and_limit(tmp_path):
    _write(tmp_path / "a.tsv", range(1, 30))
    _write(tmp_path / "b.tsv", range(30, 60))
    assert _import(tmp_path / "a.tsv", tmp_path / "b.tsv", "--out", tmp_path / "m.parquet", "--limit", "25",
                   "--uri-template", "s3://mirror/{farm}/{photo_id}_{secret}.{original_extension}") == 0
    m = read_manifest(str(tmp_path / "m.parquet")).to_pylist()
    assert len(m) == 25  # 22 photos of a.tsv, 3 of b.tsv
    assert m[0]["uri"] == "s3://mirror/6/10000001_s3c.jpg"
    assert m[-1]["image_id"] == str(10_000_000 + 33)


def test_malformed_rows_name_file_and_line(tmp_path, capsys):
    lines = [yfcc_row(i, ["a"], "1@N00") for i in range(3000)]
    good = "\n".join(lines) + "\n"
    bad = tmp_path / "bad.tsv"
    cut = lines[:2500] + [lines[2500].rsplit("\t", 3)[0]] + lines[2501:]  # line 2501 lost 3 columns
    bad.write_text("\n".join(cut) + "\n")
    with pytest.raises(SchemaError, match=rf"^{bad}:2501: has 22 tab-separated columns; expected 25"):
        import_yfcc100m([str(bad)], str(tmp_path / "m.parquet"), block_bytes=64 << 10)  # many blocks
    marker = lines[:1700] + [lines[1700][:-1] + "7"] + lines[1701:]
    bad.write_text("\n".join(marker) + "\n")
    with pytest.raises(SchemaError, match=rf"^{bad}:1701: marker '7'; expected 0 \(photo\) or 1"):
        import_yfcc100m([str(bad)], str(tmp_path / "m.parquet"), block_bytes=64 << 10)
    assert list(tmp_path.glob("m.parquet*")) == []
    (tmp_path / "short.tsv").write_text("\t".join(["x"] * 24) + "\n")
    assert _import(tmp_path / "short.tsv", "--out", tmp_path / "m.parquet") == 2
    assert f"{tmp_path / 'short.tsv'}:1: has 24 tab-separated columns" in capsys.readouterr().err
    (tmp_path / "good.tsv").write_text(good)
    assert _import(tmp_path / "good.tsv", tmp_path / "good.tsv", "--out", tmp_path / "m.parquet") == 2
    assert "given twice" in capsys.readouterr().err
    assert _import(tmp_path / "good.tsv", "--out", tmp_path / "m.parquet", "--uri-template", "s3://b/{id}") == 2
    assert "unknown field(s) ['id']" in capsys.readouterr().err


def test_decode_tags_vectorised():
    got = decode_tags(pa.array(["new+york,statue+of+liberty", "", "%E6%9D%B1%E4%BA%AC,,c%2B%2B", "a"]))
    assert got.to_pylist() == [["new york", "statue of liberty"], [], ["東京", "c++"], ["a"]]


def test_normalizer_decodes_plus_as_space():
    norm = TagNormalizer(NormalizerConfig(lemmatize=False, drop_non_image=False))
    assert norm.clean("New+York") == "new york"
    assert norm.clean("c%2B%2B") == "c++"
    assert norm.clean("san%20francisco") == "san francisco"


def test_manifest_writer_row_groups_and_abort(tmp_path):
    out = str(tmp_path / "m.parquet")
    w = ManifestWriter(out, ("labels",), row_group_rows=4)
    for i in range(10):
        w.add(image_id=f"i{i}", user_id="u", uri=f"/x/{i}.jpg", tags=["a"], labels=[])
        assert w.count - w.rows == (i + 1) % 4  # at most one row group held before it is written
    w.close()
    meta = pq.ParquetFile(out).metadata
    assert meta.num_row_groups == 3 and meta.num_rows == 10  # 4 + 4 + 2
    w = ManifestWriter(str(tmp_path / "n.parquet"))
    w.add(image_id="i", user_id="u", uri="/x", tags=[])
    with pytest.raises(SchemaError, match="duplicate image_id 'i'"):
        w.add(where="in.txt:2", image_id="i", user_id="u", uri="/x", tags=[])
    w.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.parquet"]


@pytest.mark.integration
def test_s3_glob_in_and_out(s3_bucket, tmp_path):
    import boto3

    endpoint, bucket = s3_bucket
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for k, rows in enumerate((range(0, 20), range(20, 40))):
        _write(tmp_path / f"part-{k}.bz2", rows, compress=True)
        client.upload_file(str(tmp_path / f"part-{k}.bz2"), bucket, f"yfcc/part-{k}.bz2")
    out = f"s3://{bucket}/m.parquet"
    assert _import(f"s3://{bucket}/yfcc/part-*.bz2", "--out", out, "--endpoint-url", endpoint) == 0
    m = read_manifest(out, endpoint_url=endpoint)
    assert m.num_rows == 30
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert {"m.parquet", "m.summary.json"} <= keys and not any("partial" in k for k in keys)
