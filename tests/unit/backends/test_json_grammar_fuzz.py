"""The grammar converter against anything a client can put in `response_format`: a grammar within bounds, or
UnsupportedSchemaError (the driver's 400); never another exception (a 500) and never a runaway."""
from __future__ import annotations

import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends.json_grammar import MAX_GRAMMAR_BYTES, UnsupportedSchemaError, response_format_grammar

SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
           | st.text(max_size=12) | st.sampled_from(["object", "array", "string", "integer", "number", "boolean",
                                                     "null", "#", "#/$defs/a", "", "\u202e", "é²", "🦙"]))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=4), max_leaves=16)
KEYWORDS = ["type", "properties", "items", "enum", "const", "anyOf", "oneOf", "minLength", "maxLength", "minItems",
            "maxItems", "required", "additionalProperties", "$ref", "$defs", "definitions", "pattern", "format",
            "allOf", "not", "prefixItems", "title", "description", "default"]
TYPES = st.sampled_from(["object", "array", "string", "integer", "number", "boolean", "null", "tuple"])
BOUNDS = st.integers(-3, 12) | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.booleans() | st.text(max_size=3)


def schemas() -> st.SearchStrategy:
    """Schema-shaped values, so that the fuzz reaches every keyword with both good and bad values."""
    def extend(inner):
        members = st.lists(inner, max_size=4)
        values = {"type": TYPES | st.lists(TYPES | JSON, max_size=3) | JSON,
                  "properties": st.dictionaries(st.text(max_size=8), inner, max_size=4) | JSON,
                  "items": inner | JSON, "enum": st.lists(JSON, max_size=5) | JSON, "const": JSON,
                  "anyOf": members | JSON, "oneOf": members | JSON, "minLength": BOUNDS, "maxLength": BOUNDS,
                  "minItems": BOUNDS, "maxItems": BOUNDS, "$ref": st.sampled_from(["#", "#/$defs/a"]),
                  "$defs": st.dictionaries(st.text(max_size=4), inner, max_size=2)}
        return st.fixed_dictionaries({}, optional=values) | st.dictionaries(st.sampled_from(KEYWORDS), inner | JSON,
                                                                            max_size=4)
    return st.recursive(st.booleans() | st.just({}) | TYPES.map(lambda t: {"type": t}) | JSON, extend, max_leaves=24)


def nested(depth: int, kind: str) -> object:
    schema: object = {"type": "string"}
    for _ in range(depth):
        schema = {"object": lambda s: {"type": "object", "properties": {"a": s}},
                  "array": lambda s: {"type": "array", "items": s},
                  "anyOf": lambda s: {"anyOf": [s, {"type": "null"}]},
                  "types": lambda s: {"type": ["object", "array", "object"], "properties": {"a": s, "b": s}, "items": s},
                  "list": lambda s: [s]}[kind](schema)
    return schema


RULE_NAME = re.compile(r"^[a-zA-Z0-9-]+ ::= ", re.MULTILINE)


def convert(schema: object) -> str | None:
    """The converter's answer, checked: a bounded grammar whose every rule has a GBNF-legal name."""
    started = time.process_time()
    try:
        grammar = response_format_grammar({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    except UnsupportedSchemaError:
        grammar = None
    assert time.process_time() - started < 2.0
    if grammar is not None:
        assert len(grammar.encode()) <= MAX_GRAMMAR_BYTES
        lines = [line for line in grammar.splitlines() if line]
        assert all(RULE_NAME.match(line) for line in lines), [line[:80] for line in lines if not RULE_NAME.match(line)]
        names = [line.split(" ::= ", 1)[0] for line in lines]
        assert len(names) == len(set(names))
    return grammar


@given(JSON)
@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
def test_any_json_value_as_the_schema(schema):
    convert(schema)


@given(schemas())
@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
def test_schema_shaped_values(schema):
    convert(schema)


@given(JSON)
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
def test_any_json_value_as_json_schema_or_response_format(value):
    for response_format in ({"type": "json_schema", "json_schema": value}, value if isinstance(value, dict) else {},
                            {"type": value}):
        try:
            response_format_grammar(response_format)
        except UnsupportedSchemaError:
            pass


@pytest.mark.parametrize("kind", ["object", "array", "anyOf", "types", "list"])
@pytest.mark.parametrize("depth", [10, 70, 400, 1000])
def test_deep_nesting(kind, depth):
    grammar = convert(nested(depth, kind))
    if depth > 64 or kind in ("types", "list"):
        assert grammar is None


@pytest.mark.parametrize("schema", [
    {"enum": [f"value-{index}" for index in range(100_000)]},
    {"enum": list(range(1025))},
    {"type": "object", "properties": {f"p{index}": {"enum": list(range(1000))} for index in range(20)}},
    {"enum": ["x" * 1_000_000]},
    {"type": "object", "properties": {f"p{index}": {"type": "string"} for index in range(50_000)}},
    {"anyOf": [{"const": index} for index in range(50_000)]},
    {"type": "string", "maxLength": 10**12},
    {"type": "string", "minLength": 2**70},
    {"type": "array", "items": {"type": "integer"}, "minItems": 10**9},
    {"type": "string", "minLength": 2001},
    {"type": "array", "items": {"type": "integer"}, "maxItems": 10**9},
])
def test_huge_schemas_are_refused_not_built(schema):
    assert convert(schema) is None


@pytest.mark.parametrize("schema", [
    {"$ref": "#"}, {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"},
    {"type": "object", "properties": {"self": {"$ref": "#"}}}, False, 0, "", [], "object", {"type": []},
    {"enum": []}, {"enum": "abc"}, {"anyOf": []}, {"anyOf": {"type": "string"}}, {"type": {"a": 1}},
    {"type": [["object"]]}, {"type": "object", "properties": ["a"]}, {"type": "string", "minLength": "3"},
    {"type": "string", "minLength": 1.5}, {"type": "string", "maxLength": -1}, {"type": "string", "minLength": True},
    {"type": "string", "minLength": 5, "maxLength": 2}, {"type": "array", "items": {}, "minItems": 3, "maxItems": 1},
    {"type": "array", "items": {}, "maxItems": None}, {"type": "object", "properties": {"a": False}},
])
def test_refused_by_name(schema):
    assert convert(schema) is None


@pytest.mark.parametrize("schema", [
    None, {}, True, {"type": "object", "properties": {"é²": {"type": "string"}, "🦙 x": {"type": "integer"}}},
    {"type": ["string", "null"], "maxLength": 3}, {"enum": [{"a": [1, None]}, "\u202e\n\"", 1e-7, 2**70]},
    {"type": "array", "items": {"type": "string"}, "minItems": 0, "maxItems": 0},
    {"enum": list(range(1024))}, {"type": "string", "minLength": 2000, "maxLength": 100_000},
    {"type": "array", "items": {"type": "array", "items": {"type": "string", "maxLength": 4000}, "maxItems": 4000}},
])
def test_accepted_edge_schemas(schema):
    assert convert(schema) is not None


@pytest.mark.parametrize("response_format", [{"type": "json_schema", "json_schema": "x"},
                                             {"type": "json_schema", "json_schema": ["x"]},
                                             {"type": "json_schema"}, {"type": "xml"}, {"type": ["text"]}])
def test_malformed_response_formats_are_refused(response_format):
    with pytest.raises(UnsupportedSchemaError):
        response_format_grammar(response_format)
