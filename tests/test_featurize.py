"""`tagray featurize` on a local Ray: local files and an S3 endpoint over HTTP, with
injected bad objects, odd image modes, resume, determinism and backbone checks."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tagray.config import ConfigError
from tagray.data import schema, storage
from tagray.data.schema import SchemaError
from tagray.data.synth import SynthConfig, synthesize
from tagray.features import store
from tagray.features.pipeline import FeaturizeConfig, TooManyErrors, featurize
from tests.hostile import HOSTILE_IMAGES
from tests.images import bad_objects, odd_modes

# decodable images whose naive decode is gigabytes (1×30000 → 256×7,680,000 before the crop)
TALL_AND_WIDE = ("1x30000.png", "30000x2.jpg")

pytestmark = pytest.mark.integration

CFG = FeaturizeConfig(
    backbone="resnet18", weights="random", image_size=64, resize_size=72, batch_size=8,
    decode_batch_size=4, actors=1, shard_rows=16, block_rows=8, max_bytes=500_000, max_error_fraction=0.5,
)


def _corpus(root: str, images: int, seed: int, endpoint: str | None = None) -> pa.Table:
    """A rendered synth corpus plus odd-mode and bad objects under `root`; its manifest."""
    out = synthesize(SynthConfig(images=images, seed=seed, render_batch=images), root, endpoint_url=endpoint)
    manifest = schema.read_manifest(out["manifest"], endpoint_url=endpoint).select(["image_id", "user_id", "uri", "tags"])
    good = storage.read_bytes(manifest.column("uri")[0].as_py(), endpoint)
    extra = {name: (data, None, None) for name, data in odd_modes().items()} | bad_objects(good)
    extra |= {name: (HOSTILE_IMAGES[name](), None, None) for name in TALL_AND_WIDE}
    rows = []
    for name, (data, _, _) in extra.items():
        uri = storage.join(root, "extra", name)
        if data is not None:
            storage.write_bytes(uri, data, endpoint)
        rows.append({"image_id": f"x-{name}", "user_id": "odd", "uri": uri, "tags": ["x"]})
    return pa.concat_tables([manifest, pa.Table.from_pylist(rows, manifest.schema)])


def _features(out: str, endpoint: str | None = None) -> dict[str, np.ndarray]:
    table, _ = store.read_features(out, endpoint)
    return dict(zip(table.column("image_id").to_pylist(), np.stack(table.column("feature").to_numpy(zero_copy_only=False)), strict=True))


def _check_first_run(summary, manifest, out, endpoint=None):
    bad = bad_objects(b"")
    n_good = manifest.num_rows - len(bad)
    assert summary["featurized"] == n_good and summary["errors"] == len(bad)
    table, identity = store.read_features(out, endpoint)
    assert table.num_rows == n_good and len(set(table.column("image_id").to_pylist())) == n_good
    assert schema.validate_features(table.schema, out) == 512
    assert identity["name"] == "resnet18" and identity["weights_digest"] == "random-seed-0"
    assert identity["image_size"] == 64 and identity["mean"] == [0.485, 0.456, 0.406]
    assert {f"x-{m}" for m in [*odd_modes(), *TALL_AND_WIDE]} <= set(table.column("image_id").to_pylist())
    errors = store.read_errors(out, endpoint).to_pylist()
    assert sorted(e["image_id"] for e in errors) == sorted(f"x-{n}" for n in bad)
    for e in errors:
        _, stage, reason = bad[e["image_id"][2:]]
        assert e["stage"] == stage and e["reason"].startswith(reason), e
    assert len(summary["shards"]) == -(-n_good // CFG.shard_rows)  # shards of shard_rows rows


def test_local_featurize_errors_resume_determinism(ray_local, tmp_path):
    root = str(tmp_path / "corpus")
    manifest = _corpus(root, images=30, seed=0)
    m_uri = str(tmp_path / "m.parquet")
    schema.write_manifest(manifest, m_uri)
    out = str(tmp_path / "features")
    first = featurize(m_uri, out, CFG)
    _check_first_run(first, manifest, out)
    before = _features(out)

    # Re-run: only the failed images are tried again; nothing is written twice.
    again = featurize(m_uri, out, CFG)
    assert again["processed"] == len(bad_objects(b"")) and again["featurized"] == 0 and again["shards"] == []
    assert store.read_errors(out).num_rows == len(bad_objects(b""))

    # Resume with new images: only those are featurised, the old rows are untouched.
    more = schema.read_manifest(
        synthesize(SynthConfig(images=5, seed=9, render_batch=5), str(tmp_path / "more"))["manifest"]
    ).select(manifest.column_names)
    more = more.set_column(0, "image_id", pa.array([f"new-{i}" for i in range(5)]))
    schema.write_manifest(pa.concat_tables([manifest, more]), m_uri)
    resumed = featurize(m_uri, out, CFG)
    assert resumed["already_done"] == first["featurized"] and resumed["featurized"] == 5
    after = _features(out)
    assert len(after) == len(before) + 5
    assert all(np.array_equal(before[k], after[k]) for k in before)

    # A fresh run elsewhere gives the same features for the same images.
    fresh_out = str(tmp_path / "fresh")
    featurize(m_uri, fresh_out, FeaturizeConfig(**{**CFG.__dict__, "batch_size": 5}))
    fresh = _features(fresh_out)
    for k in before:
        np.testing.assert_allclose(fresh[k], before[k], rtol=1e-4, atol=1e-5)
    # Distinct images give distinct features (the backbone is not constant).
    ids = sorted(before)
    assert not np.allclose(before[ids[0]], before[ids[1]])


def test_other_backbone_refused_and_missing_weights(ray_local, tmp_path):
    root = str(tmp_path / "c")
    out = str(tmp_path / "f")
    m = synthesize(SynthConfig(images=6, render_batch=6), root)["manifest"]
    featurize(m, out, CFG)
    with pytest.raises(SchemaError, match=r"already holds features of another backbone .*random-seed-0.*random-seed-1"):
        featurize(m, out, FeaturizeConfig(**{**CFG.__dict__, "seed": 1}))
    with pytest.raises(ConfigError, match="--weights random"):
        featurize(m, str(tmp_path / "g"), FeaturizeConfig(backbone="resnet18"))
    with pytest.raises(FileNotFoundError, match="weights file .*absent.pth not found"):
        featurize(m, str(tmp_path / "g"), FeaturizeConfig(backbone="resnet18", weights=str(tmp_path / "absent.pth")))
    # Shards of two backbones in one directory are never read together.
    other = tmp_path / "other"
    featurize(m, str(other), FeaturizeConfig(**{**CFG.__dict__, "seed": 2}))
    stray = next(other.glob("part-*.parquet"))
    stray.rename(tmp_path / "f" / "part-zzzz-00000.parquet")
    with pytest.raises(SchemaError, match="mixes features of different backbones"):
        store.read_features(out)


def test_error_fraction_fails_run_but_keeps_work(ray_local, tmp_path):
    root = str(tmp_path / "c")
    manifest = _corpus(root, images=4, seed=1)
    m_uri = str(tmp_path / "m.parquet")
    schema.write_manifest(manifest, m_uri)
    with pytest.raises(TooManyErrors, match=r"6 of 17 images failed \(35.3% > max_error_fraction 10.0%\)"):
        featurize(m_uri, str(tmp_path / "f"), FeaturizeConfig(**{**CFG.__dict__, "max_error_fraction": 0.1}))
    assert pq.read_table(str(tmp_path / "f" / "errors.parquet")).num_rows == 6
    assert store.read_features(str(tmp_path / "f"))[0].num_rows == 11


def test_s3_featurize_errors_resume(ray_local, s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    root = f"s3://{bucket}/corpus"
    manifest = _corpus(root, images=20, seed=2, endpoint=endpoint)
    m_uri = f"s3://{bucket}/m.parquet"
    schema.write_manifest(manifest, m_uri, endpoint)
    out = f"s3://{bucket}/features"
    first = featurize(m_uri, out, CFG, endpoint_url=endpoint)
    _check_first_run(first, manifest, out, endpoint)
    before = _features(out, endpoint)
    # Same images from local disk give the same features as from S3.
    local_root = tmp_path / "local"
    for uri in manifest.column("uri").to_pylist()[:3]:
        storage.write_bytes(str(local_root / uri.rsplit("/", 1)[1]), storage.read_bytes(uri, endpoint))
    local_m = pa.table({
        "image_id": manifest.column("image_id").slice(0, 3), "user_id": manifest.column("user_id").slice(0, 3),
        "uri": [str(local_root / u.rsplit("/", 1)[1]) for u in manifest.column("uri").to_pylist()[:3]],
        "tags": manifest.column("tags").slice(0, 3),
    })
    schema.write_manifest(local_m, str(tmp_path / "lm.parquet"))
    featurize(str(tmp_path / "lm.parquet"), str(tmp_path / "lf"), CFG)
    for k, v in _features(str(tmp_path / "lf")).items():
        np.testing.assert_allclose(v, before[k], rtol=1e-4, atol=1e-5)
    # Resume: nothing new but the failures.
    again = featurize(m_uri, out, CFG, endpoint_url=endpoint)
    assert again["featurized"] == 0 and again["already_done"] == first["featurized"]
    assert len(_features(out, endpoint)) == len(before)
