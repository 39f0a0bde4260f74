"""`tagray features import`: each source format into tagray's feature shards (values equal),
the external identity and the checks every later stage makes with it, the error for a
feature file without an identity, bad inputs with the row or line they name, and S3."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tagray import cli
from tagray.data import schema, storage
from tagray.data.normalize import NormalizerConfig, TagNormalizer
from tagray.data.schema import SchemaError
from tagray.features import store
from tagray.features.external import ImportConfig, import_features, public_uri
from tagray.heads.artifact import SavedHead, save_head
from tagray.heads.fit import HeadConfig
from tagray.heads.linear import LinearTagger
from tagray.train.run import training_inputs
from tests.corpora import split_corpus

RNG = np.random.default_rng(13)
X = RNG.standard_normal((23, 6))  # float64 source values
IDS = [f"img-{i:03d}" for i in range(len(X))]


def _read(out: str | Path, endpoint_url: str | None = None) -> tuple[dict[str, np.ndarray], dict]:
    table, identity = store.read_features(str(out), endpoint_url)
    feats = table.column("feature").combine_chunks()
    x = feats.flatten().to_numpy().reshape(-1, feats.type.list_size)
    return dict(zip(table.column("image_id").to_pylist(), x, strict=True)), identity


def _assert_round_trip(out: Path, ids: list[str], x: np.ndarray) -> dict:
    got, identity = _read(out)
    assert sorted(got) == sorted(ids)
    for i, image_id in enumerate(ids):
        np.testing.assert_array_equal(got[image_id], x[i].astype(np.float32))
    return identity


def _sha(*paths: Path) -> str:
    return "sha256:" + hashlib.sha256(b"".join(p.read_bytes() for p in paths)).hexdigest()


def _import(src, out, name="ext", **kw) -> dict:
    return import_features(str(src), str(out), ImportConfig(name=name, **kw))


# ---- each source format, values equal ------------------------------------------------------------------


def test_parquet_list_column_round_trip_in_shards(tmp_path):
    src = tmp_path / "clip.parquet"
    pq.write_table(pa.table({"image_id": IDS, "embedding": pa.array(X.tolist(), pa.list_(pa.float64())),
                             "caption": ["x"] * len(IDS)}), src, row_group_size=5)
    summary = _import(src, tmp_path / "f", name="clip-b32", shard_rows=4, batch_rows=7)
    assert summary["rows"] == 23 and summary["dim"] == 6 and summary["shards"] == 6  # ceil(23 / 4)
    assert len(list((tmp_path / "f").glob("part-*.parquet"))) == 6
    identity = _assert_round_trip(tmp_path / "f", IDS, X)
    assert identity == {"kind": "external", "name": "clip-b32", "dim": 6, "source": str(src),
                        "source_digest": _sha(src), "format": "parquet"}
    # The shards are tagray's contract: image_id string, feature fixed_size_list<float32>[6].
    s = pq.read_schema(next((tmp_path / "f").glob("part-*.parquet")))
    assert schema.validate_features(s, "shard") == 6 and s.field("image_id").type == pa.string()
    assert schema.backbone_identity(s) == identity
    assert json.loads((tmp_path / "f" / "summary.json").read_text())["identity"] == identity


def test_parquet_fixed_size_list_with_integer_ids_and_a_directory_source(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    photo = np.arange(1000, 1000 + len(X), dtype=np.int64)
    x32 = X.astype(np.float32)
    for k, (lo, hi) in enumerate(((0, 10), (10, 23))):  # two files, read in name order
        flat = pa.array(x32[lo:hi].ravel())
        pq.write_table(pa.table({"photo": photo[lo:hi], "vec": pa.FixedSizeListArray.from_arrays(flat, 6)}),
                       d / f"part{k}.parquet")
    (d / "_SUCCESS").write_text("")  # not a .parquet file: ignored
    _import(d, tmp_path / "f", id_column="photo")
    identity = _assert_round_trip(tmp_path / "f", [str(p) for p in photo], x32)
    assert identity["source_digest"] == _sha(d / "part0.parquet", d / "part1.parquet")


def test_parquet_several_float_columns_in_the_order_given(tmp_path):
    cols = {f"f{j}": X[:, j] for j in range(6)}
    src = tmp_path / "cols.parquet"
    pq.write_table(pa.table({"image_id": IDS, **cols, "year": np.full(len(IDS), 2020)}), src)
    # Default: every floating-point column in file order (the integer 'year' is not a feature).
    _import(src, tmp_path / "a")
    _assert_round_trip(tmp_path / "a", IDS, X)
    # Named columns, in the order named, via the command line (comma-separated and repeated).
    rc = cli.main(["features", "import", str(src), "--out", str(tmp_path / "b"), "--name", "ext",
                   "--feature-column", "f5,f4", "--feature-column", "f0"])
    assert rc == 0
    _assert_round_trip(tmp_path / "b", IDS, X[:, [5, 4, 0]])


@pytest.mark.parametrize("dtype", ["<f8", ">f4", "<f2", "<i4"])
def test_npy_with_an_id_list(tmp_path, dtype):
    x = (X * 100 if dtype == "<i4" else X).astype(dtype)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "ids.txt").write_text("\n".join(IDS) + "\n")
    identity = _import(tmp_path / "x.npy", tmp_path / "f", ids=str(tmp_path / "ids.txt"), batch_rows=5)["identity"]
    _assert_round_trip(tmp_path / "f", IDS, x.astype(np.float64))
    assert identity["format"] == "npy" and identity["source_digest"] == _sha(tmp_path / "x.npy")
    assert identity["ids"] == str(tmp_path / "ids.txt") and identity["ids_digest"] == _sha(tmp_path / "ids.txt")


def test_npy_with_ids_from_a_parquet_column(tmp_path):
    np.save(tmp_path / "x.npy", X)
    pq.write_table(pa.table({"name": IDS}), tmp_path / "ids.parquet")
    _import(tmp_path / "x.npy", tmp_path / "f", ids=str(tmp_path / "ids.parquet"), id_column="name", batch_rows=4)
    _assert_round_trip(tmp_path / "f", IDS, X)


def _nuswide(root: Path, x: np.ndarray, windows_paths: bool = False) -> tuple[Path, Path, list[str]]:
    """NUS-WIDE's layout: ImageList/Imagelist.txt (CRLF, `<concept>\\<NNNN>_<photo id>.jpg`) and a
    `Normalized_CH.dat`-style file: one image a line, space-separated, a trailing space."""
    (root / "ImageList").mkdir(parents=True)
    (root / "Low_Level_Features").mkdir()
    photo_ids = [str(2124494179 + 7 * i) for i in range(len(x))]
    prefix = "C:\\ImageData\\Flickr\\" if windows_paths else ""
    concepts = ["actor", "airport", "animal"]
    lines = [f"{prefix}{concepts[i % 3]}\\{i:04d}_{pid}.jpg" for i, pid in enumerate(photo_ids)]
    (root / "ImageList" / "Imagelist.txt").write_bytes(("\r\n".join(lines) + "\r\n").encode())
    dat = root / "Low_Level_Features" / "Normalized_CH.dat"
    dat.write_text("".join(" ".join(f"{v:.6f}" for v in row) + " \n" for row in x))
    return dat, root / "ImageList" / "Imagelist.txt", photo_ids


@pytest.mark.parametrize("windows_paths", [False, True])
def test_nuswide_dat_with_the_imagelist(tmp_path, windows_paths):
    x = np.round(np.abs(X), 6)  # the .dat holds 6 decimals
    dat, imagelist, photo_ids = _nuswide(tmp_path / "NUS-WIDE", x, windows_paths)
    rc = cli.main(["features", "import", str(dat), "--ids", str(imagelist), "--out", str(tmp_path / "f"),
                   "--name", "nuswide-ch", "--batch-rows", "4"])
    assert rc == 0
    identity = _assert_round_trip(tmp_path / "f", photo_ids, x)  # image_id = the Flickr photo id
    assert identity["format"] == "text" and identity["source_digest"] == _sha(dat)


def test_an_id_list_of_plain_lines_is_taken_as_is(tmp_path):
    (tmp_path / "f.txt").write_text("".join("\t".join(repr(float(v)) for v in row) + "\n" for row in X))
    (tmp_path / "ids.txt").write_text("".join(f"  {i}  \n" for i in IDS))  # surrounding spaces are not part of an id
    _import(tmp_path / "f.txt", tmp_path / "f", ids=str(tmp_path / "ids.txt"))
    _assert_round_trip(tmp_path / "f", IDS, X)  # repr() round-trips float64 exactly


def test_public_uri_drops_credentials():
    assert public_uri("s3://AKIA:s3cr3t@bucket/x.npy?endpoint_override=h:9000&X-Amz-Signature=abc&session_token=t") \
        == "s3://bucket/x.npy?endpoint_override=h%3A9000"
    assert public_uri("/data/x.npy") == "/data/x.npy"
    assert public_uri("runs/x.npy") == "runs/x.npy"


# ---- the identity, checked by every later stage ---------------------------------------------------------


def _corpus_as_parquet(tmp_path: Path, images: int = 120) -> tuple[dict, Path]:
    """A split synthetic corpus whose features are re-written as someone else's Parquet file."""
    corpus = split_corpus(tmp_path, images, seed=3, feature_dim=8)
    table, _ = store.read_features(corpus["features"])
    emb = table.column("feature").combine_chunks().flatten().to_numpy().reshape(-1, 8)
    src = tmp_path / "external.parquet"
    pq.write_table(pa.table({"image_id": table.column("image_id"), "emb": pa.array(emb.tolist())}), src)
    return corpus, src


def _saved_model(tmp_path: Path, corpus: dict, features: Path) -> Path:
    """A (zero-weight) lr model directory trained on `features`, saved without Ray."""
    normalizer = TagNormalizer(NormalizerConfig(lemmatize=False))  # no WordNet: fast
    inputs = training_inputs(corpus["manifest"], str(features), normalizer, batch_size=10)
    out = tmp_path / "model"
    model = LinearTagger(inputs.dim, len(inputs.vocab))
    save_head(SavedHead(model, inputs.vocab, HeadConfig(head="lr"), inputs.identity, inputs.counts,
                        np.zeros(len(inputs.vocab), bool)), str(out))
    return out


@pytest.mark.integration  # `tagray index` builds on Ray Data
def test_a_model_trained_on_an_import_refuses_features_of_another(ray_local, tmp_path, capsys):
    corpus, src = _corpus_as_parquet(tmp_path)
    _import(src, tmp_path / "a", name="clip")
    model = _saved_model(tmp_path, corpus, tmp_path / "a")
    assert json.loads((model / "model.json").read_text())["backbone"]["name"] == "clip"
    # The same bytes from another place are the same features (the URI may move, the digest may not).
    moved = tmp_path / "moved" / "external.parquet"
    moved.parent.mkdir()
    moved.write_bytes(src.read_bytes())
    _import(moved, tmp_path / "same", name="clip")
    base = ["--manifest", corpus["manifest"], "--out", str(tmp_path / "r.json")]
    assert cli.main(["evaluate", "--model", str(model), "--features", str(tmp_path / "same"), *base]) == 0
    # Another name, or other bytes under the same name: refused, naming both.
    _import(src, tmp_path / "b", name="clip-other")
    pq.write_table(pq.read_table(src).slice(0, 119), tmp_path / "fewer.parquet")
    _import(tmp_path / "fewer.parquet", tmp_path / "c", name="clip")
    for other, what in (("b", "'clip-other'"), ("c", "'clip'")):
        capsys.readouterr()
        assert cli.main(["evaluate", "--model", str(model), "--features", str(tmp_path / other), *base]) == 2
        err = capsys.readouterr().err
        assert what in err and "was trained on" in err
    # torchvision-kind features (the synthetic corpus's) are refused too; the import's are indexed (for search).
    assert cli.main(["index", "--model", str(model), "--features", corpus["features"], "--out", str(tmp_path / "i")]) == 2
    assert "was trained on" in capsys.readouterr().err
    assert cli.main(["index", "--model", str(model), "--features", str(tmp_path / "a"), "--out", str(tmp_path / "i")]) == 0


def test_train_refuses_a_directory_mixing_imports(tmp_path):
    corpus, src = _corpus_as_parquet(tmp_path)
    _import(src, tmp_path / "a", name="clip")
    _import(src, tmp_path / "b", name="clip-other")
    stray = next((tmp_path / "b").glob("part-*.parquet"))
    stray.rename(tmp_path / "a" / "part-zzzzzzzz-00000.parquet")
    normalizer = TagNormalizer(NormalizerConfig(lemmatize=False))  # no WordNet: fast
    with pytest.raises(SchemaError, match=r"mixes features of different backbones: .*'clip'.*'clip-other'"):
        training_inputs(corpus["manifest"], str(tmp_path / "a"), normalizer, batch_size=10)


def test_identity_dim_must_match_the_column(tmp_path):
    ident = {"kind": "external", "name": "x", "dim": 5, "source": "s", "source_digest": "sha256:0"}
    table = pa.table({"image_id": ["a"], "feature": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(4, np.float32)), 4)})
    pq.write_table(table.cast(schema.with_backbone_identity(schema.features_schema(4), ident)), tmp_path / "f.parquet")
    with pytest.raises(SchemaError, match="identity says dim 5, its 'feature' column has 4"):
        store.read_features(str(tmp_path / "f.parquet"))


def test_identity_kinds():
    assert store.identity_kind({"name": "resnet18", "weights_digest": "d"}) == "torchvision"
    assert store.identity_kind({"kind": "external", "name": "clip"}) == "external"
    assert store.identity_kind(None) is None


def test_a_feature_file_without_an_identity_names_the_import_command(tmp_path):
    corpus = split_corpus(tmp_path, 120, seed=3, feature_dim=8)
    table, _ = store.read_features(corpus["features"])
    bare = tmp_path / "features.parquet"
    pq.write_table(table.replace_schema_metadata(None), bare)  # the right columns, no tagray.backbone metadata
    with pytest.raises(SchemaError) as e:
        store.read_features(str(bare))
    assert "without an identity" in str(e.value) and "`tagray features import" in str(e.value)
    assert "no features" not in str(e.value)
    normalizer = TagNormalizer(NormalizerConfig(lemmatize=False))  # no WordNet: fast
    with pytest.raises(SchemaError, match="without an identity.*tagray features import"):
        training_inputs(corpus["manifest"], str(bare), normalizer, batch_size=10)
    # Someone else's layout (a list<double> 'feature') is pointed at the same command.
    pq.write_table(pa.table({"image_id": ["a"], "feature": [[1.0, 2.0]]}), tmp_path / "other.parquet")
    with pytest.raises(SchemaError, match=r"expected fixed_size_list<float32>\[D\]; .*`tagray features import"):
        store.read_features(str(tmp_path / "other.parquet"))
    # A directory with no feature files at all says where they come from.
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no feature files .*`tagray features import`"):
        store.read_features(str(tmp_path / "empty"))


# ---- bad inputs ---------------------------------------------------------------------------------------


def _bad(tmp_path: Path, table: pa.Table, **kw) -> str:
    src = tmp_path / "bad.parquet"
    pq.write_table(table, src)
    with pytest.raises(SchemaError) as e:
        _import(src, tmp_path / "out", **kw)
    assert not list((tmp_path / "out").glob("part-*")) if (tmp_path / "out").exists() else True
    return str(e.value)


def test_non_finite_values_name_the_row_and_id(tmp_path):
    for value, what in ((np.nan, "is nan, which is not finite"), (np.inf, "is inf, which is not finite"),
                        (1e300, "is 1e+300, which overflows float32")):
        x = X.copy()
        x[17, 4] = value
        msg = _bad(tmp_path, pa.table({"image_id": IDS, "f": x.tolist()}), batch_rows=5, shard_rows=3)
        assert "bad.parquet: row 17 (image_id 'img-017'): value 4 " + what in msg
    # In text: the line (1-based) and the id from the list.
    (tmp_path / "f.dat").write_text("1 2\n3 4\n5 nan\n")
    (tmp_path / "ids.txt").write_text("a\nb\nc\n")
    with pytest.raises(SchemaError, match=r"f.dat: line 3 \(image_id 'c'\): value 1 is nan"):
        _import(tmp_path / "f.dat", tmp_path / "o", ids=str(tmp_path / "ids.txt"))


def test_ragged_rows_name_the_row_or_line(tmp_path):
    rows = X.tolist()
    rows[9] = rows[9][:5]
    msg = _bad(tmp_path, pa.table({"image_id": IDS, "f": rows}), batch_rows=4)
    assert "row 9 (image_id 'img-009'): has 5 values; the rows before have 6" in msg
    (tmp_path / "f.dat").write_text("1 2 3\n4 5 6\n7 8\n")
    (tmp_path / "ids.txt").write_text("a\nb\nc\n")
    with pytest.raises(SchemaError, match=r"f.dat: line 3 has 2 values; lines 1-2 have 3"):
        _import(tmp_path / "f.dat", tmp_path / "o", ids=str(tmp_path / "ids.txt"))


def test_duplicate_ids_name_both_rows_and_leave_nothing(tmp_path):
    ids = list(IDS)
    ids[20] = ids[2]
    msg = _bad(tmp_path, pa.table({"image_id": ids, "f": X.tolist()}), shard_rows=4, batch_rows=3)
    assert "duplicate image_id 'img-002', at " in msg and "row 2 and at" in msg and "row 20" in msg
    assert not (tmp_path / "out" / "summary.json").exists()


def test_missing_id_column_and_other_layout_errors(tmp_path):
    msg = _bad(tmp_path, pa.table({"id": IDS, "f": X.tolist()}))
    assert "no id column 'image_id' (set --id-column); columns present: id, f" in msg
    msg = _bad(tmp_path, pa.table({"image_id": IDS, "a": X.tolist(), "b": X.tolist()}))
    assert "several list columns (a, b): choose one with --feature-column" in msg
    msg = _bad(tmp_path, pa.table({"image_id": IDS, "tags": [["x"]] * len(IDS)}))
    assert "column 'tags' has type list<string>; expected a list of numbers" in msg
    ids = list(IDS)
    ids[5] = None
    assert "row 5: the id is null" in _bad(tmp_path, pa.table({"image_id": ids, "f": X.tolist()}))
    rows = X.tolist()
    rows[7] = None
    assert "row 7 (image_id 'img-007'): the feature is null" in _bad(tmp_path, pa.table({"image_id": IDS, "f": rows}))


def test_id_lists_must_match_the_rows(tmp_path, capsys):
    np.save(tmp_path / "x.npy", X)
    (tmp_path / "short.txt").write_text("\n".join(IDS[:20]) + "\n")
    (tmp_path / "long.txt").write_text("\n".join(IDS + ["extra"]) + "\n")
    (tmp_path / "gap.txt").write_text("\n".join(IDS[:3] + [""] + IDS[3:]) + "\n")
    with pytest.raises(SchemaError, match=r"short.txt: has 20 ids, but .*x.npy has more rows"):
        _import(tmp_path / "x.npy", tmp_path / "o", ids=str(tmp_path / "short.txt"))
    with pytest.raises(SchemaError, match=r"long.txt: has 24 ids, but .*x.npy has 23 rows"):
        _import(tmp_path / "x.npy", tmp_path / "o", ids=str(tmp_path / "long.txt"))
    with pytest.raises(SchemaError, match=r"gap.txt: line 4 is empty"):
        _import(tmp_path / "x.npy", tmp_path / "o", ids=str(tmp_path / "gap.txt"))
    assert not list((tmp_path / "o").glob("part-*")) if (tmp_path / "o").exists() else True
    # An Imagelist with a line that is not one, and a .npy that is not 2-D: one line, exit 2.
    dat, imagelist, _ = _nuswide(tmp_path / "NUS-WIDE", np.abs(X[:3]))
    imagelist.write_text("actor\\0001_11.jpg\nactor\\0002_12.jpg\nactor/README\n")
    rc = cli.main(["features", "import", str(dat), "--ids", str(imagelist), "--out", str(tmp_path / "n"), "--name", "x"])
    assert rc == 2
    assert "Imagelist.txt: line 3: 'actor/README' is not a NUS-WIDE Imagelist line" in capsys.readouterr().err
    np.save(tmp_path / "v.npy", X[:, 0])
    rc = cli.main(["features", "import", str(tmp_path / "v.npy"), "--ids", str(tmp_path / "long.txt"),
                   "--out", str(tmp_path / "v"), "--name", "x"])
    assert rc == 2 and "an array of shape (23,); expected 2-D" in capsys.readouterr().err
    rc = cli.main(["features", "import", str(tmp_path / "x.npy"), "--out", str(tmp_path / "v"), "--name", "x"])
    assert rc == 2 and "give its image ids with --ids" in capsys.readouterr().err


def test_an_output_holding_other_features_is_refused_and_a_rerun_is_a_no_op(tmp_path):
    src = tmp_path / "a.parquet"
    pq.write_table(pa.table({"image_id": IDS, "f": X.tolist()}), src)
    first = _import(src, tmp_path / "f", name="a")
    shards = sorted((tmp_path / "f").glob("part-*.parquet"))
    again = _import(src, tmp_path / "f", name="a")
    assert again["already_imported"] and sorted((tmp_path / "f").glob("part-*.parquet")) == shards
    assert again["identity"] == first["identity"]
    with pytest.raises(SchemaError, match=r"already holds feature files \(external features 'a' .*import into an empty"):
        _import(src, tmp_path / "f", name="b")


# ---- object storage ---------------------------------------------------------------------------------------


@pytest.mark.integration
def test_s3_round_trip(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    src = tmp_path / "clip.parquet"
    pq.write_table(pa.table({"image_id": IDS, "emb": X.tolist()}), src)
    np.save(tmp_path / "x.npy", X)
    (tmp_path / "ids.txt").write_text("\n".join(IDS) + "\n")
    for name in ("clip.parquet", "x.npy", "ids.txt"):
        storage.write_bytes(f"s3://{bucket}/in/{name}", (tmp_path / name).read_bytes(), endpoint)
    for src_uri, ids in ((f"s3://{bucket}/in/clip.parquet", None), (f"s3://{bucket}/in/x.npy", f"s3://{bucket}/in/ids.txt")):
        out = f"s3://{bucket}/feats-{src_uri.rsplit('.', 1)[1]}"
        argv = ["features", "import", src_uri, "--out", out, "--name", "clip", "--shard-rows", "10",
                "--endpoint-url", endpoint] + (["--ids", ids] if ids else [])
        assert cli.main(argv) == 0
        got, identity = _read(out, endpoint)
        for i, image_id in enumerate(IDS):
            np.testing.assert_array_equal(got[image_id], X[i].astype(np.float32))
        assert identity["source"] == src_uri and identity["source_digest"] == _sha(tmp_path / src_uri.rsplit("/", 1)[1])
        assert len(store.feature_files(out, endpoint)) == 3  # 10 + 10 + 3 rows
        assert json.loads(storage.read_text(f"{out}/summary.json", endpoint))["rows"] == len(IDS)
    # A failed import into S3 leaves no shards behind.
    x = X.copy()
    x[21, 0] = np.nan
    storage.write_bytes(f"s3://{bucket}/in/nan.npy", _npy_bytes(tmp_path, x), endpoint)
    with pytest.raises(SchemaError, match="row 21 .*is nan"):
        import_features(f"s3://{bucket}/in/nan.npy", f"s3://{bucket}/nan", ImportConfig(
            name="x", ids=f"s3://{bucket}/in/ids.txt", shard_rows=5, batch_rows=5), endpoint)
    assert store.feature_files(f"s3://{bucket}/nan", endpoint) == []


def _npy_bytes(tmp_path: Path, x: np.ndarray) -> bytes:
    np.save(tmp_path / "tmp.npy", x)
    return (tmp_path / "tmp.npy").read_bytes()


# ---- train on Ray -------------------------------------------------------------------------------------


@pytest.mark.integration
def test_train_and_evaluate_on_imported_features(ray_local, tmp_path):
    """The recipe of a model directory trained on external features: import, `train --head lr`, evaluate."""
    corpus, src = _corpus_as_parquet(tmp_path, images=300)
    assert cli.main(["features", "import", str(src), "--out", str(tmp_path / "f"), "--name", "clip"]) == 0
    model = tmp_path / "model"
    (tmp_path / "normalize.yaml").write_text("# tagray train normalizer=…: no WordNet (fast)\nlemmatize: false\n")
    assert cli.main(["train", "--head", "lr", "--manifest", corpus["manifest"], "--features", str(tmp_path / "f"),
                     "--out", str(model), "epochs=2", "batch_size=50", "worker_cpus=0.5",
                     f"normalizer={tmp_path / 'normalize.yaml'}"]) == 0
    backbone = json.loads((model / "model.json").read_text())["backbone"]
    assert backbone["kind"] == "external" and backbone["name"] == "clip" and backbone["dim"] == 8
    report = tmp_path / "r.json"
    base = ["--model", str(model), "--manifest", corpus["manifest"], "--out", str(report)]
    assert cli.main(["evaluate", *base, "--features", str(tmp_path / "f")]) == 0
    assert json.loads(report.read_text())["annotation"]["map_label"] > 0
    assert cli.main(["evaluate", *base, "--features", corpus["features"]]) == 2  # the synthetic features: another identity
