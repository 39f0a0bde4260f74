from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest
import yaml

from tagray.config import (
    CONFIG_DIR,
    ConfigError,
    coerce_fields,
    field_defaults,
    load_config,
    load_yaml,
    parse_overrides,
)
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
TUNE_CONFIGS = ("tagray/tune_configs/neighbors.yaml", "tagray/tune_configs/refine.yaml")
# Ray Serve configs: applications[0].args are ServeConfig fields; deployments name ours.
SERVE_CONFIGS = ("serve_configs/tagray.yaml",)
# Cluster definitions (Ray cluster launcher, KubeRay): checked in tests/test_cluster.py.
CLUSTER_CONFIGS = ("clusters/aws-gpu.yaml", "clusters/local.yaml", "clusters/rayjob-train.yaml", "clusters/rayservice.yaml")


def _config_files() -> set[str]:
    return {str(p.relative_to(REPO)) for d in ("tagray/configs", "tagray/tune_configs", "serve_configs", "clusters")
            for p in (REPO / d).glob("*.yaml")}


def test_every_config_file_is_known_and_loads():
    known = set(CONFIG_CLASSES) | set(TRAIN_CONFIGS) | set(SERVE_CONFIGS) | set(CLUSTER_CONFIGS) | set(TUNE_CONFIGS)
    assert _config_files() == known | {"tagray/configs/non_image_tags.yaml"}
    from tagray.commands.train import head_config_class, load_settings
    from tagray.train.run_config import TrainRunConfig

    for rel in TRAIN_CONFIGS:
        data = load_yaml(REPO / rel)
        head, run = load_settings(str(REPO / rel), {})
        assert type(head) is head_config_class(Path(rel).stem) and head.head == Path(rel).stem, rel
        # what load_settings returns is the dataclasses' defaults with exactly the file's settings
        assert head == dataclasses.replace(type(head)(), **_coerced(type(head), data)), rel
        assert run == dataclasses.replace(TrainRunConfig(), **_coerced(TrainRunConfig, data)), rel
    from tagray.tune.space import TuneConfig

    for rel in TUNE_CONFIGS:
        data = load_yaml(REPO / rel)
        sweep = load_config(TuneConfig, REPO / rel)
        assert sweep.head == Path(rel).stem
        space = sweep.param_space()
        assert set(space) == set(data["fixed"]) | set(data["search_space"]), rel
        assert {k: space[k] for k in data["fixed"]} == data["fixed"]
        assert all(isinstance(space[k], dict) and "grid_search" in space[k] for k in data["search_space"]), rel
    for rel, cls in CONFIG_CLASSES.items():
        cfg = load_config(cls, REPO / rel)
        assert cfg == dataclasses.replace(cls(), **_coerced(cls, load_yaml(REPO / rel))), rel
    lists = NonImageLists.load("non_image_tags.yaml")
    assert lists.matches("2012") and lists.matches("nikon") and lists.matches("explore")
    assert not lists.matches("beach")


# --- one place for each default -------------------------------------------------------------
# The config dataclasses' field defaults are the only defaults. A YAML file holds the settings
# that differ from them, each with its reason in a comment on its line; a file that changes
# nothing is an empty mapping `{}` whose comments name the dataclass. `head` selects the class
# of a train or tune file and must be its file name. Commented-out examples (`# key: value`) are
# deviations too. Sweeps (`fixed`) are checked against the head's dataclass.

def _coerced(cls: type, data: dict) -> dict:
    """`data`'s keys that are fields of `cls`, as from_dict coerces them (YAML lists → tuples …)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return coerce_fields(cls, {k: v for k, v in data.items() if k in names}, cls.__name__)


def repeated_defaults(classes: tuple[type, ...], data: dict, selectors: tuple[str, ...] = ()) -> list[str]:
    """Problems of settings `data` for the dataclasses `classes` (together they take every key):
    keys no class has, and keys whose value equals the default (after coercion)."""
    problems, seen = [], set()
    for cls in classes:
        default = field_defaults(cls)
        for key, value in _coerced(cls, data).items():
            seen.add(key)
            if key not in selectors and value == default[key]:
                problems.append(f"{key}: {data[key]!r} is {cls.__name__}'s default")
    problems += [f"{key}: not a field of {' or '.join(c.__name__ for c in classes)}" for key in sorted(set(data) - seen)]
    return problems


_COMMENTED = re.compile(r"^\s*#\s*([a-z_][a-z0-9_]*):\s+([^#]+?)\s*(#.*)?$")


def commented_examples(text: str) -> dict:
    """`# key: value` lines (examples of deviations) as a mapping."""
    out = {}
    for line in text.splitlines():
        m = _COMMENTED.match(line)
        if m:
            out[m.group(1)] = yaml.safe_load(m.group(2))
    return out


def unexplained(text: str, keys, indent: str = "") -> list[str]:
    """Keys set in `text` (at `indent`) whose line carries no comment giving the reason."""
    lines = {m.group(1): m.group(0) for m in re.finditer(rf"^{indent}([a-z_][a-z0-9_]*):.*$", text, re.M)}
    return [k for k in keys if "#" not in lines.get(k, "")]


def config_classes_of(rel: str, data: dict) -> tuple[type, ...]:
    if rel in CONFIG_CLASSES:
        return (CONFIG_CLASSES[rel],)
    if rel in TRAIN_CONFIGS:
        from tagray.commands.train import head_config_class
        from tagray.train.run_config import TrainRunConfig

        return (head_config_class(data.get("head")), TrainRunConfig)
    from tagray.tune.space import TuneConfig

    return (TuneConfig,)


def drift(rel: str) -> list[str]:
    """Every way `rel` repeats or invents a default (empty: the file holds deviations only)."""
    text = (REPO / rel).read_text()
    data = load_yaml(REPO / rel)
    classes = config_classes_of(rel, data)
    problems = [] if text.startswith("#") else ["does not start with a comment"]
    first = [line for line in text.splitlines() if line.startswith("# Used by: ")]
    if not first or not re.match(r"# Used by: (tagray|serve) [a-z]+ ", first[0]):
        problems.append("has no '# Used by: tagray <command> …' line")
    if not any(cls.__name__ in text for cls in classes):
        problems.append(f"names none of {', '.join(c.__name__ for c in classes)} (defaults: see …)")
    selectors = ("head",) if rel in TRAIN_CONFIGS or rel in TUNE_CONFIGS else ()
    if selectors and data.get("head") != Path(rel).stem:
        problems.append(f"head: {data.get('head')!r} is not the file's head {Path(rel).stem!r}")
    problems += repeated_defaults(classes, data, selectors)
    problems += [f"{k}: no comment gives the reason" for k in unexplained(text, set(data) - set(selectors)
                                                                          - {"fixed", "search_space"})]
    examples = commented_examples(text)
    problems += [f"commented example {p}" for p in repeated_defaults(classes, {k: v for k, v in examples.items()
                                                                              if k not in data}, selectors)]
    if rel in TUNE_CONFIGS:
        from tagray.tune.space import head_config_class

        fixed = data.get("fixed") or {}
        problems += [f"fixed.{p}" for p in repeated_defaults((head_config_class(data["head"]),), fixed)]
        problems += [f"fixed.{k}: no comment gives the reason" for k in unexplained(text, fixed, r"\s+")]
    return problems


@pytest.mark.parametrize("rel", [*CONFIG_CLASSES, *TRAIN_CONFIGS, *TUNE_CONFIGS])
def test_config_files_hold_only_deviations_with_reasons(rel):
    assert drift(rel) == [], f"{rel}: " + "; ".join(drift(rel))


def test_the_drift_check_catches_repeated_and_unknown_settings(tmp_path, monkeypatch):
    """drift() on files that repeat a default, set an unknown key, or give no reason."""
    cases = {
        "tagray/configs/split.yaml": ("# Used by: tagray split … SplitConfig\nseed: 0  # a repeated default\n",
                                      "seed: 0 is SplitConfig's default"),
        "tagray/configs/rlr.yaml": ("# Used by: tagray train … HeadConfig\nhead: rlr\nepochs: 20  # repeated\n",
                                    "epochs: 20 is HeadConfig's default"),
        "tagray/configs/neighbors.yaml": ("# Used by: tagray train … NeighborsConfig\nhead: neighbors\nworkers: 1  #\n",
                                          "workers: 1 is TrainRunConfig's default"),
        "tagray/configs/synth.yaml": ("# Used by: tagray synth … SynthConfig\nimages: 3000\n",
                                      "images: no comment gives the reason"),
        "tagray/configs/normalize.yaml": ("# Used by: tagray stats … NormalizerConfig\nmax_tgas: 5  # typo\n",
                                          "max_tgas: not a field of NormalizerConfig"),
        "tagray/configs/featurize.yaml": ("# Used by: tagray featurize … FeaturizeConfig\n{}\n# batch_size: 64  # GPU\n",
                                          "commented example batch_size: 64 is FeaturizeConfig's default"),
        "tagray/tune_configs/refine.yaml": ("# Used by: tagray tune … TuneConfig\nhead: refine\nfixed:\n  epochs: 30  # same\n"
                                            "search_space:\n  lambda1: {grid: [0.1, 1.0]}\n",
                                            "fixed.epochs: 30 is RefineConfig's default"),
        "tagray/configs/lr.yaml": ("# Used by: tagray train … HeadConfig\nhead: rlr\n", "head: 'rlr' is not the file's head"),
    }
    for rel, (text, _) in cases.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    for rel, (_, problem) in cases.items():
        assert any(p.startswith(problem) for p in drift(rel)), (rel, drift(rel))


def test_demo_overrides_only_deviations_and_builds_no_config_from_literals():
    """`tagray demo` builds every config from the dataclasses + DEMO_SETTINGS; each of those is a
    real field whose value differs from its default."""
    import ast

    from tagray.commands import demo

    for cls, settings in demo.DEMO_SETTINGS.items():
        assert repeated_defaults((cls,), settings) == [], cls.__name__
        cfg = demo.demo_config(cls)
        assert all(getattr(cfg, k) == v for k, v in _coerced(cls, settings).items())
    source = Path(demo.__file__).read_text()
    tree = ast.parse(source)
    config_names = {name for name in dir(demo) if name.endswith("Config") and dataclasses.is_dataclass(getattr(demo, name))}
    fields = {f.name for name in config_names for f in dataclasses.fields(getattr(demo, name))}
    built = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        called = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        if called in config_names or (called == "demo_config" and node.args and ast.unparse(node.args[0]) in config_names):
            built.add(ast.unparse(node.args[0]) if called == "demo_config" else called)
            literal = [k.arg for k in node.keywords if isinstance(k.value, (ast.Constant, ast.Tuple, ast.List))]
            assert called == "demo_config" and not literal, (
                f"demo.py line {node.lineno}: {ast.unparse(node)} — build configs with demo_config() and put "
                "literal settings in DEMO_SETTINGS (checked against the defaults)")
        if called == "add_argument":  # an option named like a config field takes its default from the dataclasses
            option = node.args[0].value.lstrip("-").replace("-", "_") if node.args else ""
            default = next((k.value for k in node.keywords if k.arg == "default"), None)
            if option in fields and isinstance(default, ast.Constant) and default.value is not None:
                pytest.fail(f"demo.py line {node.lineno}: --{option} default {default.value!r} is a literal copy: "
                            "take it from DEMO_SETTINGS or the dataclass")
    assert {"SynthConfig", "SplitConfig", "FeaturizeConfig", "HeadConfig", "EmbedConfig", "TrainRunConfig"} <= built


def test_demo_drift_check_catches_a_copied_default(monkeypatch):
    from tagray.commands import demo
    from tagray.heads.fit import HeadConfig

    monkeypatch.setitem(demo.DEMO_SETTINGS, HeadConfig, {**demo.DEMO_SETTINGS[HeadConfig], "lr": 0.01})
    assert repeated_defaults((HeadConfig,), demo.DEMO_SETTINGS[HeadConfig]) == ["lr: 0.01 is HeadConfig's default"]


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
    from tagray.config import from_dict
    from tagray.serve.service import ServeConfig

    for rel in SERVE_CONFIGS:
        text = (REPO / rel).read_text()
        assert text.startswith("#") and "serve run" in text and "serve deploy" in text
        args = args_from_serve_config(str(REPO / rel))
        cfg = from_dict(ServeConfig, args, rel)
        assert cfg.model and cfg.model == args["model"]  # required: the app has nothing to serve without it
        assert {k: getattr(cfg, k) for k in args} == coerce_fields(ServeConfig, args)  # every arg reaches the config
        app = load_yaml(REPO / rel)["applications"][0]
        assert app["import_path"] == "tagray.serve.app:build_app"
        assert {d["name"] for d in app.get("deployments") or []} <= {"Tagger", "Searcher", "Ingress"}
        if not cfg.index:  # a Searcher entry without an index makes Serve refuse the config
            assert "Searcher" not in {d["name"] for d in app.get("deployments") or []}
        assert text.count(cfg.model) == 1, f"{rel}: the model path is written more than once"
    with pytest.raises(ConfigError, match="unknown key"):
        from_dict(ServeConfig, {"model": "m", "batchsize": 3}, "args")


def test_a_searchers_scan_threads_are_search_threads_or_one_per_whole_cpu_it_reserves():
    from tagray.serve.service import ServeConfig

    assert ServeConfig(model="m").scan_threads == 1  # 0.25 CPU: one thread
    assert ServeConfig(model="m", searcher_cpus=2.5).scan_threads == 2
    assert ServeConfig(model="m", searcher_cpus=0.25, search_threads=2).scan_threads == 2
    with pytest.raises(ConfigError, match="search_threads"):
        ServeConfig(model="m", search_threads=-1)


@pytest.mark.parametrize("rel", SERVE_CONFIGS)
def test_serve_config_args_hold_only_deviations(rel):
    from tagray.commands.serve import args_from_serve_config
    from tagray.serve.service import ServeConfig

    args = args_from_serve_config(str(REPO / rel))
    assert repeated_defaults((ServeConfig,), args) == []
    assert unexplained((REPO / rel).read_text(), args, r"\s+") == []


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
