"""Imported corpora through the rest of tagray on a local Ray: import → split → stats →
featurize → train → evaluate, with the MIRFlickr corpus on the S3 endpoint and a photo
folder on local disk; NUS-WIDE with synthetic features instead of featurize; YFCC100M
import → split → stats (no Ray needed)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tagray.data import schema
from tagray.data.schema import read_manifest
from tests.commands import cli
from tests.test_import_folder import EXIFTOOL, exiftool
from tests.test_import_layouts import CONCEPTS, jpeg, mirflickr, nuswide, yfcc_row

FEATURIZE = ["--backbone", "resnet18", "--weights", "random", "--actors", "1", "--batch-size", "16",
             "shard_rows=1000", "image_size=64", "resize_size=64"]
TRAIN = ["epochs=3", "lr=0.05", "worker_cpus=0.5", "checkpoint_every=10", "batch_size=16"]


def _train_evaluate(manifest: str, features: str, tmp: Path, *endpoint: str) -> dict:
    cli("train", "--head", "lr", "--manifest", manifest, "--features", features, "--out", str(tmp / "model"),
         *endpoint, *TRAIN)
    report = tmp / "report.json"
    cli("evaluate", "--model", str(tmp / "model"), "--manifest", manifest, "--features", features,
         "--out", str(report), *endpoint)
    return json.loads(report.read_text())


def _stats(manifest: str, tmp: Path, *endpoint: str) -> dict:
    # stats' --out is local: `tagray stats` writes its outputs without the endpoint (see report)
    cli("stats", "--manifest", manifest, "--out", str(tmp / "stats"), *endpoint)
    return json.loads((tmp / "stats" / "stats.json").read_text())


def _latent_features(manifest: str, path: Path, dim: int = 32, seed: int = 0) -> str:
    """tagray-synth-style features for a manifest's images: Σ concept means + noise."""
    m = read_manifest(manifest)
    rng = np.random.default_rng(seed)
    mu = {c: rng.standard_normal(dim) for c in CONCEPTS}
    labels = m.column("labels").to_pylist() if "labels" in m.column_names else [[]] * m.num_rows
    x = np.stack([sum((mu[c] for c in ls), np.zeros(dim)) + 0.3 * rng.standard_normal(dim) for ls in labels])
    identity = {"name": "synthetic-latent", "seed": seed, "dim": dim, "noise": 0.3}
    table = pa.table({"image_id": m.column("image_id"),
                      "feature": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel(), pa.float32()), dim)})
    table = table.cast(schema.with_backbone_identity(schema.features_schema(dim), identity))
    pq.write_table(table, path)
    return str(path)


@pytest.mark.integration
def test_mirflickr_on_s3_end_to_end(ray_local, s3_bucket, tmp_path):
    import boto3

    endpoint, bucket = s3_bucket
    ep = ("--endpoint-url", endpoint)
    mirflickr(tmp_path / "mir", n=60)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for f in (tmp_path / "mir").rglob("*"):
        if f.is_file():
            client.upload_file(str(f), bucket, "mir/" + f.relative_to(tmp_path / "mir").as_posix())
    s3 = f"s3://{bucket}"
    out = cli("import", "mirflickr", f"{s3}/mir", "--out", f"{s3}/manifest.parquet", *ep)
    assert out.startswith("imported 60 images from mirflickr")
    cli("split", "--manifest", f"{s3}/manifest.parquet", "--out", f"{s3}/split.parquet", *ep,
         "train=0.6", "val=0.2", "test=0.2")
    m = read_manifest(f"{s3}/split.parquet", endpoint_url=endpoint)
    assert m.column("uri")[0].as_py() == f"{s3}/mir/im1.jpg" and len(m.column("user_id").unique()) == 12
    stats = _stats(f"{s3}/split.parquet", tmp_path, *ep)
    # The fixture tags a present concept with probability 0.7 (plurals and Title Case merged
    # by the normaliser): labels and tags line up only if both were imported per image.
    assert 0.55 < stats["labels"]["overall_tagging_likelihood"] < 0.85
    cli("featurize", "--manifest", f"{s3}/split.parquet", "--out", f"{s3}/features", *ep, *FEATURIZE)
    summary = json.loads(client.get_object(Bucket=bucket, Key="features/summary.json")["Body"].read())
    assert summary["featurized"] == 60 and summary["errors"] == 0  # every JPEG fetched from S3
    report = _train_evaluate(f"{s3}/split.parquet", f"{s3}/features", tmp_path, *ep)
    assert report["annotation"]["map_label"] > 0  # labels reached evaluation
    assert set(report["tag_prediction"]) >= {"precision@5", "recall@5", "f1@5"}


@pytest.mark.integration
@pytest.mark.skipif(EXIFTOOL is None and not os.environ.get("CI"), reason="exiftool missing: apt-get install libimage-exiftool-perl")
def test_folder_local_end_to_end(ray_local, tmp_path):
    lib = tmp_path / "photos"
    by_word: dict[str, list[Path]] = {}
    for i in range(48):
        user, word = f"user{i % 8}", CONCEPTS[i % 4]
        (lib / user).mkdir(parents=True, exist_ok=True)
        path = lib / user / f"IMG_{i:04d}.jpg"
        path.write_bytes(jpeg([i % 4], 500 + i))
        by_word.setdefault(word, []).append(path)
    for word, paths in by_word.items():  # one exiftool run per keyword set
        exiftool(paths, f"-XMP-dc:Subject={word}", "-XMP-lr:HierarchicalSubject=Trips|Holiday")
    manifest = str(tmp_path / "manifest.parquet")
    cli("import", "folder", str(lib), "--out", manifest)
    split = str(tmp_path / "split.parquet")
    cli("split", "--manifest", manifest, "--out", split, "train=0.5", "val=0.25", "test=0.25")
    stats = _stats(split, tmp_path)
    assert stats["images"] == 48 and {t["tag"] for t in stats["top_tags"]} >= {*CONCEPTS, "holiday"}
    cli("featurize", "--manifest", split, "--out", str(tmp_path / "features"), *FEATURIZE)
    report = _train_evaluate(split, str(tmp_path / "features"), tmp_path)
    assert report["tag_prediction"]["precision@5"] > 0


@pytest.mark.integration
def test_nuswide_official_split_to_evaluation(ray_local, tmp_path):
    nuswide(tmp_path / "nus", n=90)
    nus = str(tmp_path / "nus.parquet")
    cli("import", "nuswide", str(tmp_path / "nus"), "--out", nus, "--val", "0.3")  # official test kept
    assert set(read_manifest(nus).column("split").to_pylist()) == {"train", "val", "test"}
    assert _stats(nus, tmp_path)["labels"]["overall_tagging_likelihood"] > 0.5
    report = _train_evaluate(nus, _latent_features(nus, tmp_path / "features.parquet"), tmp_path)
    assert report["annotation"]["map_label"] > 0.5  # the latent features carry the imported labels


def test_yfcc_import_split_stats(tmp_path):
    with open(tmp_path / "yfcc.tsv", "w") as f:
        for i in range(200):
            f.write(yfcc_row(i, [CONCEPTS[i % 4], "new york"], f"{i % 20}@N00", video=i % 10 == 0) + "\n")
    yfcc = str(tmp_path / "yfcc.parquet")
    cli("import", "yfcc100m", str(tmp_path / "yfcc.tsv"), "--out", yfcc)
    split = str(tmp_path / "split.parquet")
    cli("split", "--manifest", yfcc, "--out", split)
    assert set(read_manifest(split).column("split").to_pylist()) == {"train", "val", "test"}
    stats = _stats(split, tmp_path)
    assert stats["images"] == 180 and "new york" in {t["tag"] for t in stats["top_tags"]}
