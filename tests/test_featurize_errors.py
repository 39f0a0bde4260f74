"""Impossible featurize / embed-vectors settings are one-line errors with exit status 2,
found before Ray starts (issue 17 item 6): `tagray.runtime.init_ray` is replaced by a function
that fails the test, so an error found only after Ray would show as that failure."""

from __future__ import annotations

import pytest
import torch

from tagray import cli


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    def init_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the settings were checked")

    monkeypatch.setattr("tagray.runtime.init_ray", init_ray)


def _run(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "nothing on stderr"
    assert not any(line.startswith("Traceback") for line in err)
    return err[0]


def _featurize(tmp_path, *extra: str) -> list[str]:
    return ["featurize", "--manifest", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "f"), *extra]


def test_unknown_backbone(tmp_path, capsys):
    line = _run(capsys, _featurize(tmp_path, "--backbone", "resnet9000", "--weights", "random"))
    assert line.startswith("tagray featurize: error: unknown backbone 'resnet9000': did you mean resnet50")
    line = _run(capsys, _featurize(tmp_path, "--backbone", "open_clip:ViT-B-33", "--weights", "random"))
    assert line.startswith("tagray featurize: error: unknown open_clip model 'ViT-B-33'")


@pytest.mark.parametrize("content", [b"not a checkpoint at all", "list"])
def test_weights_file_that_is_not_a_state_dict(tmp_path, capsys, content):
    path = tmp_path / "w.pth"
    if content == "list":
        torch.save([torch.zeros(2)], path)  # a real torch.save file, but no name → tensor mapping
    else:
        path.write_bytes(content)
    line = _run(capsys, _featurize(tmp_path, "--backbone", "resnet18", "--weights", str(path)))
    assert line.startswith(f"tagray featurize: error: weights file {path} could not be read as a PyTorch state_dict")


def test_weights_of_another_model(tmp_path, capsys):
    import torchvision

    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    line = _run(capsys, _featurize(tmp_path, "--backbone", "resnet34", "--weights", str(path)))
    assert line.startswith("tagray featurize: error: weights do not fit backbone 'resnet34': Missing key(s)")


def test_missing_weights_and_unknown_weights_name(tmp_path, capsys):
    line = _run(capsys, _featurize(tmp_path, "--backbone", "resnet18", "--weights", str(tmp_path / "nope.pth")))
    assert line.startswith(f"tagray featurize: error: weights file {tmp_path / 'nope.pth'} not found")
    line = _run(capsys, _featurize(tmp_path, "--backbone", "resnet18", "--weights", "IMAGENET1K_V9"))
    assert line.startswith("tagray featurize: error: --weights IMAGENET1K_V9: not torchvision weights of resnet18")
    line = _run(capsys, _featurize(tmp_path, "--backbone", "resnet18"))
    assert line.startswith("tagray featurize: error: no backbone weights given")


@pytest.mark.parametrize(
    ("overrides", "first_line"),
    [
        (["image_size=0"], "image_size=0: must be ≥ 1"),
        (["image_size=-3", "actors=0"], "image_size=-3, actors=0: must be ≥ 1"),
        (["resize_size=0"], "resize_size=0: must be ≥ 1"),
        (["image_size=224", "resize_size=200"], "resize_size=200 < image_size=224"),
        (["resize_size=100"], "backbone resnet18: image_size must be ≥ 1 and resize_size ≥ image_size"),
        (["torch_threads=0"], "torch_threads=0: must be ≥ 1"),
        (["max_pixels=0"], "max_pixels=0: must be ≥ 1"),
        (["decode_cpus=0"], "decode_cpus must be > 0"),
        (["batch_size=0"], "batch_size, decode_batch_size and shard_rows must be ≥ 1"),
        (["max_error_fraction=2"], "max_error_fraction must be in [0, 1]"),
    ],
)
def test_impossible_settings(tmp_path, capsys, overrides, first_line):
    line = _run(capsys, _featurize(tmp_path, "--backbone", "resnet18", "--weights", "random", *overrides))
    assert line.startswith("tagray featurize: error: ") and first_line in line


def test_crop_the_model_cannot_take(tmp_path, capsys):
    line = _run(capsys, _featurize(tmp_path, "--backbone", "vit_b_16", "--weights", "random", "image_size=256"))
    assert line.startswith("tagray featurize: error: backbone vit_b_16 cannot take 256×256 crops (image_size)")


def test_missing_manifest(tmp_path, capsys):
    line = _run(capsys, _featurize(tmp_path, "--backbone", "resnet18", "--weights", "random", "image_size=32"))
    assert line == f"tagray featurize: error: --manifest {tmp_path / 'm.parquet'}: no such file"


def test_clip_vectors_without_weights(tmp_path, capsys):
    argv = ["train", "--head", "embed", "--manifest", str(tmp_path / "m.parquet"), "--features", str(tmp_path / "f"),
            "--out", str(tmp_path / "model")]
    line = _run(capsys, [*argv, "--vectors", "open_clip:ViT-B-32"])
    assert line.startswith("tagray train: error: --vectors open_clip:ViT-B-32: name the CLIP weights")
    line = _run(capsys, [*argv, "--vectors", "open_clip:nope@random"])
    assert line.startswith("tagray train: error: unknown open_clip model 'nope'")


def test_open_clip_pretrained_tag_says_where_the_file_is(tmp_path, capsys):
    line = _run(capsys, _featurize(tmp_path, "--backbone", "open_clip:ViT-B-32", "--weights", "laion2b_s34b_b79k"))
    assert line.startswith("tagray featurize: error: --weights laion2b_s34b_b79k is an open_clip pretrained tag")
    assert "huggingface.co/laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in line
