"""`tagray import folder` on a photo library whose keywords were written by exiftool
(Debian libimage-exiftool-perl), a client tagray did not write: XMP dc:subject and
lr:hierarchicalSubject embedded and in sidecars, IPTC keywords."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tagray import cli
from tagray.data.schema import read_manifest
from tests.test_import_layouts import jpeg

EXIFTOOL = shutil.which("exiftool")
pytestmark = pytest.mark.skipif(EXIFTOOL is None and not os.environ.get("CI"), reason="exiftool missing: apt-get install libimage-exiftool-perl")


def exiftool(path: Path | list[Path], *assignments: str) -> None:
    """Writes tags with exiftool into `path` (or each of a list; a new .xmp sidecar when a
    path ends in .xmp and is absent)."""
    paths = [str(p) for p in (path if isinstance(path, list) else [path])]
    args = [EXIFTOOL, "-q", "-overwrite_original", "-charset", "iptc=UTF8", *assignments, *paths]
    subprocess.run(args, check=True, capture_output=True, timeout=60)


def library(root: Path, n: int = 0) -> dict[str, list[str]]:
    """A library: alice/…, bob/…, a top-level image; image path → expected keywords.
    `n` more plain JPEGs under carol/ (with a dc:subject each) for the pipeline test."""
    from PIL import Image

    for d in ("alice/2019", "bob", "carol"):
        (root / d).mkdir(parents=True)
    for rel in ("alice/2019/a.jpg", "alice/b.jpg", "top.jpg", "bob/e.JPG"):
        (root / rel).write_bytes(jpeg([0, 1], 1))
    Image.new("RGB", (24, 24), "green").save(root / "bob/c.png")
    Image.new("RGB", (24, 24), "blue").save(root / "bob/d.tif")
    exiftool(root / "alice/2019/a.jpg", "-XMP-dc:Subject=beach", "-XMP-dc:Subject=New York",
             "-XMP-lr:HierarchicalSubject=Places|USA|Manhattan", "-IPTC:Keywords=sunset", "-IPTC:Keywords=beach")
    exiftool(root / "alice/b.xmp", "-XMP-dc:Subject=dog", "-XMP-lr:HierarchicalSubject=Animals|Dog|Terrier")
    exiftool(root / "bob/c.png", "-XMP-dc:Subject=flower")
    exiftool(root / "bob/c.png.xmp", "-XMP-dc:Subject=rose", "-XMP-dc:Subject=tulip")
    exiftool(root / "bob/d.tif", "-IPTC:CodedCharacterSet=UTF8", "-IPTC:Keywords=café", "-IPTC:Keywords=Zürich")
    exiftool(root / "bob/e.JPG", "-XMP-dc:Subject=single")
    (root / "bob/notes.txt").write_text("not a photo")
    (root / "bob/broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    (root / "bob/.DS_Store").write_bytes(b"\0")
    exiftool(root / "orphan.xmp", "-XMP-dc:Subject=nothing")
    expected = {
        "alice/2019/a.jpg": ["beach", "New York", "Manhattan", "sunset"],
        "alice/b.jpg": ["dog", "Terrier"],  # sidecar b.xmp
        "bob/c.png": ["rose", "tulip", "flower"],  # sidecar c.png.xmp first, then embedded
        "bob/d.tif": ["café", "Zürich"],  # IPTC only, UTF-8
        "bob/e.JPG": ["single"],
        "top.jpg": [],
    }
    for i in range(n):
        rel = f"carol/p{i:02d}.jpg"
        concepts = [i % 4]
        (root / rel).write_bytes(jpeg(concepts, 100 + i))
        word = ("sky", "water", "tree", "dog")[i % 4]
        exiftool(root / rel, f"-XMP-dc:Subject={word}", "-XMP-dc:Subject=holiday")
        expected[rel] = [word, "holiday"]
    return expected


def test_keywords_from_xmp_sidecars_and_iptc(tmp_path):
    expected = library(tmp_path / "lib")
    out = tmp_path / "m.parquet"
    assert cli.main(["import", "folder", str(tmp_path / "lib"), "--out", str(out)]) == 0
    m = {r["image_id"]: r for r in read_manifest(str(out)).to_pylist()}
    assert {k: r["tags"] for k, r in m.items()} == expected
    assert m["alice/2019/a.jpg"]["user_id"] == "alice" and m["bob/c.png"]["user_id"] == "bob"
    assert m["top.jpg"]["user_id"] == "lib"  # directly under DIR: DIR's name
    assert m["bob/d.tif"]["uri"] == str(tmp_path / "lib" / "bob" / "d.tif")
    s = json.loads((tmp_path / "m.summary.json").read_text())
    assert s["skipped"] == {"hidden file": 1, "not an image file (.txt)": 1, "unreadable image": 1,
                            "sidecar without an image": 1}
    assert s["examples"]["sidecar without an image"] == ["orphan.xmp"]
    assert s["counts"] == {"images": 6, "embedded_keywords": 4, "sidecar_keywords": 2, "no_keywords": 1}


def test_user_flag_and_bad_sidecar(tmp_path, capsys):
    library(tmp_path / "lib")
    out = tmp_path / "m.parquet"
    assert cli.main(["import", "folder", str(tmp_path / "lib"), "--out", str(out), "--user", "me"]) == 0
    assert set(read_manifest(str(out)).column("user_id").to_pylist()) == {"me"}
    (tmp_path / "lib" / "alice" / "b.xmp").write_text("<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF")
    assert cli.main(["import", "folder", str(tmp_path / "lib"), "--out", str(tmp_path / "n.parquet")]) == 2
    assert f"{tmp_path / 'lib' / 'alice' / 'b.xmp'}: not a valid XMP packet" in capsys.readouterr().err
    assert not (tmp_path / "n.parquet").exists()


@pytest.mark.integration
def test_library_on_s3_same_as_local(s3_bucket, tmp_path):
    import boto3

    endpoint, bucket = s3_bucket
    expected = library(tmp_path / "lib")
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for f in (tmp_path / "lib").rglob("*"):
        if f.is_file():
            client.upload_file(str(f), bucket, "photos/" + f.relative_to(tmp_path / "lib").as_posix())
    out = f"s3://{bucket}/m.parquet"
    argv = ["import", "folder", f"s3://{bucket}/photos", "--out", out, "--endpoint-url", endpoint]
    assert cli.main(argv) == 0
    m = {r["image_id"]: r for r in read_manifest(out, endpoint_url=endpoint).to_pylist()}
    assert {k: r["tags"] for k, r in m.items()} == expected
    assert m["bob/c.png"]["uri"] == f"s3://{bucket}/photos/bob/c.png"
    assert m["top.jpg"]["user_id"] == "photos"
