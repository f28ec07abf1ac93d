"""Compact JSON Schemas: what a model reads in tools/list costs context on every turn.

Pydantic's schemas carry an auto-generated `title` on every property, spell `X | None` as
`anyOf: [X, {type: null}]` and put nested models behind `$ref`. Tool *inputs* drop titles and
the null branch: an optional argument is simply not required (the server still accepts an
explicit null), which is also the most portable form across hosts. Tool *outputs* inline
their nested models; a required field that can be null gets a type list, and an optional field
is simply absent from a result when it has no value. tests/test_tool_list.py measures the result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _without_null(branches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [b for b in branches if b.get("type") != "null"]


def optional_input(schema: dict[str, Any]) -> None:
    """`json_schema_extra` for an input property: `X | None` shown as plain X, not required."""
    branches = schema.get("anyOf")
    if branches and len(_without_null(branches)) == 1 and len(branches) == 2:
        (kept,) = _without_null(branches)
        del schema["anyOf"]
        schema.update({k: v for k, v in kept.items() if k not in schema})
        if schema.get("default", 0) is None:
            del schema["default"]


def strip_titles(schema: dict[str, Any]) -> dict[str, Any]:
    """Remove every auto-generated `title` keyword (not properties that happen to be named so)."""
    if isinstance(schema.get("title"), str):
        del schema["title"]
    for key in ("properties", "$defs"):
        for sub in (schema.get(key) or {}).values():
            if isinstance(sub, dict):
                strip_titles(sub)
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key) or []:
            if isinstance(sub, dict):
                strip_titles(sub)
    if isinstance(schema.get("items"), dict):
        strip_titles(schema["items"])
    return schema


def _output_node(
    node: dict[str, Any], defs: dict[str, Any], *, nullable: bool = True, top: bool = False
) -> dict[str, Any]:
    if "$ref" in node:
        node = dict(defs[node["$ref"].rsplit("/", 1)[-1]])
    node = {k: v for k, v in node.items() if k not in ("title", "default", "description")}
    if node.get("additionalProperties") is True:
        del node["additionalProperties"]
    branches = node.get("anyOf")
    if branches and len(branches) == 2 and len(_without_null(branches)) == 1:
        kept = _output_node(_without_null(branches)[0], defs)
        del node["anyOf"]
        node.update(kept)
        kind = kept.get("type")
        if nullable:
            node["type"] = [kind, "null"] if isinstance(kind, str) else kind
            if "enum" in node:
                node["enum"] = [*node["enum"], None]
    if "properties" in node:
        # At the top level an optional field is left out of a result when it has no value
        # (`TaskResult.wire`), so only required fields there can be null. Nested fields keep nulls.
        required = set(node.get("required", ()))
        node["properties"] = {
            k: _nested(_output_node(v, defs, nullable=not top or k in required)) for k, v in node["properties"].items()
        }
    if isinstance(node.get("items"), dict):
        node["items"] = _output_node(node["items"], defs)
    if "enum" in node:
        node.pop("type", None)  # the enum already says everything
    return node


def _nested(node: dict[str, Any]) -> dict[str, Any]:
    # Nested objects (an image, an error) keep their property types but not a `required` list:
    # every field of theirs is always present, so the list would only repeat the property names.
    node.pop("required", None)
    if isinstance(node.get("items"), dict):
        node["items"].pop("required", None)
    return node


def listed_only(*names: str) -> Callable[[dict[str, Any]], None]:
    """`json_schema_extra` for a nested output model: describe only these properties."""

    def keep(schema: dict[str, Any]) -> None:
        schema["properties"] = {k: v for k, v in schema.get("properties", {}).items() if k in names}
        schema.pop("required", None)

    return keep


def compact_output(schema: dict[str, Any], *, unlisted: frozenset[str] = frozenset()) -> dict[str, Any]:
    """An output schema made flat (nested models inlined), titleless, nullable fields as type lists.

    `unlisted` optional fields are left out of `properties`: results still carry them (the schema
    does not forbid additional properties) and the text block shows them, but tools/list, which
    every request of every agent pays for, does not describe them once per tool."""
    defs = schema.get("$defs", {})
    top = {k: v for k, v in schema.items() if k != "$defs"}
    top["properties"] = {k: v for k, v in top.get("properties", {}).items() if k not in unlisted}
    top["required"] = [k for k in top.get("required", []) if k not in unlisted]
    return _output_node(top, defs, top=True)


#: Input properties whose default is a setting (property name -> `Settings` field): their
#: descriptions state the value this server was configured with, not a number written in code.
CONFIGURED_DEFAULTS = {"wait_seconds": "wait_seconds"}


def show_configured_defaults(schema: dict[str, Any], settings: Any) -> dict[str, Any]:
    """Append "Default <configured value>." to each such property's description in `schema`."""
    for name, field in CONFIGURED_DEFAULTS.items():
        prop = (schema.get("properties") or {}).get(name)
        if isinstance(prop, dict):
            value = getattr(settings, field)
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            prop["description"] = f"{prop.get('description', '').rstrip()} Default {shown}.".lstrip()
    return schema
