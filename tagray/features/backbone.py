"""Featurize backbones (SPEC §2): torchvision models cut at the penultimate layer, and the
image tower of an open_clip CLIP model (`open_clip:<model>`, tagray/features/open_clip_backbone.py).

The papers use the last hidden layer of an ImageNet CNN, not fine-tuned: the model's
classification head is replaced by the identity, so the output is the pooled feature
(ResNet-18: 512, ResNet-50: 2048, ViT-B/16: 768). Weights come from a file or object
store URI (a `state_dict` saved with torch.save, or safetensors), or, for torchvision models,
by name through torchvision's weights API (`IMAGENET1K_V2`, `DEFAULT`: read from torch's
cache `$TORCH_HOME/hub/checkpoints`, downloaded there when it is missing); random weights
only when asked for, and then recorded as such in the backbone's identity.

Every setting is checked before any work starts (`check_name`, `preprocessing`, `load_weights`
and `build_backbone`'s probe at the crop size): an unknown name, a file that is no state_dict,
weights of another model and a crop the model cannot take are `WeightsError` / `ConfigError`s,
one line at the CLI.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn

from tagray.config import ConfigError
from tagray.features import open_clip_backbone
from tagray.features.weights import (  # noqa: F401 (re-exported: callers import them from here)
    RANDOM,
    TORCHVISION_WEIGHTS,
    WeightsError,
    misfit,
    read_weights,
)

log = logging.getLogger(__name__)

TORCHVISION = "torchvision"
OPEN_CLIP = "open_clip"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_SIZES = (224, 256)  # torchvision's ImageClassification transform: crop 224 after resizing to 256
DECODER_INTERPOLATION = "bilinear"  # what tagray.features.decode resamples with
DECODER_RESIZE_MODE = "shortest"  # shorter side to resize_size, then the centre crop


@dataclass(frozen=True)
class BackboneIdentity:
    """What makes two feature files comparable; stored in every features file (schema
    metadata `tagray.backbone`). The last three fields were added with open_clip: they are
    written only where they differ from what an identity without them means (a torchvision
    model, bilinear, shortest side), so identities, and the run names derived from them, of
    torchvision features stay what they were and old files stay comparable."""

    name: str  # torchvision model name, or open_clip:<model>
    weights: str  # weights URI as given, "torchvision:<Enum>.<NAME>", or "random"
    weights_digest: str  # sha256 prefix of the weights file, or "random-seed-<n>"
    image_size: int  # side of the square crop fed to the model
    resize_size: int  # shorter side before the centre crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    dim: int  # feature dimension D
    kind: str = TORCHVISION  # torchvision or open_clip
    interpolation: str = DECODER_INTERPOLATION  # resampling of the resize
    resize_mode: str = DECODER_RESIZE_MODE  # how the image is brought to the crop

    def to_dict(self) -> dict:
        d = asdict(self)
        for f in fields(self)[-3:]:
            if d[f.name] == f.default:
                del d[f.name]
        return d


def preprocessing(name: str, image_size: int | None = None, resize_size: int | None = None) -> dict:
    """The preprocessing a backbone gets: its own (torchvision: crop 224 of the shorter side
    resized to 256, ImageNet mean/std; open_clip: its model's), with `image_size` /
    `resize_size` overriding when given. Keys: image_size, resize_size, mean, std,
    interpolation, resize_mode (what tagray's decoder applies; open_clip's own wishes are
    logged where they differ)."""
    if open_clip_backbone.is_open_clip(name):
        own = open_clip_backbone.preprocess(name)
        for key, decoder in (("interpolation", DECODER_INTERPOLATION), ("resize_mode", DECODER_RESIZE_MODE)):
            if own[key] != decoder:
                log.warning("backbone %s: open_clip preprocesses with %s %r; tagray's decoder applies %r",
                            name, key, own[key], decoder)
    else:
        own = {"image_size": TORCHVISION_SIZES[0], "resize_size": TORCHVISION_SIZES[1],
               "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    own["interpolation"], own["resize_mode"] = DECODER_INTERPOLATION, DECODER_RESIZE_MODE
    if image_size is not None:
        own["image_size"] = image_size
        # Only the crop given: keep the backbone's resize/crop ratio (torchvision 256/224, open_clip 1).
        if resize_size is None:
            own["resize_size"] = round(image_size * own["resize_size"] / own_size(name))
    if resize_size is not None:
        own["resize_size"] = resize_size
    if own["image_size"] < 1 or own["resize_size"] < own["image_size"]:
        raise ConfigError(f"backbone {name}: image_size must be ≥ 1 and resize_size ≥ image_size "
                          f"(the crop is taken from the resized image), got image_size={own['image_size']}, "
                          f"resize_size={own['resize_size']}")
    return own


def own_size(name: str) -> int:
    """The crop size a backbone is made for."""
    if open_clip_backbone.is_open_clip(name):
        return open_clip_backbone.preprocess(name)["image_size"]
    return TORCHVISION_SIZES[0]


def check_name(name: str) -> str:
    """`name` if it names a backbone (a torchvision classification model, or open_clip:<model>),
    else a ConfigError suggesting close names. Returns the kind."""
    if open_clip_backbone.is_open_clip(name):
        open_clip_backbone.model_name(name)
        return OPEN_CLIP
    import difflib

    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        raise ConfigError(
            f"unknown backbone {name!r}: " + (f"did you mean {', '.join(close)}? " if close else "")
            + "give a torchvision classification model (resnet18, resnet50, vit_b_16, …; "
            "torchvision.models.list_models()) or open_clip:<model> (open_clip:ViT-B-32, …)"
        )
    return TORCHVISION


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


def torchvision_weights(name: str, weights: str) -> str | None:
    """`torchvision:<Enum>.<NAME>` when `weights` is a torchvision weights name for model `name`
    (`IMAGENET1K_V2`, `DEFAULT`, `ResNet50_Weights.IMAGENET1K_V2`, or that with the
    `torchvision:` prefix); None when it is not written like one (a path or URI). A name that
    is not one of the model's weights is a WeightsError listing those it has."""
    if open_clip_backbone.is_open_clip(name):
        return None
    enum_name, _, member = weights.removeprefix(TORCHVISION_WEIGHTS).rpartition(".")
    if not (weights.startswith(TORCHVISION_WEIGHTS) or (enum_name.endswith("_Weights") and member.isidentifier())
            or (not enum_name and member.isidentifier() and member.isupper())):
        return None
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError) as e:
        raise WeightsError(f"--weights {weights}: torchvision has no named weights for {name} ({e})") from e
    if (enum_name and enum_name != enum.__name__) or member not in enum.__members__:
        raise WeightsError(f"--weights {weights}: not torchvision weights of {name}; {enum.__name__} has "
                           f"{', '.join(enum.__members__)} (or give a state_dict path)")
    return f"{TORCHVISION_WEIGHTS}{enum.__name__}.{enum.__members__[member].name}"


def load_weights(name: str, weights: str | None, seed: int, endpoint_url: str | None = None) -> tuple[dict | None, str, str]:
    """(state_dict or None for random, digest, the weights as recorded in the identity) of
    `--weights` for backbone `name`: a path / URI, a torchvision weights name, or `random`."""
    if weights is None:
        raise ConfigError(
            "no backbone weights given: pass --weights PATH or s3://… (a state_dict)"
            + (", a torchvision weights name (IMAGENET1K_V1, DEFAULT, …)" if not open_clip_backbone.is_open_clip(name) else "")
            + ", or --weights random to use randomly initialised weights on purpose"
        )
    if weights == RANDOM:
        log.warning(
            "!!! featurize is using RANDOMLY INITIALISED %s weights (seed %d), as asked. "
            "Features will carry little meaning for real photos; this is recorded in the features' metadata.",
            name,
            seed,
        )
        return None, f"random-seed-{seed}", RANDOM
    open_clip_backbone.refuse_pretrained_tag(name, weights)
    recorded = torchvision_weights(name, weights) or weights
    state, digest = read_weights(recorded, endpoint_url)
    return state, digest, recorded


def build_backbone(name: str, state_dict: dict | None, seed: int = 0, image_size: int | None = None) -> tuple[nn.Module, int]:
    """The backbone `name` (a torchvision model without its head, or open_clip:<model>'s image
    tower) with `state_dict` loaded (strict), or seeded random weights when `state_dict` is
    None; eval mode. A zero batch at `image_size` (default: a size the model takes) probes it:
    a crop it cannot take is a ConfigError. Returns (model, feature dimension)."""
    if check_name(name) == OPEN_CLIP:
        model = open_clip_backbone.build_image_tower(name, state_dict, seed)
    else:
        import torchvision

        torch.manual_seed(seed)
        model = torchvision.models.get_model(name, weights=None)
        if state_dict is not None:
            try:
                model.load_state_dict(state_dict, strict=True)
            except RuntimeError as e:
                raise misfit(name, e) from e
        model = _strip_head(model, name).eval()
    if image_size is None:
        image_size = own_size(name) if open_clip_backbone.is_open_clip(name) or name.startswith(("vit", "swin")) else 64
    try:
        with torch.inference_mode():
            dim = int(model(torch.zeros(1, 3, image_size, image_size)).shape[1])
    except (RuntimeError, ValueError, AssertionError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"backbone {name} cannot take {image_size}×{image_size} crops (image_size): {reason}; "
                          f"it is made for {own_size(name)}") from e
    return model, dim
