"""XMP sidecars of tagged images: what `tagray export` writes beside a photo library, merged
into the sidecar a photo manager may already keep there (Lightroom, darktable, digiKam write
their edits, ratings and keywords into it).

What tagray writes (Adobe XMP Specification Part 1, ISO 16684-1; parsed and serialised by
Adobe's XMP Toolkit through Exempi, `python-xmp-toolkit`, never by string templates):

- `dc:subject` (bag, Dublin Core): the user's tags as typed, then the predicted tags above
  the threshold that no user tag already normalises to (the user's spelling stands for it);
- `lr:hierarchicalSubject` (bag, Lightroom; digiKam and Immich read it too): `tagray|user|<tag>`
  and `tagray|predicted|<tag>` (every predicted tag), so the two stay apart as branches of a
  `tagray` keyword tree; a `|` inside a tag becomes `/` there;
- the tagray namespace `http://tagray.dev/ns/1.0/` (prefix `tagray`): `modelName` (its directory's name; not `model`, which exiftool would show as the camera's `Model`),
  `head`, `vocabularyVersion`, `weightsDigest`, `calibrated`, `threshold`; `predictedTags`
  and `predictedP` (parallel seqs, best first: P(z=1|x) of each predicted tag); `userTags` and
  `userModelTags` (parallel seqs: each user tag as typed and the model tag it normalises to,
  "" for none); `addedSubjects` (bag: the dc:subject items this export added).

Parallel seqs rather than a seq of structs: exiftool lists every item of a seq in an unknown
namespace, but flattens a struct seq there to its first item only (without `-struct`).

Merging (`merge_sidecar`): everything outside tagray's own entries is kept, those entries are
replaced: the dc:subject items a previous export added (its `addedSubjects`), every
`tagray|…` hierarchical subject and the whole tagray namespace are removed before the new
ones are written. A keyword the user had before tagray added it is never in `addedSubjects`,
so re-exports leave it alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from tagray.config import ConfigError
from tagray.data.schema import SchemaError

NS_DC = "http://purl.org/dc/elements/1.1/"
NS_LR = "http://ns.adobe.com/lightroom/1.0/"
NS_TAGRAY = "http://tagray.dev/ns/1.0/"
PREFIX = "tagray"
TREE = "tagray"  # root of tagray's branch of lr:hierarchicalSubject
USER, PREDICTED = "user", "predicted"


class SidecarError(SchemaError):
    """An existing sidecar that is not XMP tagray can read or merge into; names the file."""


@dataclass(frozen=True)
class ModelStamp:
    """Which model predicted the tags, and how they were selected."""

    name: str  # the model directory's name (no server paths in files people share)
    head: str  # lr | rlr | refine
    vocabulary_version: str
    weights_digest: str
    calibrated: bool  # P(z) of calibrated tags only (seed 001 §4.4) when True
    threshold: float  # predicted tags have P(z=1|x) > threshold


@dataclass
class ImageTags:
    """One image's tags: the user's (as typed, upload order) and the predicted ones."""

    user: list[str]
    user_model: list[str | None]  # the model tag each user tag normalises to, or None
    predicted: list[tuple[str, float]]  # (tag, P(z=1|x)), best first

    def subjects(self) -> list[str]:
        """dc:subject items: user tags, then the predicted tags no user tag stands for."""
        covered = set(self.user) | {t for t in self.user_model if t}
        return _unique([*self.user, *(t for t, _ in self.predicted if t not in covered)])

    def hierarchical(self) -> list[str]:
        return _unique([f"{TREE}|{USER}|{_level(t)}" for t in self.user]
                       + [f"{TREE}|{PREDICTED}|{_level(t)}" for t, _ in self.predicted])


@dataclass
class Sidecar:
    """What a sidecar holds, read back (`read_sidecar`)."""

    subjects: list[str]  # every dc:subject item
    hierarchical: list[str]  # every lr:hierarchicalSubject item
    added: list[str]  # the dc:subject items tagray added
    fields: dict[str, str] = field(default_factory=dict)  # tagray's simple properties
    predicted: list[tuple[str, float]] = field(default_factory=list)
    user: list[str] = field(default_factory=list)
    user_model: list[str | None] = field(default_factory=list)

    def user_keywords(self) -> list[str]:
        """The keywords that are no tagray prediction: dc:subject items but those tagray added as
        predicted tags (a user tag it added stays), then the lr:hierarchicalSubject paths outside
        tagray's branch. What an importer should read back, so that predictions do not return
        as user tags (a prediction the user kept in a photo manager cannot be told apart)."""
        predicted = set(self.added) - set(self.user)
        return [s for s in self.subjects if s not in predicted] + \
            [h for h in self.hierarchical if not h.startswith(f"{TREE}|")]


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _level(tag: str) -> str:
    return tag.replace("|", "/")


def _p(x: float) -> str:
    return format(float(x), ".6g")


def xmp_toolkit():
    """libxmp, or a ConfigError that says what to install."""
    try:
        import libxmp
    except Exception as e:  # ImportError, or libxmp's ExempiLoadError without the C library
        raise ConfigError(
            "tagray reads and writes XMP with python-xmp-toolkit, which needs the Exempi library: "
            f"pip install python-xmp-toolkit; apt-get install libexempi8 (or brew install exempi) ({e})"
        ) from e
    return libxmp


@lru_cache(maxsize=1)
def _toolkit():
    """libxmp with the lr and tagray prefixes registered (process-wide, once)."""
    libxmp = xmp_toolkit()
    libxmp.XMPMeta.register_namespace(NS_LR, "lr")
    libxmp.XMPMeta.register_namespace(NS_TAGRAY, PREFIX)
    return libxmp


def _parse(packet: str | bytes | None, source: str):
    libxmp = _toolkit()
    meta = libxmp.XMPMeta()
    if packet is None:
        return meta
    text = packet.decode("utf-8", errors="replace") if isinstance(packet, bytes) else packet
    if not text.strip("\x00 \t\r\n\ufeff"):
        return meta
    try:
        meta.parse_from_str(text.strip("\x00"))
    except libxmp.XMPError as e:
        raise SidecarError(f"{source}: not a valid XMP packet ({e})") from e
    return meta


def _items(meta, ns: str, prop: str) -> list[str]:
    if not meta.does_property_exist(ns, prop):
        return []
    return [meta.get_array_item(ns, prop, i) for i in range(1, meta.count_array_items(ns, prop) + 1)]


def _remove_items(meta, ns: str, prop: str, drop) -> None:
    """Deletes the array items for which `drop(value)` holds (last first: indices shift)."""
    if not meta.does_property_exist(ns, prop):
        return
    for i in range(meta.count_array_items(ns, prop), 0, -1):
        if drop(meta.get_array_item(ns, prop, i)):
            meta.delete_property(ns, f"{prop}[{i}]")
    if meta.count_array_items(ns, prop) == 0:
        meta.delete_property(ns, prop)


def _own_properties(meta) -> list[str]:
    """Top-level property names of the tagray namespace present in `meta`."""
    libxmp = _toolkit()
    names = []
    for _, path, _, options in libxmp.XMPIterator(meta, NS_TAGRAY, iter_justchildren=True):
        if path and not options.get("IS_SCHEMA"):
            names.append(path.split(":", 1)[-1])
    return names


def merge_sidecar(existing: str | bytes | None, tags: ImageTags, stamp: ModelStamp, source: str) -> str:
    """The sidecar `existing` (None: none yet) with tagray's entries replaced by `tags`, as an
    XMP document without packet wrapper (the form Lightroom and exiftool give .xmp files)."""
    libxmp = _toolkit()
    meta = _parse(existing, source)
    try:
        previous = set(_items(meta, NS_TAGRAY, "addedSubjects"))
        _remove_items(meta, NS_DC, "subject", lambda s: s in previous)
        _remove_items(meta, NS_LR, "hierarchicalSubject", lambda s: s.startswith(f"{TREE}|"))
        for name in _own_properties(meta):
            meta.delete_property(NS_TAGRAY, name)
        present = set(_items(meta, NS_DC, "subject"))
        added = [s for s in tags.subjects() if s not in present]
        bag, seq = {"prop_array_is_unordered": True}, {"prop_array_is_ordered": True}
        for s in added:
            meta.append_array_item(NS_DC, "subject", s, bag)
        have = set(_items(meta, NS_LR, "hierarchicalSubject"))
        for h in tags.hierarchical():
            if h not in have:
                meta.append_array_item(NS_LR, "hierarchicalSubject", h, bag)
        for key, value in (("modelName", stamp.name), ("head", stamp.head), ("vocabularyVersion", stamp.vocabulary_version),
                           ("weightsDigest", stamp.weights_digest), ("threshold", _p(stamp.threshold))):
            meta.set_property(NS_TAGRAY, key, value)
        meta.set_property_bool(NS_TAGRAY, "calibrated", bool(stamp.calibrated))
        for tag, p in tags.predicted:
            meta.append_array_item(NS_TAGRAY, "predictedTags", tag, seq)
            meta.append_array_item(NS_TAGRAY, "predictedP", _p(p), seq)
        for raw, model_tag in zip(tags.user, tags.user_model, strict=True):
            meta.append_array_item(NS_TAGRAY, "userTags", raw, seq)
            meta.append_array_item(NS_TAGRAY, "userModelTags", model_tag or "", seq)
        for s in added:
            meta.append_array_item(NS_TAGRAY, "addedSubjects", s, bag)
        return meta.serialize_to_str(omit_packet_wrapper=True)
    except libxmp.XMPError as e:  # e.g. a dc:subject that is not an array
        raise SidecarError(f"{source}: cannot merge tagray's tags into this sidecar ({e})") from e


def read_sidecar(packet: str | bytes, source: str) -> Sidecar:
    """A sidecar's keywords and tagray's entries."""
    meta = _parse(packet, source)
    fields = {name: meta.get_property(NS_TAGRAY, name) for name in _own_properties(meta)
              if name not in ("predictedTags", "predictedP", "userTags", "userModelTags", "addedSubjects")}
    tags, ps = _items(meta, NS_TAGRAY, "predictedTags"), _items(meta, NS_TAGRAY, "predictedP")
    user, user_model = _items(meta, NS_TAGRAY, "userTags"), _items(meta, NS_TAGRAY, "userModelTags")
    if len(tags) != len(ps) or len(user) != len(user_model):
        raise SidecarError(f"{source}: tagray's parallel seqs differ in length (predictedTags {len(tags)}, "
                           f"predictedP {len(ps)}, userTags {len(user)}, userModelTags {len(user_model)})")
    return Sidecar(
        subjects=_items(meta, NS_DC, "subject"),
        hierarchical=_items(meta, NS_LR, "hierarchicalSubject"),
        added=_items(meta, NS_TAGRAY, "addedSubjects"),
        fields=fields,
        predicted=[(t, float(p)) for t, p in zip(tags, ps, strict=True)],
        user=user,
        user_model=[m or None for m in user_model],
    )
