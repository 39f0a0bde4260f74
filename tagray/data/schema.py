"""The data contract between stages (SPEC §1): manifest and features Parquet files.

Every stage reads through `read_manifest` / `read_features` and so through
`validate`, which names the file, the column and what was expected.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from tagray import jsonio
from tagray.data import storage

MANIFEST_REQUIRED = {
    "image_id": pa.string(),
    "user_id": pa.string(),
    "uri": pa.string(),
    "tags": pa.list_(pa.string()),  # raw user tags, in upload order
}
MANIFEST_OPTIONAL = {
    "labels": pa.list_(pa.string()),  # ground-truth annotations (calibration, evaluation)
    "groups": pa.list_(pa.string()),  # social metadata, seed 003
    "sets": pa.list_(pa.string()),
    "split": pa.string(),  # train / val / test, assigned by user (tagray split)
}
MANIFEST_SCHEMA = pa.schema(
    [pa.field(n, t) for n, t in MANIFEST_REQUIRED.items()]
    + [pa.field(n, t) for n, t in MANIFEST_OPTIONAL.items()]
)
SPLITS = ("train", "val", "test")
BACKBONE_METADATA_KEY = b"tagray.backbone"
IMPORT_HINT = "features computed elsewhere must be imported with `tagray features import SRC --out FEATURES --name NAME`"


class SchemaError(ValueError):
    """A Parquet file that does not follow the tagray data contract."""


def describe(t: pa.DataType) -> str:
    """A type as people write it: `list<string>`, `fixed_size_list<float32>[512]`."""
    if pa.types.is_fixed_size_list(t):
        return f"fixed_size_list<{describe(t.value_type)}>[{t.list_size}]"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{describe(t.value_type)}>"
    return str(t)


def _same_kind(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Type equality that accepts large_/view string and list variants."""
    strings = (pa.string(), pa.large_string(), pa.string_view())
    if expected == pa.string():
        return actual in strings
    if pa.types.is_list(expected):
        return (
            pa.types.is_list(actual) or pa.types.is_large_list(actual)
        ) and _same_kind(actual.value_type, expected.value_type)
    return actual == expected


def validate(
    schema: pa.Schema,
    source: str,
    required: dict[str, pa.DataType],
    optional: dict[str, pa.DataType] | None = None,
    need: Iterable[str] = (),
) -> None:
    """Checks `schema` against required and optional columns; `need` lists optional columns
    this stage cannot do without. Raises SchemaError naming `source`, the column and the type."""
    optional = optional or {}
    for name in list(required) + [n for n in need if n not in required]:
        if name not in schema.names:
            expected = required.get(name) or optional[name]
            raise SchemaError(
                f"{source}: missing column '{name}' (expected {describe(expected)}); "
                f"columns present: {', '.join(schema.names)}"
            )
    for name, expected in {**required, **optional}.items():
        if name in schema.names:
            actual = schema.field(name).type
            if not _same_kind(actual, expected):
                raise SchemaError(
                    f"{source}: column '{name}' has type {describe(actual)}; expected {describe(expected)}"
                )


def validate_manifest(table: pa.Table | pa.Schema, source: str, need: Iterable[str] = ()) -> None:
    """Manifest contract (SPEC §1); `need` e.g. ("labels",) for stages that require labels."""
    schema = table if isinstance(table, pa.Schema) else table.schema
    validate(schema, source, MANIFEST_REQUIRED, MANIFEST_OPTIONAL, need)
    if isinstance(table, pa.Table):
        if table.num_rows == 0:
            raise SchemaError(f"{source}: the manifest has no rows")
        ids = table.column("image_id")
        if ids.null_count:
            raise SchemaError(f"{source}: column 'image_id' has {ids.null_count} null value(s)")
        if len(ids.unique()) != table.num_rows:
            raise SchemaError(f"{source}: column 'image_id' has duplicate values")
        if "split" in table.column_names:
            bad = set(table.column("split").unique().to_pylist()) - set(SPLITS) - {None}
            if bad:
                raise SchemaError(
                    f"{source}: column 'split' has value(s) {sorted(bad)}; expected one of {SPLITS}"
                )


def features_schema(dim: int) -> pa.Schema:
    """Features contract: `image_id`, `feature: fixed_size_list<float32>[dim]`."""
    return pa.schema([("image_id", pa.string()), ("feature", pa.list_(pa.float32(), dim))])


def validate_features(schema: pa.Schema, source: str) -> int:
    """Checks a features schema and returns its dimension D. A file in another layout is
    most likely features computed elsewhere: the message says how to import them."""
    try:
        validate(schema, source, {"image_id": pa.string()})
    except SchemaError as e:
        raise SchemaError(f"{e}; {IMPORT_HINT}") from None
    if "feature" not in schema.names:
        raise SchemaError(
            f"{source}: missing column 'feature' (expected fixed_size_list<float32>[D]); "
            f"columns present: {', '.join(schema.names)}; {IMPORT_HINT}"
        )
    ftype = schema.field("feature").type
    if not (pa.types.is_fixed_size_list(ftype) and ftype.value_type == pa.float32()):
        raise SchemaError(
            f"{source}: column 'feature' has type {describe(ftype)}; expected fixed_size_list<float32>[D]; {IMPORT_HINT}"
        )
    return ftype.list_size


def read_table(uri: str, columns: list[str] | None = None, endpoint_url: str | None = None) -> pa.Table:
    """A Parquet file or directory of shards at `uri`, local or on object storage."""
    fs, path = storage.filesystem_for(uri, endpoint_url)
    try:
        return pq.read_table(path, filesystem=fs, columns=columns)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{uri}: no such Parquet file or directory") from e
    except pa.ArrowInvalid as e:
        raise SchemaError(f"{uri}: cannot be read as Parquet: {e}") from e


def read_manifest(
    uri: str,
    need: Iterable[str] = (),
    split: str | None = None,
    endpoint_url: str | None = None,
) -> pa.Table:
    """The validated manifest at `uri`, optionally only rows of one `split`."""
    table = read_table(uri, endpoint_url=endpoint_url)
    need = tuple(need) + (("split",) if split else ())
    validate_manifest(table, uri, need)
    if split:
        table = table.filter(pa.compute.equal(table.column("split"), split))
        if table.num_rows == 0:
            raise SchemaError(f"{uri}: split '{split}' is empty")
    return table


def write_table(table: pa.Table, uri: str, endpoint_url: str | None = None, **kwargs) -> None:
    """Writes one Parquet file at `uri`, creating local parent directories."""
    fs, path = storage.filesystem_for(uri, endpoint_url)
    if isinstance(fs, pa.fs.LocalFileSystem):
        import os

        os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(table, path, filesystem=fs, **kwargs)


def write_manifest(table: pa.Table, uri: str, endpoint_url: str | None = None) -> None:
    """Validates, then writes a manifest (columns in contract order)."""
    validate_manifest(table, uri)
    order = [n for n in MANIFEST_SCHEMA.names if n in table.column_names]
    write_table(table.select(order), uri, endpoint_url)


def backbone_identity(schema: pa.Schema) -> dict | None:
    """The backbone identity stored in a features file's metadata, if any: a torchvision
    backbone's (no "kind"), or {"kind": "external", "name", "dim", "source", "source_digest", …}
    written by `tagray features import`."""
    meta = schema.metadata or {}
    raw = meta.get(BACKBONE_METADATA_KEY)
    if not raw:
        return None
    try:
        identity = json.loads(raw)
    except ValueError as e:
        raise SchemaError(f"the '{BACKBONE_METADATA_KEY.decode()}' metadata is not JSON: {e}") from e
    if not isinstance(identity, dict):
        raise SchemaError(f"the '{BACKBONE_METADATA_KEY.decode()}' metadata is not a JSON object: {raw[:80]!r}")
    return identity


def with_backbone_identity(schema: pa.Schema, identity: dict) -> pa.Schema:
    """`schema` carrying `identity` (name, weights digest, preprocessing) in its metadata."""
    meta = dict(schema.metadata or {})
    meta[BACKBONE_METADATA_KEY] = jsonio.dumps(identity, "backbone identity", sort_keys=True).encode()
    return schema.with_metadata(meta)
