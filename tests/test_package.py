"""tagray without its checkout: configs as package data, WordNet from `tagray setup wordnet`,
and the wheel itself built, installed into a fresh venv outside the repository and run there
(`tagray synth`, `split`, `stats`, `train`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tagray.commands import setup as setup_command
from tagray.config import CONFIG_DIR, ConfigError, load_yaml, resolve_config_path
from tagray.data import wordnet as wn

REPO = Path(__file__).resolve().parent.parent
DEBIAN_WORDNET = Path("/usr/share/wordnet")
needs_debian_wordnet = pytest.mark.skipif(
    not (DEBIAN_WORDNET / "data.noun").is_file() or not (DEBIAN_WORDNET / "index.sense").is_file(),
    reason="Debian's wordnet-base / wordnet-sense-index are not installed (make setup installs them)",
)


def test_packaged_configs_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: names fall back to tagray's own
    for name in ("configs/rlr.yaml", "rlr.yaml"):
        found = resolve_config_path(name)
        assert found.is_file() and Path(str(found)).parent == Path(str(CONFIG_DIR))
    sweep = resolve_config_path("tune_configs/neighbors.yaml")  # `tagray tune --config` from a wheel or an image
    assert Path(str(sweep)) == Path(str(CONFIG_DIR)).parent / "tune_configs" / "neighbors.yaml"
    assert "camera" in load_yaml("configs/non_image_tags.yaml")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "rlr.yaml").write_text("# mine\nepochs: 7\n")
    assert load_yaml("configs/rlr.yaml") == {"epochs": 7}  # a file of the user's wins
    with pytest.raises(ConfigError, match=r"configs/nope\.yaml not found .*tagray's own configs: .*rlr\.yaml"):
        load_yaml("configs/nope.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "absent.yaml")  # an absolute path never falls back


def test_every_packaged_config_ships_in_the_wheel_data():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'tagray = ["configs/*.yaml", "tune_configs/*.yaml"]' in pyproject
    assert not (REPO / "configs").exists(), "configs live in tagray/configs/ (package data)"
    assert not (REPO / "tune_configs").exists(), "sweeps live in tagray/tune_configs/ (package data)"
    assert sorted(p.name for p in Path(str(CONFIG_DIR)).glob("*.yaml")) == sorted(
        p.name for p in (REPO / "tagray" / "configs").iterdir())


def test_search_dirs_put_nltk_data_first(monkeypatch, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("NLTK_DATA", f"{a}{os.pathsep}{b}")
    assert wn.search_dirs()[:2] == [str(a), str(b)]
    assert str(wn.LOCAL_NLTK_DATA) in wn.search_dirs()
    assert wn.CHECKOUT == REPO and wn.LOCAL_NLTK_DATA == REPO / ".nltk_data"


@needs_debian_wordnet
def test_setup_wordnet_assembles_a_folder_nltk_reads(tmp_path, capsys):
    dest = tmp_path / "nltk"
    assert wn.readable_version(dest) is None  # the probe reads `dest` only, not nltk's defaults
    assert setup_command.main(["wordnet", "--dir", str(dest), "--no-apt", "--no-download"]) == 0
    out = capsys.readouterr().out
    assert f"export NLTK_DATA={dest}" in out
    lexnames = (dest / "corpora" / "wordnet" / "lexnames").read_text().splitlines()
    assert len(lexnames) == 45 and lexnames[3] == "03\tnoun.Tops\t1" and lexnames[-1] == "44\tadj.ppl\t3"
    assert wn.readable_version(dest) == "3.0"
    # A second run finds it and changes nothing.
    assert setup_command.main(["wordnet", "--dir", str(dest), "--no-apt", "--no-download"]) == 0
    assert "already readable" in capsys.readouterr().out


def test_setup_wordnet_without_a_source_says_what_to_install(tmp_path, capsys):
    code = setup_command.main(["wordnet", "--dir", str(tmp_path / "nltk"), "--source", str(tmp_path / "none"),
                               "--no-apt", "--no-download"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("tagray setup: error: could not install WordNet into ")
    assert "apt-get install wordnet-base wordnet-sense-index" in err and "nltk.downloader" in err


def _run(cmd: list[str], cwd: Path, env: dict, timeout: float = 400) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))} → {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.integration
@pytest.mark.package
@needs_debian_wordnet
def test_wheel_runs_outside_the_checkout(tmp_path):
    """Build the wheel from a copy of the sources, install it (no deps) into a fresh venv whose
    third-party packages come from this venv through a .pth file, then run tagray from a
    directory outside the repository with no access to it."""
    src = tmp_path / "src"  # a copy, so that building leaves no build/ in the checkout
    shutil.copytree(REPO / "tagray", src / "tagray", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NLTK_DATA", "RAY_ADDRESS")}
    env["HOME"] = str(tmp_path / "home")  # ~/nltk_data and ~/.ray of this test only
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
          str(src)], tmp_path, env)
    (wheel,) = (tmp_path / "dist").glob("tagray-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     tmp_path, env).stdout.strip())
    # Third-party packages (ray, torch, …) from this venv; its own .pth files (the editable
    # tagray) are not processed for a directory added this way.
    (site / "zz_tagray_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel)], tmp_path, env)

    work = tmp_path / "work"
    work.mkdir()
    where = _run([str(python), "-c", "import tagray; print(tagray.__file__)"], work, env).stdout.strip()
    assert Path(where).is_relative_to(site) and not Path(where).is_relative_to(REPO), where
    tagray = str(venv / "bin" / "tagray")

    setup = _run([tagray, "setup", "wordnet", "--dir", str(tmp_path / "nltk"), "--no-apt", "--no-download"], work, env)
    exports = [line.split("=", 1)[1] for line in setup.stdout.splitlines() if line.startswith("export NLTK_DATA=")]
    assert exports == [str(tmp_path / "nltk")], setup.stdout
    env["NLTK_DATA"] = exports[0]

    _run([tagray, "synth", "--out", "corpus", "--images", "600", "--features-only", "feature_dim=16"], work, env)
    _run([tagray, "split", "--manifest", "corpus/manifest.parquet", "--out", "corpus/split.parquet"], work, env)
    _run([tagray, "stats", "--manifest", "corpus/split.parquet", "--out", "stats",
          "--normalizer", "configs/normalize.yaml"], work, env)
    stats = json.loads((work / "stats" / "stats.json").read_text())
    assert stats["images"] == 600 and stats["distinct_tags"] > 10
    # configs/lr.yaml is not a file here: the packaged one is read.
    train = _run([tagray, "train", "--head", "lr", "--config", "configs/lr.yaml", "--manifest", "corpus/split.parquet",
                  "--features", "corpus/features.parquet", "--out", "model", "epochs=1", "batch_size=50",
                  "worker_cpus=0.5"], work, env, timeout=600)
    model = json.loads((work / "model" / "model.json").read_text())
    assert model["head"] == "lr", model
    # the sweeps ship too: tune_configs/neighbors.yaml is not a file here
    sweep = _run([str(python), "-c", "from tagray.config import load_config; from tagray.tune.space import TuneConfig; "
                  "print(load_config(TuneConfig, 'tune_configs/neighbors.yaml').head)"], work, env)
    assert sweep.stdout.strip() == "neighbors", sweep.stdout + sweep.stderr
    assert (work / "model" / "weights.safetensors").is_file(), train.stdout[-2000:]
