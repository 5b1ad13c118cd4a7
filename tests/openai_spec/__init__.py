"""Validate gateway answers against OpenAI's own response schemas (openai-schemas.json, see README.md).

The spec mixes OpenAPI 3.1 (`anyOf: [..., {"type": "null"}]`) with the 3.0 `nullable: true` keyword, which
JSON Schema does not know: `nullable` is turned into a `"null"` type (and a `None` enum member) here.
One documented allowance: `CreateCompletionResponse` serves both whole replies and stream chunks ("both the
streamed and non-streamed response objects share the same shape"), yet its `finish_reason` has no null,
while OpenAI's own streamed chunks carry `"finish_reason": null` until the last one; `streamed=True` allows
that null, and nothing else.
"""
from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path

from jsonschema import Draft202012Validator

SPEC = Path(__file__).with_name("openai-schemas.json")


def without_nullable(node):
    """OpenAPI 3.0 `nullable: true` as JSON Schema: null added to `type` (and to `enum`)."""
    if isinstance(node, list):
        return [without_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: without_nullable(value) for key, value in node.items()}
    if node.pop("nullable", False):
        kind = node.get("type")
        if kind is not None:
            node["type"] = [*(kind if isinstance(kind, list) else [kind]), "null"]
        if "enum" in node:
            node["enum"] = [*node["enum"], None]
        if kind is None and "enum" not in node:  # e.g. a bare $ref that may be null
            node = {"anyOf": [node, {"type": "null"}]}
    return node


@lru_cache(maxsize=None)
def components() -> dict:
    return without_nullable(json.loads(SPEC.read_text())["components"])


@lru_cache(maxsize=None)
def validator(name: str, streamed: bool = False) -> Draft202012Validator:
    schemas = components()
    if streamed and name == "CreateCompletionResponse":
        schemas = copy.deepcopy(schemas)
        finish = schemas["schemas"][name]["properties"]["choices"]["items"]["properties"]["finish_reason"]
        finish["type"], finish["enum"] = ["string", "null"], [*finish["enum"], None]
    schema = {"$ref": f"#/components/schemas/{name}", "components": schemas}
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def problems(name: str, doc: object, *, streamed: bool = False) -> list[str]:
    """Every way `doc` breaks the named schema, as readable lines (empty: it conforms)."""
    found = validator(name, streamed).iter_errors(doc)
    return [f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}" for error in found]


def assert_conforms(name: str, doc: object, *, streamed: bool = False) -> None:
    errors = problems(name, doc, streamed=streamed)
    assert not errors, f"{name}: " + "; ".join(errors) + f"\n{json.dumps(doc)[:2000]}"
