"""profile.json's schema (schema.json beside this file) and the check of a record against it."""

from __future__ import annotations

import json
from pathlib import Path

SCHEMA_PATH = Path(__file__).resolve().parent / "schema.json"
SCHEMA_ID = "moe-offload-profile/3"  # 2: copy_s, copy_hidden_s and the decode_copy totals; 3: routing, cache
# policy, prefetch_wasted / prefetch_skipped

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def schema_errors(value, schema: dict, where: str = "$") -> list[str]:
    """Check `value` against the JSON Schema subset schema.json uses (type, required, properties,
    additionalProperties, items, enum, minimum, maximum); a list of what is wrong, empty when it fits."""
    types = schema.get("type")
    if types is not None:
        ok = False
        for name in [types] if isinstance(types, str) else types:
            if name == "integer":
                ok |= isinstance(value, int) and not isinstance(value, bool)
            elif name == "number":
                ok |= isinstance(value, (int, float)) and not isinstance(value, bool)
            else:
                ok |= isinstance(value, _TYPES[name])
        if not ok:
            return [f"{where}: expected {types}, got {type(value).__name__}"]
    errors = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{where}: {value} < minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{where}: {value} > maximum {schema['maximum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        errors += [f"{where}: missing {k!r}" for k in schema.get("required", []) if k not in value]
        for k, v in value.items():
            if k in props:
                errors += schema_errors(v, props[k], f"{where}.{k}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += schema_errors(v, schema["additionalProperties"], f"{where}.{k}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{where}: unexpected {k!r}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            errors += schema_errors(v, schema["items"], f"{where}[{i}]")
    return errors


def load_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())
