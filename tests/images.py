"""Bad and unusual image files for feature-extraction tests."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def _save(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims width × height pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def odd_modes(size: int = 96) -> dict[str, bytes]:
    """Images in modes a pipeline must convert rather than reject."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), "RGB")
    rgba = rgb.copy()
    rgba.putalpha(128)
    palette = rgb.convert("P")
    palette.info["transparency"] = 0
    deep = Image.fromarray(rng.integers(0, 65535, (size, size), dtype=np.uint16).astype(np.int32), "I").convert("I;16")
    return {
        "cmyk.jpg": _save(rgb.convert("CMYK"), "JPEG"),
        "gray.jpg": _save(rgb.convert("L"), "JPEG"),
        "alpha.png": _save(rgba, "PNG"),
        "palette.png": _save(palette, "PNG"),
        "deep16.png": _save(deep, "PNG"),
    }


def bad_objects(good_jpeg: bytes) -> dict[str, tuple[bytes | None, str, str]]:
    """name → (bytes, or None for a missing object; expected stage; expected reason prefix)."""
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 255, (600, 600, 3), dtype=np.uint8))
    return {
        "truncated.jpg": (good_jpeg[: len(good_jpeg) // 3], "decode", "corrupt image"),
        "empty.jpg": (b"", "decode", "empty file"),
        "text.jpg": (b"this is not an image, it is a sentence\n" * 20, "decode", "not an image"),
        "missing.jpg": (None, "fetch", "missing object"),
        "bomb.png": (png_bomb(), "decode", "decompression bomb"),
        "huge.png": (_save(noise, "PNG"), "fetch", "oversized file"),
    }
