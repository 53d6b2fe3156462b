"""Store metadata schemas: the pydantic models, version checks and the exported JSON Schema.

Regenerate the committed JSON Schema after changing a model: `python -m moekd.schemas`.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from moekd.errors import MoekdError
from moekd.schemas.cache import FORMAT, SCHEMA_VERSION, CacheMetadata

JSON_SCHEMA_PATH = Path(__file__).with_name("teacher_cache.schema.json")

__all__ = ["CacheMetadata", "SCHEMA_VERSION", "JSON_SCHEMA_PATH", "json_schema", "parse_metadata"]


def json_schema() -> dict:
    schema = CacheMetadata.model_json_schema()
    schema["$id"] = f"https://moekd.dev/schemas/teacher-cache/{SCHEMA_VERSION}.json"
    schema["title"] = f"moekd teacher cache metadata v{SCHEMA_VERSION}"
    return schema


def parse_metadata(raw: object, where: str) -> CacheMetadata:
    """Validated metadata of a store; a clear error for another format, a newer major version or bad fields."""
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise MoekdError(f"{where}: not a moekd teacher cache (root attribute 'moekd' missing or of another format)")
    version = str(raw.get("schema_version", ""))
    try:
        major, minor = (int(x) for x in version.split("."))
    except ValueError:
        raise MoekdError(f"{where}: schema_version {version!r} is not of the form MAJOR.MINOR") from None
    ours_major, ours_minor = (int(x) for x in SCHEMA_VERSION.split("."))
    if major != ours_major:
        newer = "newer" if major > ours_major else "older"
        raise MoekdError(
            f"{where}: store schema {version} is {newer} than this moekd reads ({SCHEMA_VERSION}); "
            f"{'upgrade moekd' if major > ours_major else 'rebuild the cache'} to read it"
        )
    try:
        return CacheMetadata.model_validate(raw)
    except ValidationError as e:
        if minor > ours_minor:  # a newer minor only adds optional fields: drop them and read the rest
            unknown = [err["loc"] for err in e.errors() if err["type"] == "extra_forbidden"]
            if len(unknown) == len(e.errors()):
                return CacheMetadata.model_validate(_without(raw, unknown))
        fields = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:5])
        newer = (
            f" (the store was written by a newer moekd, schema {version}: upgrade moekd to read it)"
            if minor > ours_minor
            else ""
        )
        raise MoekdError(f"{where}: metadata does not match schema {SCHEMA_VERSION}: {fields}{newer}") from None


def _without(raw: dict, locations: list[tuple]) -> dict:
    data = json.loads(json.dumps(raw))
    for loc in locations:
        node = data
        for key in loc[:-1]:
            node = node[key]
        node.pop(loc[-1], None)
    return data
