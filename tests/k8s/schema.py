"""CRD structural schemas: defaulting, pruning and validation the way kube-apiserver does them.

The ``openAPIV3Schema`` of a CRD version is OpenAPI v3.0 flavoured JSON Schema (draft 4 semantics,
boolean ``exclusiveMinimum``) plus Kubernetes extensions. Validation converts it to plain JSON Schema
and runs ``jsonschema.Draft4Validator``; the errors are reworded into the apiserver's
``field.Error`` strings, e.g.::

    spec.fineTune.schedule: Invalid value: "x": spec.fineTune.schedule in body should match '^\\S+$'

Not supported: CEL rules (``x-kubernetes-validations``), ``format`` checks, list-type/map-type
uniqueness (``x-kubernetes-list-type``), ratcheting.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jsonschema

# Fields of every object kept at the root, whatever the schema says (the apiserver owns them).
_ROOT_FIELDS = ("apiVersion", "kind", "metadata")


@dataclass(frozen=True)
class FieldError:
    """One ``field.Error`` of the apiserver: ``<field>: <message>``."""

    field: str
    message: str  # e.g. 'Required value' or 'Invalid value: "x": ...'
    reason: str = "FieldValueInvalid"

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def field_path(parts: Iterator[str | int] | list[str | int] | tuple[str | int, ...]) -> str:
    """``['spec', 'items', 0, 'name']`` -> ``spec.items[0].name`` (the apiserver's notation)."""
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def go_value(value: Any) -> str:
    """Render a value roughly the way the apiserver's error messages do (Go's %#v / %q)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return json.dumps(value)
    if isinstance(value, dict):
        return '"object"'
    if isinstance(value, list):
        return '"array"'
    return repr(value)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


# ---------------------------------------------------------------------------------------------
# Defaulting
# ---------------------------------------------------------------------------------------------


def apply_defaults(obj: Any, schema: Mapping[str, Any]) -> Any:
    """Apply ``default`` values top-down, in place, as the apiserver does on create/update/read.

    ``null`` in a non-nullable field is dropped first (and then defaulted), as in Kubernetes.
    The root's ``apiVersion``/``kind``/``metadata`` are left alone.
    """
    root = dict(schema)
    root["properties"] = {k: v for k, v in (schema.get("properties") or {}).items() if k not in _ROOT_FIELDS}
    _default_node(obj, root)
    return obj


def _default_node(value: Any, schema: Mapping[str, Any]) -> None:
    if isinstance(value, dict):
        props: Mapping[str, Any] = schema.get("properties") or {}
        for key, sub in props.items():
            if key in value and value[key] is None and not sub.get("nullable", False):
                del value[key]
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
        for key, item in list(value.items()):
            if key in props:
                _default_node(item, props[key])
            elif isinstance(schema.get("additionalProperties"), Mapping):
                _default_node(item, schema["additionalProperties"])
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        for item in value:
            _default_node(item, schema["items"])


# ---------------------------------------------------------------------------------------------
# Pruning
# ---------------------------------------------------------------------------------------------


def prune(obj: dict[str, Any], schema: Mapping[str, Any]) -> list[str]:
    """Drop the fields the structural schema does not declare, in place. Returns the dropped paths.

    Mirrors the apiserver: ``apiVersion``/``kind``/``metadata`` at the root are never pruned,
    ``x-kubernetes-preserve-unknown-fields: true`` keeps everything below it (but known
    properties below it are still walked), ``additionalProperties`` schemas apply to map values,
    and ``x-kubernetes-embedded-resource`` keeps apiVersion/kind/metadata of embedded objects.
    """
    dropped: list[str] = []
    _prune_node(obj, schema, [], dropped, root=True)
    return dropped


def _prune_node(
    value: Any, schema: Mapping[str, Any], path: list[str | int], dropped: list[str], *, root: bool = False
) -> None:
    if isinstance(value, dict):
        props: Mapping[str, Any] = schema.get("properties") or {}
        additional = schema.get("additionalProperties")
        preserve = bool(schema.get("x-kubernetes-preserve-unknown-fields"))
        keep_meta = root or bool(schema.get("x-kubernetes-embedded-resource"))
        for key in list(value):
            if keep_meta and key in _ROOT_FIELDS:
                continue  # the apiserver owns these, whatever the schema declares for them
            if key in props:
                _prune_node(value[key], props[key], [*path, key], dropped)
            elif isinstance(additional, Mapping):
                _prune_node(value[key], additional, [*path, key], dropped)
            elif additional is True or preserve:
                continue
            else:
                dropped.append(field_path([*path, key]))
                del value[key]
    elif isinstance(value, list):
        items = schema.get("items")
        if isinstance(items, Mapping):
            for index, item in enumerate(value):
                _prune_node(item, items, [*path, index], dropped)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

_DROP_KEYS = {
    "nullable",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-embedded-resource",
    "x-kubernetes-int-or-string",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type",
    "x-kubernetes-validations",
    "format",  # the apiserver checks a few formats; we do not
    "default",
    "description",
    "example",
    "externalDocs",
}


def to_json_schema(schema: Any) -> Any:
    """Convert an ``openAPIV3Schema`` (sub)tree into JSON Schema (draft 4) for ``jsonschema``."""
    if isinstance(schema, list):
        return [to_json_schema(item) for item in schema]
    if not isinstance(schema, Mapping):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _DROP_KEYS:
            continue
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
            out[key] = to_json_schema(value)
        else:
            out[key] = value
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [*out.get("anyOf", []), {"type": "integer"}, {"type": "string"}]
    if schema.get("nullable"):
        if "type" in out:
            out["type"] = [out["type"], "null"] if isinstance(out["type"], str) else [*out["type"], "null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
    return out


def validate(obj: Mapping[str, Any], schema: Mapping[str, Any]) -> list[FieldError]:
    """Validate ``obj`` against the ``openAPIV3Schema``; return the apiserver-style field errors."""
    root = dict(to_json_schema(schema))
    # The apiserver validates metadata itself (names, labels); the CRD schema may not constrain it.
    root.get("properties", {}).pop("metadata", None)
    validator = jsonschema.Draft4Validator(root)
    errors: list[FieldError] = []
    seen: set[str] = set()
    for error in sorted(validator.iter_errors(obj), key=lambda e: (list(map(str, e.absolute_path)), e.message)):
        for ferr in _translate(error):
            if str(ferr) not in seen:
                seen.add(str(ferr))
                errors.append(ferr)
    return errors


def _translate(error: jsonschema.ValidationError) -> list[FieldError]:
    path = list(error.absolute_path)
    where = field_path(path) or "<root>"
    value = error.instance
    keyword = error.validator
    arg = error.validator_value
    match keyword:
        case "required":
            missing = [name for name in arg if isinstance(value, Mapping) and name not in value]
            return [FieldError(field_path([*path, name]), "Required value", "FieldValueRequired") for name in missing]
        case "type":
            want = arg if isinstance(arg, str) else " or ".join(arg)
            got = _json_type(value)
            return [
                FieldError(
                    where,
                    f'Invalid value: "{got}": {where} in body must be of type {want}: "{got}"',
                    "FieldValueTypeInvalid",
                )
            ]
        case "enum":
            options = ", ".join(go_value(v) for v in arg)
            return [
                FieldError(
                    where,
                    f"Unsupported value: {go_value(value)}: supported values: {options}",
                    "FieldValueNotSupported",
                )
            ]
        case "pattern":
            return [FieldError(where, f"Invalid value: {go_value(value)}: {where} in body should match '{arg}'")]
        case "minimum":
            exclusive = bool(error.schema.get("exclusiveMinimum"))
            rel = "greater than" if exclusive else "greater than or equal to"
            return [FieldError(where, f"Invalid value: {go_value(value)}: {where} in body should be {rel} {arg}")]
        case "maximum":
            exclusive = bool(error.schema.get("exclusiveMaximum"))
            rel = "less than" if exclusive else "less than or equal to"
            return [FieldError(where, f"Invalid value: {go_value(value)}: {where} in body should be {rel} {arg}")]
        case "minLength":
            return [
                FieldError(
                    where, f"Invalid value: {go_value(value)}: {where} in body should be at least {arg} chars long"
                )
            ]
        case "maxLength":
            return [FieldError(where, f"Too long: may not be more than {arg} bytes", "FieldValueTooLong")]
        case "minItems":
            return [FieldError(where, f"Invalid value: {len(value)}: {where} in body should have at least {arg} items")]
        case "maxItems":
            return [FieldError(where, f"Too many: {len(value)}: must have at most {arg} items", "FieldValueTooMany")]
        case "minProperties":
            return [
                FieldError(where, f"Invalid value: {len(value)}: {where} in body should have at least {arg} properties")
            ]
        case "maxProperties":
            return [FieldError(where, f"Too many: {len(value)}: must have at most {arg} items", "FieldValueTooMany")]
        case "multipleOf":
            return [
                FieldError(where, f"Invalid value: {go_value(value)}: {where} in body should be a multiple of {arg}")
            ]
        case "uniqueItems":
            return [FieldError(where, f"Duplicate value: {go_value(value)}", "FieldValueDuplicate")]
        case _:
            return [FieldError(where, f"Invalid value: {go_value(value)}: {error.message}")]
