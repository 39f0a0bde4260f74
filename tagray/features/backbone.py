"""torchvision backbones cut at the penultimate layer (SPEC §2).

The papers use the last hidden layer of an ImageNet CNN, not fine-tuned: the model's
classification head is replaced by the identity, so the output is the pooled feature
(ResNet-18: 512, ResNet-50: 2048, ViT-B/16: 768). Weights come from a file or object
store URI (a `state_dict` saved with torch.save, or safetensors); random weights only
when asked for, and then recorded as such in the backbone's identity.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn

from tagray.data import storage

log = logging.getLogger(__name__)

RANDOM = "random"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneIdentity:
    """What makes two feature files comparable; stored in every features file."""

    name: str  # torchvision model name
    weights: str  # weights URI as given, or "random"
    weights_digest: str  # sha256 prefix of the weights file, or "random-seed-<n>"
    image_size: int  # side of the square crop fed to the model
    resize_size: int  # shorter side before the centre crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dim: int  # feature dimension D

    def to_dict(self) -> dict:
        return asdict(self)


def _strip_head(model: nn.Module, name: str) -> nn.Module:
    """Replaces the classification head with the identity; the output is the penultimate layer."""
    if hasattr(model, "fc") and isinstance(model.fc, nn.Linear):  # ResNet, ResNeXt, RegNet, …
        model.fc = nn.Identity()
    elif hasattr(model, "heads"):  # ViT
        model.heads = nn.Identity()
    elif hasattr(model, "classifier"):  # VGG, EfficientNet, MobileNet, ConvNeXt, DenseNet
        clf = model.classifier
        if isinstance(clf, nn.Sequential):
            # Keep everything up to the last Linear (VGG's fc7 is the papers' feature).
            last = max(i for i, m in enumerate(clf) if isinstance(m, nn.Linear))
            model.classifier = nn.Sequential(*list(clf)[:last]) if last else nn.Identity()
        else:
            model.classifier = nn.Identity()
    elif hasattr(model, "head"):  # Swin
        model.head = nn.Identity()
    else:
        raise ValueError(f"backbone {name!r}: don't know where its classification head is")
    return model


def _unwrap_state_dict(obj) -> dict:
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj:
            return _unwrap_state_dict(obj[key])
    raise ValueError("expected a state_dict (name → tensor), or a checkpoint holding one under 'state_dict' or 'model'")


def read_weights(uri: str, endpoint_url: str | None = None) -> tuple[dict, str]:
    """A state_dict from a local path or object-store URI, and the file's digest."""
    try:
        blob = storage.read_bytes(uri, endpoint_url)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"weights file {uri} not found (give a path or s3:// URI, or --weights random)") from e
    digest = hashlib.sha256(blob).hexdigest()[:16]
    try:
        if uri.endswith(".safetensors"):
            from safetensors.torch import load as load_safetensors

            state = load_safetensors(blob)
        else:
            state = _unwrap_state_dict(torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True))
    except Exception as e:
        raise ValueError(f"weights file {uri} could not be read as a PyTorch state_dict: {e}") from e
    return state, digest


def build_backbone(name: str, state_dict: dict | None, seed: int = 0) -> tuple[nn.Module, int]:
    """The torchvision model `name` with `state_dict` loaded (strict), or seeded random weights
    when `state_dict` is None; head removed, eval mode. Returns (model, feature dimension)."""
    import torchvision

    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(f"unknown backbone {name!r}; torchvision classification models include resnet18, resnet50, vit_b_16")
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None)
    if state_dict is not None:
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as e:
            raise ValueError(f"weights do not fit backbone {name!r}: {str(e).splitlines()[0]}") from e
    model = _strip_head(model, name).eval()
    with torch.inference_mode():
        size = 224 if name.startswith(("vit", "swin")) else 64
        dim = int(model(torch.zeros(1, 3, size, size)).shape[1])
    return model, dim
