"""A photo library (a folder, local or on an object store) → manifest, with the keywords
photo managers write (Lightroom, darktable, digiKam, exiftool, Photo Mechanic):

- XMP `dc:subject` (Dublin Core, ISO 15836; XMP Part 1, ISO 16684-1) and
  `lr:hierarchicalSubject` (Adobe Lightroom, `Places|USA|New York`, flattened to its last
  level), embedded in the file or in a sidecar `<name>.xmp` / `<name>.<ext>.xmp`;
- IPTC IIM keywords (dataset 2:25).

The XMP packet is found by Pillow (JPEG APP1, PNG iTXt, TIFF tag 700, WebP) and parsed by
Adobe's XMP Toolkit through Exempi (`python-xmp-toolkit`); IPTC by Pillow's
`IptcImagePlugin`. Keywords keep their order (dc:subject, then hierarchical subjects, then
IPTC), duplicates dropped. image_id = the path under DIR; user_id = `user` or the top-level
folder under DIR. Local files: only their headers are read (Pillow on a seekable file);
objects on a store are fetched whole, one request each.
"""

from __future__ import annotations

import contextlib
import io
import posixpath

from PIL import UnidentifiedImageError

from tagray.data import storage
from tagray.data.importers.common import (
    ImportFormatError,
    ImportSummary,
    ManifestWriter,
    list_files,
)
from tagray.data.xmp import SidecarError, read_sidecar, xmp_toolkit

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp")


def xmp_keywords(packet: str | bytes, source: str) -> list[str]:
    """dc:subject items, then the last level of each lr:hierarchicalSubject, of one XMP packet;
    without the tags `tagray export` predicted (tagray/data/xmp.py), so that its predictions
    do not come back as user tags."""
    try:
        words = read_sidecar(packet, source).user_keywords()
    except SidecarError as e:
        raise ImportFormatError(str(e)) from e
    return [w.rsplit("|", 1)[-1] for w in words]


def _iptc_text(value: bytes, utf8: bool) -> str:
    if utf8:
        return value.decode("utf-8", errors="replace")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")


def read_metadata(f) -> tuple[bytes | None, dict]:
    """(XMP packet, IPTC datasets) embedded in the image file `f`, found by Pillow; OSError
    (or SyntaxError, ValueError from some of its plugins) when Pillow cannot read the file."""
    from PIL import Image, IptcImagePlugin

    with Image.open(f) as im:
        return im.info.get("xmp") or None, IptcImagePlugin.getiptcinfo(im) or {}


def embedded_keywords(packet: bytes | None, iptc: dict, source: str) -> list[str]:
    """The XMP packet's keywords, then the IPTC keywords (2:25)."""
    out = xmp_keywords(packet, source) if packet else []
    utf8 = iptc.get((1, 90)) == b"\x1b%G"  # CodedCharacterSet: ESC % G is UTF-8
    words = iptc.get((2, 25)) or []
    for w in [words] if isinstance(words, bytes) else words:
        out.append(_iptc_text(w, utf8))
    return out


def _dedupe(words: list[str]) -> list[str]:
    out, seen = [], set()
    for w in (w.strip() for w in words):
        if w and w not in seen:
            seen.add(w)
            out.append(w)
    return out


def import_folder(
    root: str,
    out: str,
    user: str | None = None,
    endpoint_url: str | None = None,
) -> ImportSummary:
    """Writes the manifest of every image under `root` (recursively) to `out`."""
    xmp_toolkit()
    root = root.rstrip("/")
    if not storage.is_remote(root):
        root = str(storage.filesystem_for(root)[1])
    summary = ImportSummary("folder", [root])
    files = list_files(root, endpoint_url)
    sidecars = {f[: -len(".xmp")].lower(): f for f in files if f.lower().endswith(".xmp")}
    used_sidecars: set[str] = set()
    fallback_user = user or posixpath.basename(root) or "unknown"
    if user is None:
        summary.note(f"user_id = the top-level folder under {root} (images directly in it: {fallback_user!r})")
    fs, base = storage.filesystem_for(root, endpoint_url)
    remote = storage.is_remote(root)
    writer = ManifestWriter(out, (), endpoint_url)
    counts = {"embedded_keywords": 0, "sidecar_keywords": 0, "no_keywords": 0}
    try:
        for rel in files:
            name = posixpath.basename(rel)
            ext = posixpath.splitext(name)[1].lower()
            if ext == ".xmp":
                continue
            if name.startswith("."):
                summary.skip("hidden file", rel)
                continue
            if ext not in IMAGE_EXTENSIONS:
                summary.skip(f"not an image file ({ext or 'no extension'})", rel)
                continue
            uri = storage.join(root, *rel.split("/"))
            # Fetch errors propagate; only what Pillow cannot read is skipped. Remote: one GET
            # per object, not one ranged request per small read of Pillow's.
            with contextlib.closing(io.BytesIO(storage.read_bytes(uri, endpoint_url)) if remote
                                    else fs.open_input_file(posixpath.join(base, rel))) as f:
                try:
                    packet, iptc = read_metadata(f)
                except UnidentifiedImageError:
                    summary.skip("unreadable image", f"{rel}: not an image Pillow can identify")
                    continue
                except (OSError, SyntaxError, ValueError) as e:
                    summary.skip("unreadable image", f"{rel}: {e}")
                    continue
            keywords = embedded_keywords(packet, iptc, uri)
            if keywords:
                counts["embedded_keywords"] += 1
            lowered = rel.lower()
            side = sidecars.get(lowered) or sidecars.get(posixpath.splitext(lowered)[0])
            if side is not None:
                used_sidecars.add(side)
                side_uri = storage.join(root, *side.split("/"))
                side_words = xmp_keywords(storage.read_bytes(side_uri, endpoint_url), side_uri)
                keywords = side_words + keywords  # the sidecar is what the photo manager edits
                counts["sidecar_keywords"] += bool(side_words)
            keywords = _dedupe(keywords)
            counts["no_keywords"] += not keywords
            owner = user or (rel.split("/", 1)[0] if "/" in rel else fallback_user)
            writer.add(where=uri, image_id=rel, user_id=owner, uri=uri, tags=keywords)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    for side in sorted(set(sidecars.values()) - used_sidecars):
        summary.skip("sidecar without an image", side)
    summary.rows = writer.rows
    summary.counts = {"images": writer.rows, **counts}
    return summary
