"""`tagray import nuswide` on corpora built in the NUS-WIDE release layout."""

from __future__ import annotations

import json

from tagray import cli
from tagray.data.schema import read_manifest
from tests.test_import_layouts import nuswide


def _import(root, out, *extra) -> int:
    return cli.main(["import", "nuswide", str(root), "--out", str(out), *extra])


def test_tags_labels_official_split_urls(tmp_path):
    rows = nuswide(tmp_path / "nus", n=30)
    assert _import(tmp_path / "nus", tmp_path / "m.parquet") == 0
    m = read_manifest(str(tmp_path / "m.parquet")).to_pylist()
    assert [r["image_id"] for r in m] == [r["photo_id"] for r in rows]
    for got, want in zip(m, rows, strict=True):
        assert got["tags"] == want["tags"]
        assert got["labels"] == sorted(want["concepts"])
        assert got["split"] == want["split"]  # the official TrainImagelist / TestImagelist
        assert got["uri"] == want["url"]  # url_Middle, url_Large where Middle is null (row 3)
        assert got["user_id"] == got["image_id"]
    assert m[3]["uri"].endswith("_b.jpg")
    summary = json.loads((tmp_path / "m.summary.json").read_text())
    assert "users unknown" in summary["notes"][0]
    assert summary["counts"]["split_train"] == 20 and summary["counts"]["split_test"] == 10


def test_val_carved_from_train_seeded(tmp_path):
    rows = nuswide(tmp_path / "nus", n=60)
    assert _import(tmp_path / "nus", tmp_path / "a.parquet", "--val", "0.25") == 0
    assert _import(tmp_path / "nus", tmp_path / "b.parquet", "--val", "0.25") == 0
    a = read_manifest(str(tmp_path / "a.parquet")).column("split").to_pylist()
    assert a == read_manifest(str(tmp_path / "b.parquet")).column("split").to_pylist()
    official = [r["split"] for r in rows]
    assert all(s == "test" for s, o in zip(a, official, strict=True) if o == "test")  # test untouched
    moved = sum(s == "val" for s in a)
    assert 4 <= moved <= 18  # about a quarter of the 40 training images


def test_local_images_directory(tmp_path):
    rows = nuswide(tmp_path / "nus", n=6)
    assert _import(tmp_path / "nus", tmp_path / "m.parquet", "--images", str(tmp_path / "Flickr")) == 0
    m = read_manifest(str(tmp_path / "m.parquet")).to_pylist()
    concept, name = rows[0]["file"].split("\\")
    assert m[0]["uri"] == str(tmp_path / "Flickr" / concept / name)


def test_bad_label_value_error_or_skipped_with_flag(tmp_path, capsys):
    nuswide(tmp_path / "nus", n=12)
    f = tmp_path / "nus" / "Groundtruth" / "AllLabels" / "Labels_tree.txt"
    values = f.read_text().splitlines()
    values[6] = "2"
    f.write_text("\n".join(values) + "\n")
    assert _import(tmp_path / "nus", tmp_path / "m.parquet") == 2
    err = capsys.readouterr().err
    assert f"{f}:7: label value '2' is not 0 or 1" in err and "--skip-bad-labels" in err
    assert not (tmp_path / "m.parquet").exists()
    assert _import(tmp_path / "nus", tmp_path / "m.parquet", "--skip-bad-labels") == 0
    assert read_manifest(str(tmp_path / "m.parquet")).num_rows == 11
    summary = json.loads((tmp_path / "m.summary.json").read_text())
    assert summary["skipped"] == {"label value not 0/1 (--skip-bad-labels)": 1}
    assert summary["examples"]["label value not 0/1 (--skip-bad-labels)"] == [f"{f}:7: '2'"]


def test_tags_out_of_order_and_short_label_file(tmp_path, capsys):
    nuswide(tmp_path / "nus", n=8)
    tags = tmp_path / "nus" / "NUS_WID_Tags" / "All_Tags.txt"
    lines = tags.read_text().splitlines()
    lines[2], lines[3] = lines[3], lines[2]
    tags.write_text("\n".join(lines) + "\n")
    assert _import(tmp_path / "nus", tmp_path / "m.parquet") == 2
    assert f"{tags}:3: expected photo id" in capsys.readouterr().err
    lines[2], lines[3] = lines[3], lines[2]
    tags.write_text("\n".join(lines) + "\n")
    label = tmp_path / "nus" / "Groundtruth" / "AllLabels" / "Labels_sky.txt"
    label.write_text("\n".join(label.read_text().splitlines()[:5]) + "\n")
    assert _import(tmp_path / "nus", tmp_path / "m.parquet") == 2
    assert f"{label}: ends after 5 lines" in capsys.readouterr().err
