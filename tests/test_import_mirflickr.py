"""`tagray import mirflickr` on corpora built in the MIRFlickr-25K layout."""

from __future__ import annotations

import json

import pytest

from tagray import cli
from tagray.data.schema import read_manifest
from tests.test_import_layouts import CONCEPTS, mirflickr


def _import(root, out, *extra) -> int:
    return cli.main(["import", "mirflickr", str(root), "--out", str(out), *extra])


def test_tags_labels_owners_and_summary(tmp_path):
    rows = mirflickr(tmp_path / "mir", n=30)
    out = tmp_path / "m.parquet"
    assert _import(tmp_path / "mir", out) == 0
    m = read_manifest(str(out)).to_pylist()  # validates the manifest contract
    assert [r["image_id"] for r in m] == [f"im{i}" for i in range(1, 31)]
    for got, want in zip(m, rows, strict=True):
        assert got["tags"] == want["tags"]  # as typed, in order, \r\n stripped
        assert got["labels"] == sorted(want["concepts"])
        assert got["user_id"] == want["owner"]
    assert m[0]["uri"] == str(tmp_path / "mir" / "im1.jpg")
    summary = json.loads((tmp_path / "m.summary.json").read_text())
    assert summary["rows"] == 30 and summary["skipped_total"] == 0 and summary["notes"] == []
    assert summary["counts"]["concepts"] == len(CONCEPTS)


def test_r1_labels_are_the_stricter_files(tmp_path):
    rows = mirflickr(tmp_path / "mir", n=30)
    assert _import(tmp_path / "mir", tmp_path / "r1.parquet", "--labels", "r1") == 0
    m = read_manifest(str(tmp_path / "r1.parquet")).to_pylist()
    for c in CONCEPTS:
        numbers = [i for i, r in enumerate(rows, 1) if c in r["concepts"]][::2]
        assert [i for i, r in enumerate(m, 1) if c in r["labels"]] == numbers, c


def test_fallbacks_tags_dir_no_owners_images_subdir(tmp_path):
    mirflickr(tmp_path / "mir", n=12, raw=False, owners=False, images_subdir=True)
    assert _import(tmp_path / "mir", tmp_path / "m.parquet") == 0
    m = read_manifest(str(tmp_path / "m.parquet")).to_pylist()
    assert [r["user_id"] for r in m] == [r["image_id"] for r in m]  # one user per image
    assert m[0]["uri"] == str(tmp_path / "mir" / "images" / "im1.jpg")
    notes = " ".join(json.loads((tmp_path / "m.summary.json").read_text())["notes"])
    assert "meta/tags/" in notes and "owner_ids" in notes


def test_malformed_annotation_names_file_and_line(tmp_path, capsys):
    mirflickr(tmp_path / "mir", n=12)
    bad = tmp_path / "mir" / "annotations" / "sky.txt"
    lines = bad.read_text().splitlines()
    bad.write_text("\n".join(lines[:1] + ["7a"] + lines[1:]) + "\n")
    out = tmp_path / "m.parquet"
    assert _import(tmp_path / "mir", out) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"tagray import: error: {bad}:2: expected a 1-based image number, got '7a'"
    assert not out.exists() and list(tmp_path.glob("m.parquet*")) == []  # no partial manifest left


def test_annotation_of_unknown_image_and_non_utf8_tags(tmp_path, capsys):
    mirflickr(tmp_path / "mir", n=12)
    (tmp_path / "mir" / "annotations" / "dog.txt").write_text("3\n99\n")
    assert _import(tmp_path / "mir", tmp_path / "m.parquet") == 2
    assert "dog.txt:2: image 99 has no tags file" in capsys.readouterr().err
    (tmp_path / "mir" / "annotations" / "dog.txt").write_text("3\n")
    (tmp_path / "mir" / "meta" / "tags_raw" / "tags5.txt").write_bytes(b"ok\ncaf\xe9\n")
    assert _import(tmp_path / "mir", tmp_path / "m.parquet") == 2
    assert "tags5.txt:2: not UTF-8 text" in capsys.readouterr().err


def test_missing_tags_directory_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert _import(tmp_path / "empty", tmp_path / "m.parquet") == 2
    assert "neither meta/tags_raw/ nor meta/tags/" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--labels=r2"])
def test_bad_flag_is_an_argparse_error(tmp_path, flag):
    with pytest.raises(SystemExit) as e:
        _import(tmp_path, tmp_path / "m.parquet", flag)
    assert e.value.code == 2
