"""Image decoding (no Ray): modes converted, bad inputs named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tagray.features.backbone import build_backbone, read_weights
from tagray.features.decode import ImageError, decode
from tests.images import bad_objects, odd_modes, png_bomb


def test_odd_modes_become_rgb_crops():
    for name, data in odd_modes().items():
        px = decode(data, image_size=32, resize_size=40, max_pixels=10**8)
        assert px.shape == (32, 32, 3) and px.dtype == np.uint8, name


def test_alpha_composited_on_white():
    from PIL import Image

    from tests.images import _save

    clear = Image.new("RGBA", (50, 50), (255, 0, 0, 0))
    px = decode(_save(clear, "PNG"), 16, 16, 10**8)
    assert (px == 255).all()


def test_resize_keeps_aspect_then_centre_crops():
    from PIL import Image

    from tests.images import _save

    arr = np.zeros((100, 300, 3), dtype=np.uint8)
    arr[:, 100:200] = 255  # white centre third
    px = decode(_save(Image.fromarray(arr), "PNG"), 50, 50, 10**8)
    assert px.mean() > 240  # the crop shows only the centre


@pytest.mark.parametrize("name", ["truncated.jpg", "empty.jpg", "text.jpg", "bomb.png"])
def test_bad_bytes_named(name):
    from PIL import Image

    from tests.images import _save

    good = _save(Image.new("RGB", (128, 128), (10, 200, 30)).effect_spread(4), "JPEG")
    data, stage, reason = bad_objects(good)[name]
    with pytest.raises(ImageError) as e:
        decode(data, 32, 40, max_pixels=89_478_485)
    assert e.value.stage == stage and e.value.reason.startswith(reason), e.value.reason


def test_bomb_message_names_pixels():
    with pytest.raises(ImageError, match=r"100000×100000 = 10000000000 pixels > max_pixels"):
        decode(png_bomb(), 32, 40, max_pixels=89_478_485)


def test_backbone_penultimate_dims_and_seeded():
    m1, d1 = build_backbone("resnet18", None, seed=0)
    m2, _ = build_backbone("resnet18", None, seed=0)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert d1 == 512 and m1(x).shape == (2, 512)
        assert torch.equal(m1(x), m2(x))
    with pytest.raises(ValueError, match="unknown backbone 'resnet17'"):
        build_backbone("resnet17", None)


def test_weights_file_loaded_and_checked(tmp_path):
    import torchvision

    torch.manual_seed(0)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": torchvision.models.resnet18().state_dict()}, path)
    state, digest = read_weights(str(path))
    loaded, _ = build_backbone("resnet18", state)
    random0, _ = build_backbone("resnet18", None, seed=0)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(loaded(x), random0(x))
    assert len(digest) == 16
    with pytest.raises(ValueError, match="weights do not fit backbone 'resnet50'"):
        build_backbone("resnet50", state)
    with pytest.raises(FileNotFoundError, match="weights file .*nope.pth not found"):
        read_weights(str(tmp_path / "nope.pth"))
