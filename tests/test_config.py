from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tagray.config import CONFIG_DIR, ConfigError, load_config, parse_overrides
from tagray.data.normalize import NonImageLists, NormalizerConfig, TagNormalizer
from tagray.data.split import SplitConfig
from tagray.data.synth import SynthConfig
from tagray.features.pipeline import FeaturizeConfig

REPO = Path(__file__).resolve().parent.parent
# Every YAML tagray reads, and the dataclass (or loader) that validates it.
CONFIG_CLASSES = {
    "tagray/configs/normalize.yaml": NormalizerConfig,
    "tagray/configs/synth.yaml": SynthConfig,
    "tagray/configs/split.yaml": SplitConfig,
    "tagray/configs/featurize.yaml": FeaturizeConfig,
}
# `tagray train` YAMLs hold HeadConfig and TrainRunConfig fields together.
TRAIN_CONFIGS = ("tagray/configs/lr.yaml", "tagray/configs/rlr.yaml", "tagray/configs/embed.yaml", "tagray/configs/neighbors.yaml", "tagray/configs/refine.yaml")
# `tagray tune` sweeps: TuneConfig.
TUNE_CONFIGS = ("tune_configs/neighbors.yaml", "tune_configs/refine.yaml")
# Ray Serve configs: applications[0].args are ServeConfig fields; deployments name ours.
SERVE_CONFIGS = ("serve_configs/tagray.yaml",)
# Cluster definitions (Ray cluster launcher, KubeRay): checked in tests/test_cluster.py.
CLUSTER_CONFIGS = ("clusters/aws-gpu.yaml", "clusters/local.yaml", "clusters/rayjob-train.yaml", "clusters/rayservice.yaml")


def test_every_config_file_is_known_and_loads():
    found = {str(p.relative_to(REPO)) for d in ("tagray/configs", "tune_configs", "serve_configs", "clusters")
             for p in (REPO / d).glob("*.yaml")}
    known = set(CONFIG_CLASSES) | set(TRAIN_CONFIGS) | set(SERVE_CONFIGS) | set(CLUSTER_CONFIGS) | set(TUNE_CONFIGS)
    assert found == known | {"tagray/configs/non_image_tags.yaml"}
    from tagray.commands.train import load_settings

    for rel in TRAIN_CONFIGS:
        head, run = load_settings(str(REPO / rel), {})
        assert head.head == Path(rel).stem and run.workers >= 1
        assert (REPO / rel).read_text().startswith("#")
    from tagray.tune.space import TuneConfig

    for rel in TUNE_CONFIGS:
        sweep = load_config(TuneConfig, REPO / rel)
        assert sweep.head == Path(rel).stem and len(sweep.param_space()) >= 3
    for rel, cls in CONFIG_CLASSES.items():
        text = (REPO / rel).read_text()
        assert text.startswith("#"), f"{rel} should start with a comment naming its command"
        assert "tagray " in text.splitlines()[0] + text, f"{rel} should show the command that uses it"
        cfg = load_config(cls, REPO / rel)
        assert dataclasses.is_dataclass(cfg)
    lists = NonImageLists.load("non_image_tags.yaml")
    assert lists.matches("2012") and lists.matches("nikon") and lists.matches("explore")
    assert not lists.matches("beach")


def test_unknown_key_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_tags: 20\nmax_tgas: 5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*unknown key\(s\) max_tgas"):
        load_config(NormalizerConfig, bad)


def test_wrong_type_names_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_tags: twenty\n")
    with pytest.raises(ConfigError, match=r"max_tags: expected int, got 'twenty'"):
        load_config(NormalizerConfig, bad)


def test_overrides_parse_and_win_over_file():
    cfg = load_config(SplitConfig, CONFIG_DIR / "split.yaml", parse_overrides(["train=0.6", "val=0.2", "test=0.2"]))
    assert (cfg.train, cfg.val, cfg.test) == (0.6, 0.2, 0.2)
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train"])


def test_invalid_values_rejected():
    with pytest.raises(ConfigError, match="sum to 1"):
        SplitConfig(train=0.9, val=0.2, test=0.1)
    with pytest.raises(ConfigError, match="max_tags"):
        TagNormalizer(NormalizerConfig(max_tags=0))


def test_serve_config_args_are_serve_config_fields():
    from tagray.commands.serve import args_from_serve_config
    from tagray.config import from_dict, load_yaml
    from tagray.serve.service import ServeConfig

    for rel in SERVE_CONFIGS:
        text = (REPO / rel).read_text()
        assert text.startswith("#") and "serve run" in text and "serve deploy" in text
        cfg = from_dict(ServeConfig, args_from_serve_config(str(REPO / rel)), rel)
        assert cfg.model and cfg.batch_size >= 1
        app = load_yaml(REPO / rel)["applications"][0]
        assert app["import_path"] == "tagray.serve.app:build_app"
        assert {d["name"] for d in app.get("deployments") or []} <= {"Tagger", "Searcher", "Ingress"}
        if not cfg.index:  # a Searcher entry without an index makes Serve refuse the config
            assert "Searcher" not in {d["name"] for d in app.get("deployments") or []}
        assert text.count(cfg.model) == 1, f"{rel}: the model path is written more than once"
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(ServeConfig, {"model": "m", "batchsize": 3}, "args")


def test_bad_sweeps_name_the_problem():
    from tagray.tune.space import TuneConfig

    with pytest.raises(ConfigError, match="'lambda9' is not a setting of the refine head"):
        TuneConfig(head="refine", search_space={"lambda9": {"grid": [1, 2]}})
    with pytest.raises(ConfigError, match=r"search_space.m must be one of \{grid\|choice"):
        TuneConfig(head="neighbors", search_space={"m": [2, 3]})
    with pytest.raises(ConfigError, match="loguniform needs low > 0"):
        TuneConfig(head="refine", search_space={"lambda1": {"loguniform": [0, 1]}})
    with pytest.raises(ConfigError, match="search_space is empty"):
        TuneConfig(head="neighbors")


def test_float_fields_accept_exponent_notation():
    from tagray.heads.neighborhood import NeighborsConfig

    assert load_config(NeighborsConfig, overrides=parse_overrides(["lr=1e-3"])).lr == 0.001
    with pytest.raises(ConfigError, match="lr: expected a number, got 'fast'"):
        load_config(NeighborsConfig, overrides={"lr": "fast"})
