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
    import hashlib

    import torchvision

    # Saved weights differ from the seed-0 init that build_backbone would otherwise use
    # (seed 1, and a BatchNorm scale no init produces), so only loading them reproduces them.
    torch.manual_seed(1)
    saved = torchvision.models.resnet18()
    with torch.no_grad():
        saved.layer4[1].bn2.weight.mul_(3.0)
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": saved.state_dict()}, path)
    state, digest = read_weights(str(path))
    loaded, _ = build_backbone("resnet18", state)
    random0, _ = build_backbone("resnet18", None, seed=0)
    saved.fc = torch.nn.Identity()  # the reference: the saved network without its head
    reference = saved.eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        ours, want, rand = loaded(x), reference(x), random0(x)
    assert torch.allclose(ours, want, atol=1e-6), (ours - want).abs().max()
    assert not torch.allclose(ours, rand, atol=1e-3)  # the file's weights, not the seed-0 init
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    with pytest.raises(ValueError, match="weights do not fit backbone 'resnet50'"):
        build_backbone("resnet50", state)
    with pytest.raises(FileNotFoundError, match="weights file .*nope.pth not found"):
        read_weights(str(tmp_path / "nope.pth"))


def test_crop_box_is_resize_then_centre_crop():
    """Resampling the source region equals torchvision's Resize(shorter side) + CenterCrop."""
    from PIL import Image

    from tagray.features.decode import crop_box
    from tests.images import _save

    rng = np.random.default_rng(3)
    arr = (rng.random((90, 240, 3)) * 40 + np.linspace(0, 200, 240)[None, :, None]).astype(np.uint8)
    img = Image.fromarray(arr)
    ours = decode(_save(img, "PNG"), 64, 72, 10**8).astype(float)
    scale = 72 / 90
    big = img.resize((round(240 * scale), 72), Image.Resampling.BILINEAR)
    left, top = (big.width - 64) // 2, (big.height - 64) // 2
    reference = np.asarray(big.crop((left, top, left + 64, top + 64)), dtype=float)
    assert np.abs(ours - reference).mean() < 3.0  # same region, same filter: sub-pixel offsets only
    assert crop_box(240, 90, 64, 72) == pytest.approx((80.0, 5.0, 160.0, 85.0))
    assert crop_box(1, 30000, 224, 256) == pytest.approx((0.0625, 14999.5625, 0.9375, 15000.4375))


_PROBE = """
import resource, sys
from tests.hostile import HOSTILE_IMAGES
from tagray.features.decode import ImageError, decode
data = HOSTILE_IMAGES[sys.argv[1]]()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    decode(data, 224, 256, 40_000_000)
    outcome = "decoded"
except ImageError as e:
    outcome = e.stage
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, outcome)
"""


@pytest.mark.parametrize("name", ["1x8000.png", "8000x1.png", "1x30000.png", "30000x2.jpg", "deep16_6000.png",
                                  "bomb.png", "truncated.jpg", "mutated.jpg"])
def test_hostile_images_cost_the_output_not_the_aspect_ratio(name):
    """Peak memory of decoding one hostile image in a fresh process: bounded by the header's
    pixel count and the output, whatever the aspect ratio or bit depth (before: 1×8000 took
    +2.0 GB, 1×30000 +7.8 GB, a 6000² 16-bit PNG +549 MB)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", _PROBE, name], capture_output=True, text=True, cwd=root,
                         timeout=120, check=True).stdout.split()
    grown_mb, outcome = int(out[0]), out[1]
    bound = 120 if name.startswith("deep16") else 40  # the 16-bit one holds its 72 MB of pixels once
    assert grown_mb < bound, f"{name}: +{grown_mb} MB"
    assert outcome == ("decode" if name in ("bomb.png", "truncated.jpg", "mutated.jpg") else "decoded")
