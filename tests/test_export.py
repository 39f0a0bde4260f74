"""`tagray export` of a tiny calibrated model (saved and calibrated without Ray): XMP sidecars read
back by exiftool (Debian libimage-exiftool-perl, a client tagray did not write), merged into
sidecars exiftool wrote first; jsonl and csv read back with pyarrow and the csv module agree
with them. The expected tags are computed here from the saved weights, β and the features,
not through tagray's heads."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.numpy import load_file

from tagray import cli
from tagray.data import schema
from tagray.data.normalize import NormalizerConfig, TagNormalizer, Vocabulary
from tagray.data.xmp import read_sidecar
from tagray.heads.artifact import SavedHead, save_head
from tagray.heads.embed_artifact import SavedEmbedHead, save_embed_head
from tagray.heads.embedding import EmbedConfig, TagMLP
from tagray.heads.fit import HeadConfig
from tagray.heads.linear import LinearTagger
from tagray.train.run import training_inputs
from tests.corpora import split_corpus

EXIFTOOL = shutil.which("exiftool")
pytestmark = pytest.mark.skipif(EXIFTOOL is None and not os.environ.get("CI"),
                                reason="exiftool missing: apt-get install libimage-exiftool-perl")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A 200-image corpus (D=16), an lr head with seeded random weights, and that head
    calibrated by `tagray calibrate` on the val split (only the labels' tags get a β)."""
    root = tmp_path_factory.mktemp("export")
    corpus = split_corpus(root, 200, seed=3, feature_dim=16)
    normalizer = TagNormalizer(NormalizerConfig(lemmatize=False))  # no WordNet: fast
    inputs = training_inputs(corpus["manifest"], corpus["features"], normalizer, batch_size=10)
    model = LinearTagger(inputs.dim, len(inputs.vocab))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.linear.weight.copy_(torch.randn(model.tags, model.dim, generator=g) * 0.6)
        model.linear.bias.copy_(torch.randn(model.tags, generator=g))
    raw = root / "lr"
    save_head(SavedHead(model, inputs.vocab, HeadConfig(head="lr"), inputs.identity, inputs.counts,
                        np.zeros(len(inputs.vocab), bool)), str(raw))
    calibrated = root / "lr-cal"
    assert cli.main(["calibrate", "--model", str(raw), "--manifest", corpus["manifest"],
                     "--features", corpus["features"], "--out", str(calibrated)]) == 0
    return {**corpus, "root": root, "raw": raw, "model": calibrated, "normalizer": normalizer, "inputs": inputs}


def expected_p(model: Path, features: str) -> tuple[list[str], np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(tags, calibrated mask, image ids, image id → P(z=1|x) = σ(xWᵀ + b + β)) from the files."""
    w = load_file(str(model / "weights.safetensors"))
    tags = pq.read_table(model / "tags.parquet")
    f = pq.read_table(features)
    x = np.asarray(f.column("feature").combine_chunks().flatten(), np.float64).reshape(f.num_rows, -1)
    s = x @ w["linear.weight"].astype(np.float64).T + w["linear.bias"] + w["beta"]
    p = 1 / (1 + np.exp(-s))
    ids = f.column("image_id").to_pylist()
    return tags.column("tag").to_pylist(), tags.column("calibrated").to_numpy(zero_copy_only=False), ids, dict(zip(ids, p, strict=True))


def expected_tags(setup: dict, min_p: float) -> dict[str, dict[str, float]]:
    """image_id → {predicted tag: P} for calibrated tags above min_p."""
    tags, cal, _, p = expected_p(setup["model"], setup["features"])
    return {i: {tags[t]: float(row[t]) for t in np.nonzero(cal & (row > min_p))[0]} for i, row in p.items()}


def manifest_rows(setup: dict) -> dict[str, dict]:
    return {r["image_id"]: r for r in pq.read_table(setup["manifest"]).to_pylist()}


def run_export(setup: dict, out: Path | str, *extra: str) -> int:
    return cli.main(["export", "--model", str(setup["model"]), "--features", setup["features"],
                     "--manifest", setup["manifest"], "--out", str(out), *extra])


def as_list(v) -> list[str]:
    """exiftool -j: a one-item list comes back as a scalar, numbers as numbers."""
    if v is None:
        return []
    return [str(x) for x in (v if isinstance(v, list) else [v])]


def exiftool_read(paths: list[Path] | Path) -> dict[str, dict]:
    """file name → exiftool's JSON of the XMP fields the brief names."""
    args = [EXIFTOOL, "-j", "-G1", "-XMP-dc:Subject", "-XMP-lr:HierarchicalSubject", "-XMP-tagray:all", "-XMP-xmp:Rating",
            "-XMP-photoshop:City"]
    args += ["-ext", "xmp", str(paths)] if isinstance(paths, Path) else [str(p) for p in paths]
    out = subprocess.run(args, check=True, capture_output=True, timeout=120, text=True).stdout
    return {Path(r["SourceFile"]).name: r for r in json.loads(out)}


def user_model_tags(setup: dict, raw: list[str]) -> list[str | None]:
    vocab = Vocabulary.load(str(setup["model"]))
    typed = [t for t in dict.fromkeys(raw) if t.strip()]
    return [n if (n := setup["normalizer"].normalize_tag(t)) in vocab.index else None for t in typed]


def test_xmp_sidecars_read_back_by_exiftool(setup, tmp_path):
    out = tmp_path / "xmp"
    assert run_export(setup, out, "--batch-size", "7") == 0  # 29 batches: offsets into the manifest rows
    want = expected_tags(setup, 0.5)
    rows = manifest_rows(setup)
    read = exiftool_read(out)
    assert len(read) == len(want) == 200
    tags, cal, _, p_all = expected_p(setup["model"], setup["features"])
    # The test means something: tags are predicted, and uncalibrated tags above 0.5 are left out.
    assert sum(map(len, want.values())) > 50
    assert any(row[~cal].max() > 0.5 for row in p_all.values())
    digest = json.loads((setup["model"] / "model.json").read_text())
    for image_id, predicted in want.items():
        r = read[Path(rows[image_id]["uri"]).name + ".xmp"]
        got_tags = as_list(r.get("XMP-tagray:PredictedTags"))
        got_p = [float(x) for x in as_list(r.get("XMP-tagray:PredictedP"))]
        assert dict(zip(got_tags, got_p, strict=True)) == pytest.approx(predicted, rel=1e-5)
        assert got_p == sorted(got_p, reverse=True)
        user = [t for t in dict.fromkeys(rows[image_id]["tags"]) if t.strip()]
        assert as_list(r.get("XMP-tagray:UserTags")) == user
        assert [m or None for m in as_list(r.get("XMP-tagray:UserModelTags"))] == user_model_tags(setup, user)
        covered = set(user) | {m for m in user_model_tags(setup, user) if m}
        assert as_list(r.get("XMP-dc:Subject")) == user + [t for t in got_tags if t not in covered]
        assert sorted(as_list(r.get("XMP-lr:HierarchicalSubject"))) == sorted(
            [f"tagray|user|{t}" for t in user] + [f"tagray|predicted|{t}" for t in predicted])
        assert r["XMP-tagray:Threshold"] == 0.5 and r["XMP-tagray:Calibrated"] is True
        assert r["XMP-tagray:ModelName"] == "lr-cal" and r["XMP-tagray:Head"] == "lr"
        assert r["XMP-tagray:VocabularyVersion"] == digest["vocabulary_version"]
    summary = json.loads((out / "export_summary.json").read_text())
    assert summary["images"] == 200 and summary["threshold"] == 0.5
    assert summary["tags_written"]["predicted"] == sum(map(len, want.values()))
    assert summary["model"]["calibrated"] is True and summary["model"]["tags_exported"] == int(cal.sum())
    assert summary["sidecars"]["new"] == 200 and summary["sidecars"]["merged"] == 0


def test_merge_keeps_what_exiftool_wrote_and_replaces_tagrays_own(setup, tmp_path):
    rows = manifest_rows(setup)
    image_id = next(i for i, w in expected_tags(setup, 0.3).items() if len(w) >= 2 and set(w) != set(expected_tags(setup, 0.5)[i]))
    name = Path(rows[image_id]["uri"]).name + ".xmp"
    out = tmp_path / "lib"
    out.mkdir()
    subprocess.run([EXIFTOOL, "-q", "-o", str(out / name), "-XMP-xmp:Rating=4", "-XMP-photoshop:City=Paris",
                    "-XMP-dc:Subject=my keyword", "-XMP-lr:HierarchicalSubject=Places|France|Paris"],
                   check=True, capture_output=True, timeout=60)
    for min_p in ("0.3", "0.5"):  # the second export replaces the first one's tags
        assert run_export(setup, out, "--min-p", min_p) == 0
    r = exiftool_read([out / name])[name]
    assert r["XMP-xmp:Rating"] == 4 and r["XMP-photoshop:City"] == "Paris"
    want = expected_tags(setup, 0.5)[image_id]
    assert set(as_list(r.get("XMP-tagray:PredictedTags"))) == set(want)
    subjects = as_list(r["XMP-dc:Subject"])
    assert subjects[0] == "my keyword"
    stale = set(expected_tags(setup, 0.3)[image_id]) - set(want) - set(rows[image_id]["tags"])
    assert stale and not stale & set(subjects)  # 0.3's extra tags are gone from dc:subject …
    hierarchical = as_list(r["XMP-lr:HierarchicalSubject"])
    assert "Places|France|Paris" in hierarchical
    assert {h for h in hierarchical if h.startswith("tagray|predicted|")} == {f"tagray|predicted|{t}" for t in want}
    assert r["XMP-tagray:Threshold"] == 0.5
    side = read_sidecar((out / name).read_bytes(), name)  # … and the predictions stay apart from the rest
    user = [t for t in dict.fromkeys(rows[image_id]["tags"]) if t.strip()]
    assert side.user_keywords() == ["my keyword", *user, "Places|France|Paris"]
    assert side.added[: len(user)] == user
    assert set(side.added[len(user):]) == set(want) - set(user) - set(side.user_model)
    assert json.loads((out / "export_summary.json").read_text())["sidecars"]["merged"] == 200


def test_jsonl_and_csv_agree_with_the_xmp(setup, tmp_path):
    assert run_export(setup, tmp_path / "x", "--min-p", "0.6") == 0
    assert run_export(setup, tmp_path / "j", "--format", "jsonl", "--min-p", "0.6") == 0
    assert run_export(setup, tmp_path / "c", "--format", "csv", "--min-p", "0.6") == 0
    rows = manifest_rows(setup)
    xmp = {}
    for image_id, r in rows.items():
        s = read_sidecar((tmp_path / "x" / (Path(r["uri"]).name + ".xmp")).read_bytes(), image_id)
        xmp[image_id] = (s.user, s.user_model, s.predicted)
    want = expected_tags(setup, 0.6)
    assert set(xmp) == set(want)
    for image_id, (_, _, predicted) in xmp.items():
        assert dict(predicted) == pytest.approx(want[image_id], rel=1e-5)
    lines = pajson.read_json(tmp_path / "j" / "tags.jsonl").to_pylist()
    assert len(lines) == 200
    jsonl = {r["image_id"]: (r["user_tags"], r["user_model_tags"], [(d["tag"], d["p"]) for d in r["predicted"]]) for r in lines}
    assert jsonl == xmp
    with open(tmp_path / "c" / "tags.csv", newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    from_csv: dict[str, tuple] = {i: ([], [], []) for i in rows}
    for r in table:
        user, model_tags, predicted = from_csv[r["image_id"]]
        if r["source"] == "user":
            user.append(r["tag"])
            model_tags.append(r["model_tag"] or None)
        else:
            assert r["source"] == "predicted" and r["model_tag"] == r["tag"]
            predicted.append((r["tag"], float(r["p"])))
        assert r["uri"] == rows[r["image_id"]]["uri"]
    assert {i: (list(u), list(m), list(p)) for i, (u, m, p) in from_csv.items()} == {i: (list(u), list(m), list(p)) for i, (u, m, p) in xmp.items()}
    assert json.loads((tmp_path / "j" / "export_summary.json").read_text())["file"].endswith("tags.jsonl")


def test_min_p_one_exports_no_predicted_tags(setup, tmp_path):
    assert run_export(setup, tmp_path / "x", "--min-p", "1.0", "--sidecar-name", "base") == 0
    rows = manifest_rows(setup)
    read = exiftool_read(tmp_path / "x")
    assert len(read) == 200
    for r in rows.values():
        got = read[Path(r["uri"]).stem + ".xmp"]  # --sidecar-name base: img000000.xmp
        assert "XMP-tagray:PredictedTags" not in got
        assert as_list(got.get("XMP-dc:Subject")) == [t for t in dict.fromkeys(r["tags"]) if t.strip()]
    summary = json.loads((tmp_path / "x" / "export_summary.json").read_text())
    assert summary["tags_written"]["predicted"] == 0 and summary["images_with_predicted_tags"] == 0
    assert summary["tags_written"]["user"] > 0


def test_images_root_keeps_folders_and_uncalibrated_models_export_every_tag(setup, tmp_path):
    """--images-root mirrors the library under DIR; an uncalibrated model's P(z) = σ(s) of every tag."""
    m = pq.read_table(setup["manifest"])
    uris = [f"/photos/{'a' if k % 2 else 'b'}/{Path(u).name}" for k, u in enumerate(m.column("uri").to_pylist())]
    manifest = tmp_path / "m.parquet"
    pq.write_table(m.set_column(m.schema.get_field_index("uri"), "uri", pa.array(uris)), manifest)
    argv = ["export", "--model", str(setup["raw"]), "--features", setup["features"], "--manifest", str(manifest),
            "--out", str(tmp_path / "x"), "--images-root", "/photos/"]
    assert cli.main(argv) == 0
    assert len(list((tmp_path / "x" / "a").glob("*.jpg.xmp"))) == 100 == len(list((tmp_path / "x" / "b").glob("*.jpg.xmp")))
    tags, _, ids, p = expected_p(setup["raw"], setup["features"])
    first = ids[0]
    rel = uris[m.column("image_id").to_pylist().index(first)][len("/photos/"):]  # a/img….jpg or b/img….jpg
    side = read_sidecar((tmp_path / "x" / (rel + ".xmp")).read_bytes(), first)
    assert dict(side.predicted) == pytest.approx({tags[t]: p[first][t] for t in np.nonzero(p[first] > 0.5)[0]}, rel=1e-5)
    assert side.fields["calibrated"] == "False"
    assert not list(tmp_path.rglob("*.tagray-tmp"))


def _one_line_error(capsys, argv: list[str], *needles: str) -> None:
    capsys.readouterr()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tagray export: error:"), err
    for n in needles:
        assert n in err, err


def test_bad_inputs_exit_2_with_one_line(setup, tmp_path, capsys):
    base = ["export", "--model", str(setup["model"]), "--manifest", setup["manifest"], "--out", str(tmp_path / "o")]
    feats = ["--features", setup["features"]]
    for bad in ("0", "1.5", "-0.1", "nan", "inf"):
        _one_line_error(capsys, [*base, *feats, "--min-p", bad], "--min-p must be in (0, 1]")
    _one_line_error(capsys, [*base, "--features", str(tmp_path / "none")], "no feature files")
    _one_line_error(capsys, [*base[:3], "--manifest", str(tmp_path / "none.parquet"), *base[5:], *feats], "none.parquet")
    pq.write_table(pq.read_table(setup["manifest"]).drop_columns(["tags"]), tmp_path / "notags.parquet")
    _one_line_error(capsys, [*base[:3], "--manifest", str(tmp_path / "notags.parquet"), *base[5:], *feats],
                    "notags.parquet: missing column 'tags'")
    # The embed head has no P(z=1|x).
    inputs, embed = setup["inputs"], tmp_path / "embed"
    tags = len(inputs.vocab)
    save_embed_head(SavedEmbedHead(TagMLP(inputs.dim, (8,), 4), torch.randn(tags, 4), list(inputs.vocab.tags), inputs.vocab,
                                   EmbedConfig(hidden=(8,), word_dim=4), inputs.identity, inputs.counts,
                                   np.zeros(tags, bool), "random"), str(embed))
    _one_line_error(capsys, ["export", "--model", str(embed), *base[3:], *feats], "embed head", "no calibrated probability")
    # Features of another backbone (the same rows under another identity).
    t = pq.read_table(setup["features"])
    ident = {**schema.backbone_identity(t.schema), "name": "other-net"}
    pq.write_table(t.cast(schema.with_backbone_identity(t.schema, ident)), tmp_path / "other.parquet")
    _one_line_error(capsys, [*base, "--features", str(tmp_path / "other.parquet")], "other-net", "was trained on")
    # A feature row of NaN.
    x = np.asarray(t.column("feature").combine_chunks().flatten()).reshape(t.num_rows, -1).copy()
    x[5, 3] = np.nan
    nan = t.set_column(1, "feature", pa.FixedSizeListArray.from_arrays(pa.array(x.ravel(), pa.float32()), x.shape[1]))
    pq.write_table(nan.cast(t.schema), tmp_path / "nan.parquet")
    _one_line_error(capsys, [*base, "--features", str(tmp_path / "nan.parquet")], repr(t.column("image_id")[5].as_py()), "NaN")
    # Two images on one sidecar name, and uris outside --images-root.
    m = pq.read_table(setup["manifest"])
    uris = m.column("uri").to_pylist()
    uris[1] = str(Path(uris[0]).with_suffix(".png"))
    pq.write_table(m.set_column(2, "uri", pa.array(uris)), tmp_path / "m.parquet")
    same = ["export", "--model", str(setup["model"]), *feats, "--manifest", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "o")]
    _one_line_error(capsys, [*same, "--sidecar-name", "base"], "would share the sidecar", "img000000.xmp")
    assert cli.main(same) == 0  # --sidecar-name ext: img000000.jpg.xmp and img000000.png.xmp
    _one_line_error(capsys, [*same, "--images-root", "/elsewhere"], "is not under it")
    _one_line_error(capsys, [*base, *feats, "--format", "csv", "--sidecar-name", "base"], "--format csv writes one file")
    # A sidecar that is not XMP is left alone, and said so.
    out = tmp_path / "keep"
    out.mkdir()
    (out / "img000000.jpg.xmp").write_text("<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF")
    capsys.readouterr()
    assert cli.main(["export", "--model", str(setup["model"]), *feats, "--manifest", setup["manifest"], "--out", str(out)]) == 0
    assert "1 skipped" in capsys.readouterr().out
    assert (out / "img000000.jpg.xmp").read_text() == "<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF"
    s = json.loads((out / "export_summary.json").read_text())["sidecars"]
    assert s["skipped"] == 1 and "img000000.jpg.xmp: not a valid XMP packet" in s["skipped_examples"][0]


@pytest.mark.integration
def test_export_to_s3(setup, s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    from tagray.data import storage

    out = f"s3://{bucket}/library"
    rows = manifest_rows(setup)
    first = next(iter(rows))
    name = Path(rows[first]["uri"]).name + ".xmp"
    subprocess.run([EXIFTOOL, "-q", "-o", str(tmp_path / name), "-XMP-xmp:Rating=2"], check=True, capture_output=True, timeout=60)
    storage.write_bytes(f"{out}/{name}", (tmp_path / name).read_bytes(), endpoint)
    for fmt in ("xmp", "jsonl"):
        assert run_export(setup, out, "--format", fmt, "--endpoint-url", endpoint) == 0
    want = expected_tags(setup, 0.5)
    local = tmp_path / "down"
    local.mkdir()
    for r in rows.values():
        n = Path(r["uri"]).name + ".xmp"
        (local / n).write_bytes(storage.read_bytes(f"{out}/{n}", endpoint))
    read = exiftool_read(local)
    assert {i: set(as_list(read[Path(r["uri"]).name + ".xmp"].get("XMP-tagray:PredictedTags"))) for i, r in rows.items()} == \
        {i: set(w) for i, w in want.items()}
    assert read[name]["XMP-xmp:Rating"] == 2
    lines = [json.loads(x) for x in storage.read_text(f"{out}/tags.jsonl", endpoint).splitlines()]
    assert {r["image_id"]: {d["tag"] for d in r["predicted"]} for r in lines} == {i: set(w) for i, w in want.items()}
    summary = json.loads(storage.read_text(f"{out}/export_summary.json", endpoint))
    assert summary["format"] == "jsonl" and summary["images"] == 200


def test_import_folder_reads_back_the_user_tags_not_the_predictions(setup, tmp_path):
    from tagray.data.importers.folder import xmp_keywords

    assert run_export(setup, tmp_path / "x", "--min-p", "0.3") == 0
    for r in manifest_rows(setup).values():
        side = tmp_path / "x" / (Path(r["uri"]).name + ".xmp")
        assert xmp_keywords(side.read_bytes(), str(side)) == [t for t in dict.fromkeys(r["tags"]) if t.strip()]
