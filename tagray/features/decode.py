"""Fetch and decode images on CPU (SPEC §2); imports no torch, so the Ray tasks that run
it start fast: bytes → RGB → resize shorter side →
centre crop → uint8 HWC. Every failure becomes an `ImageError` with the stage
(`fetch` or `decode`) and a reason a person can act on; odd modes (CMYK, grayscale,
palette, alpha, 16-bit) are converted rather than rejected.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps, UnidentifiedImageError

from tagray.data import http_fetch, storage
from tagray.data.http_fetch import HttpSettings


class ImageError(Exception):
    """An image that could not be fetched or decoded."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


def fetch(uri: str | None, max_bytes: int, endpoint_url: str | None = None,
          http: HttpSettings | None = None) -> bytes:
    """The bytes at `uri` (a path, any object-store URI of tagray.data.storage, or an
    http(s) URL fetched as tagray.data.http_fetch says); ImageError('fetch', …) when the
    uri is missing, the object is missing or unreadable, or it is over `max_bytes` (never
    more than max_bytes + 1 bytes are read)."""
    if uri is None or not str(uri).strip():
        raise ImageError("fetch", "missing uri")
    if storage.is_http(uri):
        try:
            return http_fetch.fetch(uri, max_bytes, http)
        except http_fetch.FetchError as e:
            raise ImageError("fetch", e.reason) from None
    try:
        data = storage.read_bytes(uri, endpoint_url, limit=max_bytes + 1)
    except FileNotFoundError:
        raise ImageError("fetch", "missing object (no such file or key)") from None
    except (OSError, ValueError) as e:
        raise ImageError("fetch", f"cannot read: {storage.redact_text(str(e), uri)}") from None
    if len(data) > max_bytes:
        raise ImageError("fetch", f"oversized file: over max_bytes {max_bytes}")
    return data


_HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any mode → RGB. Called on the already resized crop, so its cost is the output's size:
    high bit depths are stretched to 8 bits in float32 over image_size² pixels, never over the
    whole image (a 6000×6000 16-bit PNG would need 288 MB in float64)."""
    if img.mode in _HIGH_DEPTH:
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo or 1.0))
        img = Image.fromarray(arr.astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")  # CMYK, YCbCr, L, LAB, HSV → RGB


def crop_box(width: int, height: int, image_size: int, resize_size: int) -> tuple[float, float, float, float]:
    """The source region that "resize the shorter side to `resize_size`, then centre-crop
    `image_size`" keeps (torchvision's Resize + CenterCrop), in source pixels. Resampling that
    region straight to image_size² costs the output's size whatever the aspect ratio: a 1×30000
    image no longer becomes 256×7,680,000 pixels before the crop."""
    scale = resize_size / min(width, height)
    side_w = min(width, image_size / scale)
    side_h = min(height, image_size / scale)
    left, top = (width - side_w) / 2, (height - side_h) / 2
    return left, top, left + side_w, top + side_h


def decode(data: bytes, image_size: int, resize_size: int, max_pixels: int) -> np.ndarray:
    """JPEG/PNG/… bytes → uint8 (image_size, image_size, 3); ImageError('decode', …) otherwise.

    The work is bounded by the input's header (W×H ≤ max_pixels, checked before any pixel is
    decoded) and by the output (the crop is resampled straight to image_size², see `crop_box`);
    JPEGs are decoded at a reduced DCT scale when they are larger than needed."""
    if not data:
        raise ImageError("decode", "empty file (0 bytes)")
    Image.MAX_IMAGE_PIXELS = None  # our own limit below, with a clearer message
    w = h = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError("decode", f"decompression bomb: {w}×{h} = {w * h} pixels > max_pixels {max_pixels}")
            if img.format == "JPEG":
                img.draft("RGB", (resize_size, resize_size))  # DCT-domain downscale: far less work
            img = ImageOps.exif_transpose(img)
            if img.mode in ("P", "PA"):  # palette: resampled as colours, not as indices
                img = img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
            elif img.mode == "1":
                img = img.convert("L")
            box = crop_box(img.width, img.height, image_size, resize_size)
            gap = None if img.mode.startswith("I;16") else 3.0  # Image.reduce has no 16-bit modes
            img = img.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box, reducing_gap=gap)
            return np.asarray(_to_rgb(img), dtype=np.uint8)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("decode", "not an image (format not recognised)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("decode", f"decompression bomb: {e}") from None
    except MemoryError:
        raise ImageError("decode", f"out of memory decoding a {w}×{h} image") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise ImageError("decode", f"corrupt image: {e}") from None


def fetch_and_decode(
    batch: pa.Table, image_size: int, resize_size: int, max_bytes: int, max_pixels: int, endpoint_url: str | None,
    http: dict | None = None,
) -> dict[str, np.ndarray]:
    """CPU task: (image_id, uri) rows → uint8 pixels, or an error stage and reason per row.
    `http`: HttpSettings fields (FeaturizeConfig's http_* and allow_hosts) for http(s) uris."""
    settings = HttpSettings(**(http or {}))
    ids = batch.column("image_id").to_pylist()
    uris = batch.column("uri").to_pylist()
    pixels = np.zeros((len(ids), image_size, image_size, 3), dtype=np.uint8)
    stage = np.full(len(ids), "", dtype=object)
    reason = np.full(len(ids), "", dtype=object)
    for i, uri in enumerate(uris):
        data = None
        try:
            data = fetch(uri, max_bytes, endpoint_url, settings)
            pixels[i] = decode(data, image_size, resize_size, max_pixels)
        except ImageError as e:
            stage[i], reason[i] = e.stage, e.reason
        except Exception as e:  # never let one image stop the run; record what happened
            message = storage.redact_text(str(e), uri) if isinstance(uri, str) else str(e)
            stage[i], reason[i] = "fetch" if data is None else "decode", f"unexpected {type(e).__name__}: {message}"
    return {
        "image_id": np.array(ids, dtype=object),
        "uri": np.array(uris, dtype=object),
        "pixels": pixels,
        "stage": stage,
        "reason": reason,
    }
