"""The `tagray` command: each subcommand's main(argv), end to end on local files."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tagray import cli
from tagray.data import schema


@pytest.mark.integration
def test_synth_split_stats(ray_local, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    assert cli.main(["synth", "--out", str(corpus), "--images", "200", "--seed", "1"]) == 0
    assert len(list((corpus / "images").glob("*.jpg"))) == 200
    split = tmp_path / "split.parquet"
    assert cli.main(["split", "--manifest", str(corpus / "manifest.parquet"), "--out", str(split),
                     "train=0.6", "val=0.2", "test=0.2"]) == 0
    assert set(schema.read_manifest(str(split)).column("split").to_pylist()) == {"train", "val", "test"}
    out = tmp_path / "stats"
    assert cli.main(["stats", "--manifest", str(split), "--out", str(out), "--split", "train"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["images"] < 200 and stats["labels"]["per_label"]
    assert {p.name for p in out.glob("*.png")} == {"tag_histogram.png", "tagging_likelihood.png", "accuracy_by_position.png"}
    assert "median tagging likelihood" in capsys.readouterr().out


def test_bad_manifest_exit_2_names_column(tmp_path, capsys):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"image_id": ["a"], "user_id": ["u"], "uri": ["x"]}), bad)
    assert cli.main(["stats", "--manifest", str(bad), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "tagray stats: error:" in err and "missing column 'tags'" in err and "bad.parquet" in err


def test_bad_override_exit_2(tmp_path, capsys):
    assert cli.main(["synth", "--out", str(tmp_path), "--features-only", "imagez=5"]) == 2
    assert "unknown key(s) imagez" in capsys.readouterr().err


def test_unknown_command(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert cli.main([]) == 0


@pytest.mark.integration
def test_demo_end_to_end(demo_run):
    tmp_path, out = demo_run
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["stages"]) == ["synth", "split", "stats", "featurize", "train", "calibrate", "evaluate", "embed", "serve"]
    assert summary["stages"]["featurize"]["featurized"] == 160
    assert summary["stages"]["calibrate"]["tags"] > 0
    report = json.loads((tmp_path / "evaluation" / "report.json").read_text())
    assert {"tag_prediction", "annotation", "retrieval", "baselines"} <= set(report)
    assert summary["stages"]["split"]["sizes"]["test"]["images"] > 0
    searches = summary["stages"]["embed"]["searches"]
    assert searches and all(len(hits) == 5 for hits in searches.values())
    assert (tmp_path / "index_embed" / "images.faiss").exists()
    embed_report = json.loads((tmp_path / "evaluation_embed" / "report.json").read_text())
    # judged against the baselines its report prints, so its verdict says whether it learned
    assert {"random", "prior", "knn"} <= set(embed_report["baselines"])
    assert embed_report["verdict"]["learned"] in (True, False) and summary["stages"]["embed"]["verdict"]
    assert summary["stages"]["serve"]["tag"]["tags"] and summary["stages"]["serve"]["search"]["images"]
    assert "summary →" in out and str(tmp_path) in out and "serving at http://127.0.0.1:" in out


def test_command_logging_keeps_tagrays_info_and_drops_faiss_loaders(caplog):
    import logging

    from tagray.commands.common import setup_logging

    caplog.set_level(logging.INFO)
    setup_logging()
    logging.getLogger("faiss.loader").info("Could not load library with AVX2 support due to: ModuleNotFoundError")
    logging.getLogger("tagray.index.build").info("index → out")
    assert [r.name for r in caplog.records] == ["tagray.index.build"]
