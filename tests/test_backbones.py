"""Backbones (issue 13 §3): open_clip image towers with their own preprocessing, torchvision
weights by name through its weights API and cache, CLIP text-tower word vectors. Random and
locally written weights only: nothing is downloaded (no network here)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tagray.config import ConfigError, load_config
from tagray.data.normalize import NormalizerConfig, TagNormalizer
from tagray.data.word_vectors import read_word_vectors, word_table_init, write_word_vectors
from tagray.features import open_clip_backbone as ocb
from tagray.features.backbone import (
    WeightsError,
    build_backbone,
    load_weights,
    preprocessing,
    read_weights,
    torchvision_weights,
)
from tagray.features.decode import decode
from tagray.features.open_clip_backbone import pretrained_vectors
from tagray.features.pipeline import FeaturizeConfig, prepare_backbone

open_clip = pytest.importorskip("open_clip")

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
SMALL = "open_clip:ViT-S-32"  # 63M parameters: the weights-file tests; ViT-B-32 (151M) is built once below
RESNET18_FILE = "resnet18-f37072fd.pth"  # torchvision's file name for ResNet18_Weights.IMAGENET1K_V1


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def normalizer() -> TagNormalizer:
    return TagNormalizer(load_config(NormalizerConfig, "normalize.yaml"))


def _clip(arch: str, seed: int):
    torch.manual_seed(seed)
    return open_clip.create_model(arch, pretrained=None, load_weights=False, pretrained_text=False).eval()


@pytest.fixture(scope="module")
def small_clip(tmp_path_factory):
    """ViT-S-32 from open_clip itself (seed 7) and its weights: the whole model as a torch.save
    checkpoint ({"state_dict": …}), as safetensors, and the image tower alone."""
    from safetensors.torch import save_file

    model = _clip("ViT-S-32", seed=7)
    root = tmp_path_factory.mktemp("clip")
    state = model.state_dict()
    torch.save({"state_dict": state}, root / "clip.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "clip.safetensors"))
    torch.save({k: v for k, v in state.items() if k.startswith("visual.")}, root / "visual.pt")
    return model, root


def _pixels(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32))


def test_open_clip_vit_b_32_is_open_clips_image_tower_with_its_preprocessing():
    tower, dim = build_backbone("open_clip:ViT-B-32", None, seed=4)
    assert dim == 512
    x = _pixels(2, 224)
    with torch.inference_mode():
        expected = _clip("ViT-B-32", seed=4).encode_image(x)
        assert torch.allclose(tower(x), expected, atol=1e-5)
    pre = preprocessing("open_clip:ViT-B-32")
    assert (pre["image_size"], pre["resize_size"]) == (224, 224)  # open_clip: shorter side to 224, centre crop
    assert pre["mean"] == pytest.approx(OPENAI_MEAN) and pre["std"] == pytest.approx(OPENAI_STD)
    siglip = preprocessing("open_clip:ViT-B-16-SigLIP")  # mean/std of its published weights (webli)
    assert siglip["mean"] == pytest.approx((0.5, 0.5, 0.5)) and siglip["std"] == pytest.approx((0.5, 0.5, 0.5))
    assert preprocessing("open_clip:ViT-L-14-336")["image_size"] == 336


def test_open_clip_identity_records_kind_and_preprocessing_torchvision_identity_unchanged():
    ident = prepare_backbone(FeaturizeConfig(backbone=SMALL, weights="random", seed=2)).identity
    assert ident["kind"] == "open_clip" and ident["name"] == SMALL and ident["dim"] == 384
    assert (ident["image_size"], ident["resize_size"]) == (224, 224)
    assert ident["mean"] == pytest.approx(OPENAI_MEAN) and ident["weights_digest"] == "random-seed-2"
    tv = prepare_backbone(FeaturizeConfig(backbone="resnet18", weights="random")).identity
    # Exactly the keys and values written before open_clip existed: old feature files stay comparable.
    assert tv == {"name": "resnet18", "weights": "random", "weights_digest": "random-seed-0", "image_size": 224,
                  "resize_size": 256, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "dim": 512}
    assert preprocessing("resnet18", 112)["resize_size"] == 128  # only the crop given: torchvision's 256/224 ratio kept


def test_open_clip_weights_file_loads_strictly(small_clip):
    model, root = small_clip
    path = root / "clip.pt"
    prepared = prepare_backbone(FeaturizeConfig(backbone=SMALL, weights=str(path)))
    assert prepared.identity["weights_digest"] == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    assert prepared.identity["weights"] == str(path)
    assert prepared.state and all(k.startswith("visual.") for k in prepared.state)  # no text tower for the actors
    # What the actors build from the trimmed state (the image tower's keys alone) and what serve
    # builds from the whole file both equal open_clip's encode_image.
    x = _pixels(2, 224, seed=1)
    with torch.inference_mode():
        expected = model.encode_image(x)
        actor, _ = build_backbone(SMALL, prepared.state)
        assert torch.allclose(actor(x), expected, atol=1e-5)
        served, _ = build_backbone(SMALL, read_weights(str(path))[0])
        assert torch.allclose(served(x), expected, atol=1e-5)


def test_open_clip_weights_of_another_shape_are_refused(small_clip):
    model, _ = small_clip
    state = dict(model.state_dict())
    state["visual.proj"] = torch.zeros(768, 512)  # ViT-B-32's projection shape
    with pytest.raises(WeightsError, match=r"weights do not fit backbone 'open_clip:ViT-S-32': .*visual.proj"):
        build_backbone(SMALL, state)
    del state["visual.proj"]
    with pytest.raises(WeightsError, match=r"Missing key.*visual.proj"):
        build_backbone(SMALL, state)


def test_random_weights_only_when_asked():
    with pytest.raises(ConfigError, match="no backbone weights given.*--weights random"):
        load_weights(SMALL, None, 0)
    with pytest.raises(ConfigError, match="torchvision weights name"):
        load_weights("resnet18", None, 0)


def test_torchvision_weights_names():
    assert torchvision_weights("resnet50", "IMAGENET1K_V2") == "torchvision:ResNet50_Weights.IMAGENET1K_V2"
    assert torchvision_weights("resnet50", "DEFAULT") == "torchvision:ResNet50_Weights.IMAGENET1K_V2"
    assert torchvision_weights("resnet50", "ResNet50_Weights.IMAGENET1K_V1") == "torchvision:ResNet50_Weights.IMAGENET1K_V1"
    for path in ("resnet50.pth", "models/r50.pt", "s3://b/r50.pth", "random"):
        assert torchvision_weights("resnet50", path) is None  # paths and URIs are files
    with pytest.raises(WeightsError, match="ResNet18_Weights has IMAGENET1K_V1, DEFAULT"):
        torchvision_weights("resnet18", "IMAGENET1K_V2")
    with pytest.raises(WeightsError, match="not torchvision weights of resnet18"):
        torchvision_weights("resnet18", "ResNet50_Weights.IMAGENET1K_V2")


def test_torchvision_weights_by_name_come_from_torchs_cache(tmp_path, monkeypatch):
    """A state_dict placed under the file name torchvision's weights API expects in
    $TORCH_HOME/hub/checkpoints is what `--weights IMAGENET1K_V1` loads; serve rebuilds it from
    the identity's `torchvision:` name."""
    from tagray.serve.service import load_backbone

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(11)
    import torchvision

    reference = torchvision.models.resnet18().eval()
    cached = tmp_path / "hub" / "checkpoints" / RESNET18_FILE
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)
    prepared = prepare_backbone(FeaturizeConfig(backbone="resnet18", weights="IMAGENET1K_V1"))
    ident = prepared.identity
    assert ident["weights"] == "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    assert ident["weights_digest"] == hashlib.sha256(cached.read_bytes()).hexdigest()[:16]
    assert prepare_backbone(FeaturizeConfig(backbone="resnet18", weights="DEFAULT")).identity == ident
    x = _pixels(2, 64, seed=3)
    reference.fc = torch.nn.Identity()
    served = load_backbone(ident)  # serve/service.py's interface, unchanged
    with torch.inference_mode():
        assert torch.allclose(build_backbone("resnet18", prepared.state)[0](x), reference(x), atol=1e-5)
        assert torch.allclose(served(x), reference(x), atol=1e-5)


def test_torchvision_weights_not_cached_and_not_downloadable(tmp_path, monkeypatch):
    import urllib.request

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # urllib builds its global opener, proxies included, on first use: keep the one this test's
    # closed proxy would leave behind from outliving it (every later urlopen would go through it)
    monkeypatch.setattr(urllib.request, "_opener", None)
    # No network here; the closed proxy port makes the download fail at once wherever this runs.
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with pytest.raises(WeightsError) as e:
        load_weights("resnet18", "IMAGENET1K_V1", 0)
    message = str(e.value)
    assert "\n" not in message
    assert f"not in torch's cache ({tmp_path}/hub/checkpoints/{RESNET18_FILE})" in message
    assert "could not be downloaded from https://download.pytorch.org/models/" + RESNET18_FILE in message
    assert not (tmp_path / "hub" / "checkpoints" / RESNET18_FILE).exists()


def test_open_clip_featurize_and_serve_preprocess_alike():
    """Featurize's decode + normalise + tower (what pipeline/embed.py run) and serve's
    `load_backbone` + identity's sizes and mean/std give one feature for one image."""
    from tagray.serve.service import load_backbone

    ident = prepare_backbone(FeaturizeConfig(backbone=SMALL, weights="random", seed=1)).identity
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(buf, "JPEG")
    px = decode(buf.getvalue(), ident["image_size"], ident["resize_size"], 10**8)
    assert px.shape == (224, 224, 3)
    x = torch.from_numpy(px.copy()).permute(2, 0, 1)[None].float()
    mean, std = (torch.tensor(ident[k]).view(1, 3, 1, 1) * 255 for k in ("mean", "std"))
    with torch.inference_mode():
        served = load_backbone(ident)((x - mean) / std)
        direct = _clip("ViT-S-32", seed=1).encode_image((x / 255 - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1))
                                                          / torch.tensor(OPENAI_STD).view(1, 3, 1, 1))
    assert torch.allclose(served, direct, atol=1e-4)


# ---------------------------------------------------------------- text tower → word vectors


def test_short_context_text_encoding_equals_open_clips(small_clip):
    model, _ = small_clip
    tokens = open_clip.get_tokenizer("ViT-S-32")(["a photo of sunset.", "a photo of golden gate bridge at night."])
    with torch.inference_mode():
        assert torch.allclose(ocb._encode_short(model, tokens), model.encode_text(tokens), atol=1e-5)


def test_vectors_spec_is_checked():
    assert ocb.parse_vectors_spec("open_clip:ViT-B-32@/m/clip.bin") == ("open_clip:ViT-B-32", "/m/clip.bin")
    assert ocb.parse_vectors_spec("open_clip:ViT-B-32@s3://b/k.safetensors")[1] == "s3://b/k.safetensors"
    with pytest.raises(ConfigError, match=r"name the CLIP weights.*open_clip:ViT-B-32@/path/.*@random"):
        ocb.parse_vectors_spec("open_clip:ViT-B-32")
    with pytest.raises(ConfigError, match="unknown open_clip model 'ViT-B-99'"):
        ocb.parse_vectors_spec("open_clip:ViT-B-99@random")


def test_clip_text_vectors_in_the_word_table_format(tmp_path, normalizer, small_clip):
    model, root = small_clip
    path = root / "clip.safetensors"
    tags = ["Sunsets", "beach", "new york city", "beach"]
    words, vectors = pretrained_vectors(f"{SMALL}@{path}", normalizer, max_words=12, words=tags)
    assert words[:3] == ["sunset", "beach", "new york city"]  # the given words, normalised, deduplicated, first
    assert len(words) == 15 and len(set(words)) == 15 and "day" in words  # then frequent English words
    assert vectors.shape == (15, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    tokens = open_clip.get_tokenizer("ViT-S-32")([ocb.PROMPT.format(w) for w in words[:3]])
    with torch.inference_mode():
        expected = torch.nn.functional.normalize(model.encode_text(tokens), dim=-1).numpy()
    assert np.allclose(vectors[:3], expected, atol=1e-5)
    # The same table format a GloVe file gives: written, read back, merged with the tags.
    out = write_word_vectors(str(tmp_path / "clip_vectors.txt"), words, vectors)
    again, again_vectors = read_word_vectors(out, normalizer)
    assert again == words and np.allclose(again_vectors, vectors, atol=1e-5)
    table_words, table, from_file = word_table_init(("beach", "kayak"), (words, vectors), 300, 0.1)
    assert table.shape[1] == 384 and table_words[:2] == ["beach", "kayak"] and list(from_file[:2]) == [True, False]
    assert "sunset" in table_words and np.allclose(table[table_words.index("sunset")], vectors[0])


def test_clip_text_vectors_need_the_text_tower(normalizer, small_clip):
    _, root = small_clip
    with pytest.raises(ConfigError, match="holds only the image tower"):
        pretrained_vectors(f"{SMALL}@{root / 'visual.pt'}", normalizer, max_words=2)


def test_random_text_tower_vectors_only_when_asked(normalizer):
    words, vectors = pretrained_vectors(f"{SMALL}@random", normalizer, max_words=0, words=["kayak"])
    assert words == ["kayak"] and vectors.shape == (1, 384)


@pytest.mark.integration
def test_featurize_with_an_open_clip_backbone(ray_local, tmp_path):
    """The Ray Data pipeline with CLIP's image tower: shards carry the open_clip identity, and
    each feature is the tower's output on the image preprocessed as the identity says."""
    import pyarrow as pa

    from tagray.data import schema
    from tagray.features import store
    from tagray.features.pipeline import featurize

    rng = np.random.default_rng(3)
    rows = []
    for i, (w, h) in enumerate([(320, 240), (200, 410), (256, 256)]):
        path = tmp_path / f"im{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, "JPEG")
        rows.append({"image_id": f"im{i}", "user_id": "u", "uri": str(path), "tags": ["x"]})
    manifest = tmp_path / "manifest.parquet"
    schema.write_manifest(pa.Table.from_pylist(rows), str(manifest))
    cfg = FeaturizeConfig(backbone=SMALL, weights="random", seed=3, batch_size=2, decode_batch_size=2, actors=1,
                          block_rows=2, shard_rows=10)
    summary = featurize(str(manifest), str(tmp_path / "features"), cfg)
    assert summary["featurized"] == 3 and summary["errors"] == 0
    table, ident = store.read_features(str(tmp_path / "features"))
    assert ident["kind"] == "open_clip" and ident["dim"] == 384 and ident["resize_size"] == 224
    model = _clip("ViT-S-32", seed=3)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (OPENAI_MEAN, OPENAI_STD))
    got = dict(zip(table.column("image_id").to_pylist(), table.column("feature").to_pylist(), strict=True))
    for row in rows:
        px = decode(Path(row["uri"]).read_bytes(), 224, 224, 10**8)
        x = (torch.from_numpy(px.copy()).permute(2, 0, 1)[None].float() / 255 - mean) / std
        with torch.inference_mode():
            expected = model.encode_image(x)[0].numpy()
        assert np.allclose(got[row["image_id"]], expected, atol=1e-3)
