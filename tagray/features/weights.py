"""Backbone weights (SPEC §2): a state_dict read from a file or object-store URI (torch.save
or safetensors), or torchvision's named weights from torch's hub cache, with the file's digest
that a backbone identity records; the errors a user can act on. Shared by the torchvision and
the open_clip backbones."""

from __future__ import annotations

import hashlib
import io
import os

import torch

from tagray.config import ConfigError
from tagray.data import storage

RANDOM = "random"
TORCHVISION_WEIGHTS = "torchvision:"  # prefix of a torchvision weights name in an identity's `weights`


class WeightsError(ConfigError):
    """Backbone weights that cannot be had or used: not a state_dict, another model's, a
    torchvision name that is neither cached nor downloadable."""


def misfit(name: str, e: RuntimeError) -> WeightsError:
    """load_state_dict's error as one line: which keys are missing / unexpected / misshapen."""
    lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
    detail = "; ".join(lines)
    if len(detail) > 300:
        detail = detail[:300] + " …"
    return WeightsError(f"weights do not fit backbone {name!r}: {detail or str(e).splitlines()[0]}")


def _unwrap_state_dict(obj) -> dict:
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj:
            return _unwrap_state_dict(obj[key])
    raise ValueError("expected a state_dict (name → tensor), or a checkpoint holding one under 'state_dict' or 'model'")


def _torchvision_cached(spec: str) -> str:
    """The file of torchvision weights `spec` in torch's hub cache ($TORCH_HOME/hub/checkpoints),
    downloaded there by torch.hub (hash-checked) when missing; a WeightsError when it cannot be."""
    import torchvision

    try:
        weights = torchvision.models.get_weight(spec.removeprefix(TORCHVISION_WEIGHTS))
    except (ValueError, KeyError, AttributeError) as e:
        raise WeightsError(f"{spec}: not a torchvision weights name ({e})") from e
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
    if not os.path.exists(cached):
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        match = torch.hub.HASH_REGEX.search(os.path.basename(weights.url))
        try:
            torch.hub.download_url_to_file(weights.url, cached, match.group(1) if match else None, progress=False)
        except Exception as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise WeightsError(
                f"torchvision weights {spec.removeprefix(TORCHVISION_WEIGHTS)} are not in torch's cache ({cached}) "
                f"and could not be downloaded from {weights.url} ({reason}): fetch that file on a machine with "
                "network into $TORCH_HOME/hub/checkpoints/ here, or pass --weights PATH"
            ) from e
    return cached


def read_weights(uri: str, endpoint_url: str | None = None) -> tuple[dict, str]:
    """A state_dict from a local path or object-store URI (or torchvision weights by their
    `torchvision:<Enum>.<NAME>` name), and the file's digest."""
    if uri.startswith(TORCHVISION_WEIGHTS):
        uri = _torchvision_cached(uri)
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
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WeightsError(f"weights file {uri} could not be read as a PyTorch state_dict "
                           f"(torch.save of model.state_dict(), or .safetensors): {reason}") from e
    return state, digest
