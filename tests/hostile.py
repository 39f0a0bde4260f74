"""Hostile inputs for the decoder and the HTTP service (issue 17's suite): images whose
header is small and whose naive decode is not (1×N, N×1, 16-bit, bombs), truncated and
mutated files, and request bodies that lie about their size."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from tests.images import _save, png_bomb


def _strip_png(width: int, height: int, mode: str = "L") -> bytes:
    """A width×height PNG of one colour: a few hundred bytes, any aspect ratio."""
    return _save(Image.new(mode, (width, height), 200 if mode != "RGB" else (200, 30, 30)), "PNG")


def deep16_png(side: int = 6000) -> bytes:
    """A side×side 16-bit grey PNG (a gradient: ~70 KB at 6000², 72 MB of pixels)."""
    ramp = np.linspace(0, 65535, side, dtype=np.uint16)
    arr = np.broadcast_to(ramp, (side, side)).copy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _base_jpeg() -> bytes:
    rng = np.random.default_rng(17)
    return _save(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")


def _mutated_jpeg() -> bytes:
    rng = np.random.default_rng(18)
    data = bytearray(_base_jpeg())
    for pos in rng.integers(200, len(data), 40):
        data[pos] = rng.integers(0, 256)
    return bytes(data)


# name → a function making the bytes (made on demand: a memory probe measures one alone)
HOSTILE_IMAGES = {
    "1x8000.png": lambda: _strip_png(1, 8000),
    "8000x1.png": lambda: _strip_png(8000, 1),
    "1x30000.png": lambda: _strip_png(1, 30000),
    "30000x2.jpg": lambda: _save(Image.new("RGB", (30000, 2), (10, 120, 200)), "JPEG"),
    "deep16_6000.png": lambda: deep16_png(6000),
    "bomb.png": png_bomb,
    "truncated.jpg": lambda: _base_jpeg()[: len(_base_jpeg()) // 2],
    "mutated.jpg": _mutated_jpeg,
}
WORST_IMAGE = "1x30000.png"  # the largest naive decode of the set (7.8 GB before the fix)


def send_chunked(url: str, path: str, content_type: str, chunk: bytes, total: int, timeout: float = 60.0,
                 headers: dict[str, str] | None = None, first: bytes = b"") -> tuple[int, bytes, int]:
    """POSTs a `Transfer-Encoding: chunked` body of `total` bytes (no Content-Length) made of
    `chunk` repeated, stopping as soon as the server answers. Returns (status, body, bytes
    sent). Raw sockets: an HTTP client library would insist on sending the whole body first."""
    import select
    import socket
    import time
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    deadline = time.monotonic() + timeout
    sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sock.sendall((f"POST {path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\nContent-Type: {content_type}\r\n"
                  f"Transfer-Encoding: chunked\r\n{extra}Connection: close\r\n\r\n").encode())
    sent = 0
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    if first:
        sock.sendall(f"{len(first):x}\r\n".encode() + first + b"\r\n")
        sent += len(first)
    try:
        while sent < total and time.monotonic() < deadline:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break  # the server answered before the body ended
            sock.sendall(framed)
            sent += len(chunk)
        else:
            sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server closed the connection after answering
    response = b""
    sock.settimeout(max(1.0, deadline - time.monotonic()))
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            response += data
            if b"\r\n\r\n" in response:
                head, _, rest = response.partition(b"\r\n\r\n")
                length = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
                if length and len(rest) >= length[0]:
                    break
    except (ConnectionResetError, TimeoutError, OSError):
        pass
    finally:
        sock.close()
    if not response:
        raise ConnectionError(f"no answer after sending {sent} bytes")
    status = int(response.split(b" ", 2)[1])
    return status, response.partition(b"\r\n\r\n")[2], sent


def multipart_prefix(boundary: str) -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
