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

from tagray.data import storage


class ImageError(Exception):
    """An image that could not be fetched or decoded."""

    def __init__(self, stage: str, reason: str) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage = stage
        self.reason = reason


def fetch(uri: str, max_bytes: int, endpoint_url: str | None = None) -> bytes:
    """The bytes at `uri`; ImageError('fetch', …) when missing, unreadable or too large."""
    try:
        data = storage.read_bytes(uri, endpoint_url)
    except FileNotFoundError:
        raise ImageError("fetch", "missing object (no such file or key)") from None
    except (OSError, ValueError) as e:
        raise ImageError("fetch", f"cannot read: {e}") from e
    if len(data) > max_bytes:
        raise ImageError("fetch", f"oversized file: {len(data)} bytes > max_bytes {max_bytes}")
    return data


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # high bit depth: scale to 8 bits
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo or 1.0) * 255
        img = Image.fromarray(arr.astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")  # CMYK, YCbCr, L, 1, P → RGB


def decode(data: bytes, image_size: int, resize_size: int, max_pixels: int) -> np.ndarray:
    """JPEG/PNG/… bytes → uint8 (image_size, image_size, 3); ImageError('decode', …) otherwise."""
    if not data:
        raise ImageError("decode", "empty file (0 bytes)")
    Image.MAX_IMAGE_PIXELS = None  # our own limit below, with a clearer message
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # reads the header only
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError("decode", f"decompression bomb: {w}×{h} = {w * h} pixels > max_pixels {max_pixels}")
            if img.format == "JPEG":
                img.draft("RGB", (resize_size, resize_size))  # DCT-domain downscale: far less work
            img = ImageOps.exif_transpose(_to_rgb(img))
            scale = resize_size / min(img.size)
            size = (max(image_size, round(img.width * scale)), max(image_size, round(img.height * scale)))
            img = img.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
            left, top = (img.width - image_size) // 2, (img.height - image_size) // 2
            img = img.crop((left, top, left + image_size, top + image_size))
            return np.asarray(img, dtype=np.uint8)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("decode", "not an image (format not recognised)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError("decode", f"decompression bomb: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError("decode", f"corrupt image: {e}") from None


def fetch_and_decode(
    batch: pa.Table, image_size: int, resize_size: int, max_bytes: int, max_pixels: int, endpoint_url: str | None
) -> dict[str, np.ndarray]:
    """CPU task: (image_id, uri) rows → uint8 pixels, or an error stage and reason per row."""
    ids = batch.column("image_id").to_pylist()
    uris = batch.column("uri").to_pylist()
    pixels = np.zeros((len(ids), image_size, image_size, 3), dtype=np.uint8)
    stage = np.full(len(ids), "", dtype=object)
    reason = np.full(len(ids), "", dtype=object)
    for i, uri in enumerate(uris):
        try:
            pixels[i] = decode(fetch(uri, max_bytes, endpoint_url), image_size, resize_size, max_pixels)
        except ImageError as e:
            stage[i], reason[i] = e.stage, e.reason
        except Exception as e:  # never let one image stop the run; record what happened
            stage[i], reason[i] = "decode", f"unexpected {type(e).__name__}: {e}"
    return {
        "image_id": np.array(ids, dtype=object),
        "uri": np.array(uris, dtype=object),
        "pixels": pixels,
        "stage": stage,
        "reason": reason,
    }
