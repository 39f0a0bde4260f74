"""Issue 17 items 5 and 9 without Ray: finite settings, JSON that refuses NaN, undefined metrics
as null with a reason, a diverged in-process fit, non-finite weights refused on save and
load, the sweep's bounded checkpoints."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tagray import jsonio
from tagray.config import ConfigError, from_dict, load_config, parse_overrides
from tagray.data.split import SplitConfig
from tagray.data.synth import SynthConfig
from tagray.heads.embedding import EmbedConfig
from tagray.heads.fit import HeadConfig
from tagray.heads.linear import EMConfig
from tagray.heads.neighborhood import NeighborsConfig
from tagray.heads.recipes.linear import fit
from tagray.heads.refine import RefineConfig
from tagray.train.run_config import TrainRunConfig
from tagray.tune.space import TuneConfig

NON_FINITE = ["nan", "inf", "-inf", ".nan", ".inf", "1e400"]  # as typed on the command line (YAML scalars)


# --- jsonio -------------------------------------------------------------------------------------

def test_dumps_refuses_non_finite_naming_the_key_path():
    with pytest.raises(jsonio.NonFiniteError, match=r"report\.json: \$\.annotation\.micro_auc is not finite"):
        jsonio.dumps({"split": "test", "annotation": {"f1@5": 0.5, "micro_auc": float("nan")}}, "report.json")
    with pytest.raises(jsonio.NonFiniteError, match=r"\$\.history\[1\]\.loss"):
        jsonio.dumps({"history": [{"loss": 1.0}, {"loss": float("inf")}]}, indent=1)


def test_dumps_sees_numpy_scalars_through_default_str():
    # json.dumps(default=str) would write the string "inf" for a float32 inf; dumps refuses it.
    with pytest.raises(jsonio.NonFiniteError, match=r"\$\.mean_pi"):
        jsonio.dumps({"mean_pi": np.float32("inf")}, "metrics.json", default=str)
    text = jsonio.dumps({"a": np.float32(0.5), "n": np.int64(3), "p": [1.0, 2.5]}, default=str)
    assert json.loads(text) == {"a": 0.5, "n": 3, "p": [1.0, 2.5]}


def test_check_loss_names_epoch_step_and_loss():
    assert jsonio.check_loss(0.25, 1, 1) == 0.25
    with pytest.raises(jsonio.NonFiniteError, match=r"loss nan at epoch 3, step 17; lower lr"):
        jsonio.check_loss(float("nan"), 3, 17)
    assert issubclass(jsonio.NonFiniteError, FloatingPointError)  # what the trainers raised before


# --- finite settings ----------------------------------------------------------------------------

@pytest.mark.parametrize("value", NON_FINITE)
def test_non_finite_overrides_are_refused_naming_source_and_key(value):
    with pytest.raises(ConfigError, match=r"^defaults \+ command-line overrides: lr: expected a finite number, got"):
        load_config(HeadConfig, None, parse_overrides([f"lr={value}"]))


def test_non_finite_yaml_and_optional_floats_are_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("# test\nworker_cpus: .nan\n")
    with pytest.raises(ConfigError, match=rf"{path}: worker_cpus: expected a finite number, got nan"):
        load_config(TrainRunConfig, path)
    with pytest.raises(ConfigError, match=r"resources_wait_s: expected a finite number"):  # float | None
        from_dict(TrainRunConfig, {"resources_wait_s": float("inf")}, "x")
    assert from_dict(TrainRunConfig, {"resources_wait_s": None}, "x").resources_wait_s is None
    assert load_config(HeadConfig, None, parse_overrides(["lr=1e-3"])).lr == 1e-3  # YAML 1.1 reads it as a string


# Every float setting that has a range: NaN built directly (not through from_dict) fails too,
# and so does a finite value outside the range.
RANGED = [
    (HeadConfig, "lr", -1.0), (HeadConfig, "weight_decay", -0.1), (EMConfig, "eta", 2.0),
    (EmbedConfig, "lr", 0.0), (EmbedConfig, "dropout", 1.0), (EmbedConfig, "init_scale", 0.0),
    (NeighborsConfig, "lr", 0.0), (NeighborsConfig, "dropout", 1.5), (NeighborsConfig, "l2", -1.0),
    (RefineConfig, "lr", 0.0), (RefineConfig, "momentum", 1.0), (RefineConfig, "lambda1", -1.0),
    (TrainRunConfig, "worker_cpus", 0.0), (TrainRunConfig, "data_cpus", -1.0), (TrainRunConfig, "resources_wait_s", -1.0),
    (SplitConfig, "train", -0.5), (SynthConfig, "set_fraction", 1.5), (SynthConfig, "images_per_user", 0.5),
]


@pytest.mark.parametrize(("cls", "name", "bad"), RANGED, ids=[f"{c.__name__}.{n}" for c, n, _ in RANGED])
def test_float_settings_are_range_checked_and_nan_fails(cls, name, bad):
    with pytest.raises((ConfigError, ValueError)):
        cls(**{name: float("nan")})
    with pytest.raises((ConfigError, ValueError)):
        cls(**{name: bad})


def test_the_embed_heads_validation_settings_are_range_checked():
    assert EmbedConfig(val_images=0, patience=None).val_images == 0  # off, and no early stopping
    for bad in ({"val_images": -1}, {"patience": 0}):
        with pytest.raises(ConfigError, match=r"need val_images ≥ 0 \(0: off\) and patience ≥ 1 \(or null\)"):
            EmbedConfig(**bad)


def test_tune_settings_are_finite():
    base = {"head": "neighbors", "search_space": {"m": {"grid": [2, 3]}}}
    assert TuneConfig(**base).trial_cpus == 1.0
    with pytest.raises(ConfigError, match=r"fixed\.lr is not a finite number"):
        TuneConfig(**base, fixed={"lr": float("nan")})
    with pytest.raises(ConfigError, match=r"search_space\.lr\.loguniform\[1\] is not a finite number"):
        TuneConfig(head="neighbors", search_space={"lr": {"loguniform": [1e-4, float("inf")]}})
    with pytest.raises(ConfigError, match="trial_cpus must be > 0"):
        TuneConfig(**base, trial_cpus=float("nan"))


def test_sweep_keeps_a_bounded_number_of_checkpoints_by_the_metric():
    from tagray.tune.sweep import TRIAL_CHECKPOINTS_KEPT, checkpoint_config

    cfg = checkpoint_config(TuneConfig(head="neighbors", search_space={"m": {"grid": [2, 3]}}))
    assert cfg.num_to_keep == TRIAL_CHECKPOINTS_KEPT and 1 <= cfg.num_to_keep <= 3
    assert (cfg.checkpoint_score_attribute, cfg.checkpoint_score_order) == ("val_map", "max")


# --- undefined metrics --------------------------------------------------------------------------

def test_undefined_metrics_are_null_with_a_reason():
    from tagray.eval.report import EvalConfig, EvalData, task_metrics

    rng = np.random.default_rng(0)
    n, t = 40, 6
    tags = (rng.random((n, t)) < 0.3).astype(np.float32)
    labels = np.ones((n, 2), np.float32)  # every labelled image carries both labels: AUC is undefined
    data = EvalData(x=torch.zeros(n, 4), tags=tags, labels=labels, labelled=np.arange(n), label_tags=np.array([0, 1]))
    out = task_metrics(rng.random((n, t)), np.log(rng.random((n, 2))), data, EvalConfig())
    ann = out["annotation"]
    assert ann["micro_auc"] is None and ann["macro_auc"] is None
    assert ann["undefined"]["micro_auc"] == "the truth is all positive or all negative"
    assert math.isfinite(ann["map_label"])  # a defined metric stays a number
    assert out["retrieval"]["p@5_3"] is None  # 2 label columns: no 3-tag query
    assert "no 3-tag query" in out["retrieval"]["undefined"]["p@5_3"]
    json.loads(jsonio.dumps(out))  # valid JSON


# --- diverged fit, non-finite weights -----------------------------------------------------------

def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(200, 16, generator=g), (torch.rand(200, 10, generator=g) < 0.2).float()


def test_in_process_fit_stops_at_the_first_non_finite_loss():
    x, y = _data()
    seen = []
    with pytest.raises(jsonio.NonFiniteError, match=r"training diverged: loss inf at epoch 1, step 2; lower lr"):
        fit(x, y, HeadConfig(head="lr", lr=1e37, epochs=3, batch_size=50), on_epoch=lambda *a: seen.append(a))
    assert seen == []  # stopped inside the first epoch, before it was reported


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A small lr head trained in-process and saved as a model directory, with its corpus."""
    import pyarrow.compute as pc

    from tagray.data.normalize import NormalizerConfig, TagNormalizer
    from tagray.data.schema import read_manifest
    from tagray.features import store
    from tagray.heads.artifact import SavedHead, save_head
    from tagray.heads.fit import align
    from tagray.heads.targets import build_targets, dense, prepare_vocabulary
    from tests.corpora import split_corpus

    out = tmp_path_factory.mktemp("nanmodel")
    paths = split_corpus(out, 300, seed=0, feature_dim=16)
    manifest = read_manifest(paths["manifest"])
    normalizer = TagNormalizer(load_config(NormalizerConfig, "normalize.yaml"))
    vocab = prepare_vocabulary(manifest, normalizer)
    train = build_targets(manifest, normalizer, vocab)
    train = train.filter(pc.equal(train.column("split"), "train"))
    features, identity = store.read_features(paths["features"])
    x, found = align(features, train.column("image_id"))
    y = dense(train.column("tag_ids").take(found), len(vocab))
    cfg = HeadConfig(head="lr", epochs=1, batch_size=50)
    model = fit(x, y, cfg)
    head = SavedHead(model, vocab, cfg, identity, y.sum(0).numpy().astype(np.int64), np.zeros(len(vocab), bool),
                     {"final_loss": 0.5})
    save_head(head, str(out / "model"))
    return {**paths, "dir": out / "model", "head": head}


def poison(model_dir, name: str = "linear.weight") -> None:
    """Writes one NaN into tensor `name` of the model's weights file (a model written before the guard)."""
    path = str(model_dir / "weights.safetensors")
    state = load_file(path)
    state[name][0, 0] = float("nan")
    save_file(state, path)


def test_loading_non_finite_weights_names_the_file_and_tensor(saved_model, tmp_path):
    import shutil

    from tagray.heads.models import load_model

    assert load_model(str(saved_model["dir"])).model.tags > 0  # the clean copy loads
    bad = tmp_path / "bad"
    shutil.copytree(saved_model["dir"], bad)
    poison(bad)
    with pytest.raises(jsonio.NonFiniteError, match=rf"{bad}/weights.safetensors: tensor 'linear.weight' has 1 non-finite"):
        load_model(str(bad))


def test_saving_non_finite_weights_writes_nothing(saved_model, tmp_path):
    import copy

    from tagray.heads.artifact import save_head

    head = copy.deepcopy(saved_model["head"])
    with torch.no_grad():
        head.model.linear.bias[3] = float("inf")
    with pytest.raises(jsonio.NonFiniteError, match=r"tensor 'linear.bias'"):
        save_head(head, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
