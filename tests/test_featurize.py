"""`tagray featurize` on a local Ray: local files and an S3 endpoint over HTTP, with
injected bad objects, odd image modes, resume, determinism and backbone checks; the
workers write the shards (the driver sees only bookkeeping), and a run whose whole Ray
cluster is SIGKILLed mid-way resumes without duplicates."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def _temporaries(out: str, endpoint: str | None = None) -> list[str]:
    import pyarrow.fs as pafs

    fs, path = storage.filesystem_for(out, endpoint)
    return [e.base_name for e in fs.get_file_info(pafs.FileSelector(path, recursive=False))
            if e.base_name.startswith(store.TMP_PREFIX)]


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
    # one shard per block of shard_rows images (failed ones count but are not written), the last smaller
    assert len(summary["shards"]) == -(-manifest.num_rows // CFG.shard_rows)
    rows = [pq.read_metadata(storage.filesystem_for(s, endpoint)[1], filesystem=storage.filesystem_for(s, endpoint)[0]).num_rows
            for s in summary["shards"]]
    assert sum(rows) == n_good and max(rows) <= CFG.shard_rows
    # Each shard is named by its content and carries the identity in its Parquet schema metadata.
    for uri in summary["shards"]:
        fs, path = storage.filesystem_for(uri, endpoint)
        meta = pq.read_schema(path, filesystem=fs).metadata
        assert json.loads(meta[schema.BACKBONE_METADATA_KEY]) == json.loads(json.dumps(summary["backbone"]))
        ids = pq.read_table(path, filesystem=fs, columns=["image_id"]).column("image_id").to_pylist()
        assert uri.rsplit("/", 1)[1] == store.shard_name(ids)
    # The driver received bookkeeping (a row per shard and per failed image), not features: under a
    # twentieth of one feature per image.
    assert 0 < summary["driver_record_bytes"] < n_good * 512 * 4 / 20
    assert _temporaries(out, endpoint) == []


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
    # One batch (fewer images than batch_size): all of it is start-up, there is no steady rate.
    assert again["processed"] <= CFG.batch_size and "steady_images_per_second" not in again

    # Resume with new images: only those are featurised, the old rows are untouched.
    more = schema.read_manifest(
        synthesize(SynthConfig(images=5, seed=9, render_batch=5), str(tmp_path / "more"))["manifest"]
    ).select(manifest.column_names)
    more = more.set_column(0, "image_id", pa.array([f"new-{i}" for i in range(5)]))
    schema.write_manifest(pa.concat_tables([manifest, more]), m_uri)
    resumed = featurize(m_uri, out, CFG)
    assert resumed["already_done"] == first["featurized"] and resumed["featurized"] == 5
    # A run of less than a shard but more than a batch: its start-up ends when the first batch
    # leaves the backbone, not when its one shard is written (which had made the whole run
    # start-up, with no steady rate); the steady rate counts the images after that batch.
    assert resumed["processed"] > CFG.batch_size and resumed["processed"] < CFG.shard_rows
    assert 0 < resumed["startup_seconds"] < resumed["pipeline_seconds"]
    assert "steady_images_per_second" in resumed
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
    # A half-written shard a killed run left on S3 (its temporary name) is never read, and is removed.
    stale = storage.join(out, f"{store.TMP_PREFIX}0123456789ab-part-00000000000000000000.parquet")
    storage.write_bytes(stale, b"PAR1 half a shard", endpoint)
    assert len(_features(out, endpoint)) == len(before)
    # Resume: nothing new but the failures.
    again = featurize(m_uri, out, CFG, endpoint_url=endpoint)
    assert again["featurized"] == 0 and again["already_done"] == first["featurized"]
    assert again["temporaries_removed"] == 1 and _temporaries(out, endpoint) == []
    assert len(_features(out, endpoint)) == len(before)


def _block(ids: list[str], reasons: list[str], dim: int = 4) -> dict[str, np.ndarray]:
    """A block as the backbone actors hand it to the write stage."""
    n = len(ids)
    return {
        "image_id": np.array(ids, dtype=object), "uri": np.array([f"/img/{i}.jpg" for i in ids], dtype=object),
        "stage": np.array(["decode" if r else "" for r in reasons], dtype=object),
        "reason": np.array(reasons, dtype=object),
        "feature": np.arange(n * dim, dtype=np.float32).reshape(n, dim),
        # when each image's batch left the backbone: the first n − 1 in the first batch, the last in a later one
        "embedded_at": np.r_[np.full(n - 1, 1000.0), 1001.0] if n > 1 else np.full(n, 1000.0),
    }


def test_write_block_is_idempotent_and_returns_bookkeeping(tmp_path):
    """The write stage alone (what each Ray write task runs): a block written twice (a retried
    task) is one shard, not two copies of its rows; what it returns holds no feature."""
    identity = {"name": "toy", "dim": 4}
    out = str(tmp_path / "f")
    block = _block(["b", "a", "c"], ["", "corrupt image: truncated", ""])
    first = store.write_feature_block(block, out, 4, identity)
    again = store.write_feature_block(block, out, 4, identity)
    assert first.schema == store.RECORDS_SCHEMA and "feature" not in first.column_names
    assert first.equals(again)
    # first_embedded_at: the block's earliest time out of the backbone; first_batch_rows: the
    # images stamped with it, once per block
    assert first.to_pylist() == [
        {"shard": store.shard_name(["b", "c"]), "rows": 2, "image_id": None, "uri": None, "stage": None, "reason": None,
         "first_embedded_at": 1000.0, "first_batch_rows": 2},
        {"shard": None, "rows": 0, "image_id": "a", "uri": "/img/a.jpg", "stage": "decode",
         "reason": "corrupt image: truncated", "first_embedded_at": 1000.0, "first_batch_rows": 0},
    ]
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == [store.shard_name(["b", "c"])]
    table, found = store.read_features(out)
    assert table.column("image_id").to_pylist() == ["b", "c"] and found == identity
    np.testing.assert_array_equal(np.stack(table.column("feature").to_numpy(zero_copy_only=False)),
                                  block["feature"][[0, 2]])
    assert store.shard_name(["c", "b"]) == store.shard_name(["b", "c"]) != store.shard_name(["b", "c", "d"])
    # A block of failures only writes nothing.
    only_errors = store.write_feature_block(_block(["d"], ["missing object"]), out, 4, identity)
    assert only_errors.column("shard").to_pylist() == [None] and len(list((tmp_path / "f").iterdir())) == 1


def _seen(rows: pa.Table) -> pa.Table:
    return rows.append_column("seen", pa.array([rows.num_rows] * rows.num_rows))


def test_a_small_run_is_cut_into_decode_tasks_of_one_block_each(ray_local):
    """160 manifest rows in blocks of 32 are 5 decode tasks of 2 calls of 16, so both backbone
    actors get work. Fused after the expanding map, Ray Data bundled the decode stage's input by
    its batch size counted in start rows: 16 starts of 32 rows each, so the whole run was one
    task and one block of 160 rows, embedded by one actor (BENCHMARKS.md, *Feature extraction*)."""
    from tagray.features.pipeline import manifest_rows

    table = pa.table({"image_id": [f"i{i:03d}" for i in range(160)], "uri": [f"/x/{i}.jpg" for i in range(160)]})
    ds = manifest_rows(table, 32, 2.0, 0.25, then=_seen, then_rows=16)
    blocks = [b for b in ds.iter_batches(batch_size=None, batch_format="pyarrow")]
    assert sorted(b.num_rows for b in blocks) == [32] * 5
    assert {v for b in blocks for v in b.column("seen").to_pylist()} == {16}
    assert sorted(i for b in blocks for i in b.column("image_id").to_pylist()) == table.column("image_id").to_pylist()
    # without `then`: the rows themselves, each once (what benchmarks/featurize_start.py counts)
    assert manifest_rows(table, 32, 2.0, 0.25).count() == 160


def test_driver_iterates_bookkeeping_only(ray_local, tmp_path):
    """The dataset the driver iterates has the bookkeeping schema and no feature column; the
    shards it names were written by the workers."""
    from tagray.features.pipeline import _resources, prepare_backbone, records_dataset

    manifest = schema.read_manifest(
        synthesize(SynthConfig(images=12, seed=4, render_batch=12), str(tmp_path / "c"))["manifest"]
    ).select(["image_id", "uri"])
    manifest = pa.concat_tables([manifest, pa.table({"image_id": ["gone"], "uri": [str(tmp_path / "gone.jpg")]})])
    out = str(tmp_path / "f")
    ds = records_dataset(manifest, out, CFG, prepare_backbone(CFG), _resources(CFG))
    batches = list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    assert batches and all(b.schema == store.RECORDS_SCHEMA for b in batches)
    records = pa.concat_tables(batches)
    shards = [s for s in records.column("shard").to_pylist() if s is not None]
    assert sorted(shards) == sorted(p.name for p in Path(out).glob("part-*.parquet"))
    assert sum(records.column("rows").to_pylist()) == 12 == store.read_features(out)[0].num_rows
    failed = records.filter(pa.compute.is_null(records.column("shard")))
    assert failed.column("image_id").to_pylist() == ["gone"] and failed.column("stage").to_pylist() == ["fetch"]


_KILLED_RUN = """
import json, sys
from tagray.features.pipeline import FeaturizeConfig, featurize
from tagray.runtime import init_ray
init_ray(num_cpus=2)
fields = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(sys.argv[3]).items()}
featurize(sys.argv[1], sys.argv[2], FeaturizeConfig(**fields))
"""


def _session_processes(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid`: the driver, its Ray cluster, the workers."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat="], capture_output=True, text=True, check=True).stdout
    return [int(pid) for pid, s, stat in (line.split() for line in out.splitlines()) if int(s) == sid and "Z" not in stat]


def test_killed_run_resumes_without_duplicates(ray_local, tmp_path):
    """A run in its own process with its own Ray cluster, all of it SIGKILLed once shards have
    appeared (a crashed machine: no clean-up runs): what it left is readable, and the re-run
    featurises exactly the rest, once each, and removes the half-written temporaries."""
    images = 240
    m = synthesize(SynthConfig(images=images, seed=6, render_batch=images), str(tmp_path / "c"))["manifest"]
    out = tmp_path / "f"
    cfg = {**to_jsonable(CFG), "shard_rows": 8}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, m, str(out), json.dumps(cfg)], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while len(list(out.glob("part-*.parquet"))) < 2:  # polled with a deadline, not a fixed sleep
            assert proc.poll() is None, "the run ended before it was killed"
            assert time.monotonic() < deadline, "no shards within 600 s"
            time.sleep(0.2)
    finally:
        for pid in _session_processes(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 60
        while _session_processes(proc.pid):  # every worker gone: nothing can write any more
            assert time.monotonic() < deadline, "the killed run's processes did not exit"
            time.sleep(0.2)
    assert not (out / "summary.json").exists()
    left, _ = store.read_features(str(out))
    done = left.column("image_id").to_pylist()
    assert 0 < len(done) < images and len(set(done)) == len(done)

    resumed = featurize(m, str(out), FeaturizeConfig(**{**CFG.__dict__, "shard_rows": 8}))
    assert resumed["already_done"] == len(done) and resumed["featurized"] == images - len(done)
    assert _temporaries(str(out)) == []
    table, _ = store.read_features(str(out))
    ids = table.column("image_id").to_pylist()
    assert len(ids) == images and len(set(ids)) == images
    # The killed run's shards are untouched.
    kept = _features(str(out))
    before = dict(zip(done, np.stack(left.column("feature").to_numpy(zero_copy_only=False)), strict=True))
    assert all(np.array_equal(before[k], kept[k]) for k in done)


def to_jsonable(cfg: FeaturizeConfig) -> dict:
    from tagray.config import to_dict

    return json.loads(json.dumps(to_dict(cfg)))


def test_a_busy_cluster_gets_a_pool_of_what_fits_or_a_clear_error_in_time(ray_local, tmp_path):
    """Beside a job holding all but 0.5 of the CPUs (as a Serve app does): the default pool
    (one 0.75-CPU actor per CPU) cannot start one actor, and the run fails within its deadline
    naming the CPUs asked for and free; with actors that fit, the run finishes — also every
    stage between them (the repartition into shards reserved 1 CPU and never ran)."""
    import concurrent.futures

    import ray

    from tagray.resources import NotEnoughResources

    manifest = schema.read_manifest(synthesize(SynthConfig(images=12, seed=4, render_batch=12),
                                               str(tmp_path / "corpus"))["manifest"])
    m_uri = str(tmp_path / "m.parquet")
    schema.write_manifest(manifest, m_uri)
    hold = ray.cluster_resources()["CPU"] - 0.5  # scheduled once whatever ran before has let go

    @ray.remote(num_cpus=hold)
    class Holder:
        def ping(self) -> int:
            return 1

    holder = Holder.remote()
    ray.get(holder.ping.remote(), timeout=120)
    default_pool = dataclasses.replace(CFG, actors=None)  # one actor of 0.75 CPU per CPU
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a deadline on runs that would wait for ever
        try:  # (the holder goes before the pool is joined, so a run that hung can finish)
            t0 = time.monotonic()
            refused = pool.submit(featurize, m_uri, str(tmp_path / "refused"),
                                  dataclasses.replace(default_pool, resources_wait_s=5))
            with pytest.raises(NotEnoughResources, match=r"0\.75 per actor.* 0\.5 of 2 CPUs free.*no actor started in 5s"):
                refused.result(timeout=120)
            assert time.monotonic() - t0 < 90
            small = dataclasses.replace(default_pool, actor_cpus=0.25, decode_cpus=0.1, write_cpus=0.1,
                                        resources_wait_s=60)
            summary = pool.submit(featurize, m_uri, str(tmp_path / "fits"), small).result(timeout=300)
        finally:
            ray.kill(holder)
    assert summary["featurized"] == 12 and summary["errors"] == 0
    assert summary["resources"]["actors_at_start"] == 1 and summary["resources"]["free_cpus_at_start"] == 0.5
    assert summary["resources"]["max_actors"] == 2  # grows to one per CPU when they free up
