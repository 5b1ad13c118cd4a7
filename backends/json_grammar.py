"""schema_to_gbnf(): a JSON schema (the common subset) as a llama.cpp GBNF grammar.

llama-server ignores `response_format` under its Kimi K2 chat handler but enforces a top-level `grammar`
(reference/llamacpp.md §9), so the llama.cpp driver sends this instead. Supported: object (properties;
every declared property is emitted, in order), array (items, minItems, maxItems), string (minLength,
maxLength), integer, number, boolean, null, enum, const, anyOf/oneOf and type lists. Anything else
($ref, patterns, formats), anything malformed and anything past the bounds below raises UnsupportedSchemaError,
which the driver turns into a clear 400: whatever a client sends, never another exception.
"""
from __future__ import annotations

import json

PRIMITIVES = r"""
ws ::= [ ]?
char ::= [^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F]{4})
string ::= "\"" char* "\""
integer ::= "-"? ([0-9] | [1-9] [0-9]{1,15})
number ::= integer ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,3})?
boolean ::= "true" | "false"
null ::= "null"
value ::= object | array | string | number | boolean | null
object ::= "{" ws ( string ws ":" ws value ws ( "," ws string ws ":" ws value ws )* )? "}"
array ::= "[" ws ( value ws ( "," ws value ws )* )? "]"
"""
SIMPLE = {"string": "string", "integer": "integer", "number": "number", "boolean": "boolean", "null": "null",
          "object": "object", "array": "array"}
UNSUPPORTED = ("$ref", "pattern", "patternProperties", "format", "allOf", "not", "if", "dependentSchemas")
# Bounds on what a client's schema may make (measured on this build, llamacpp.md §9): llama-server refuses a
# minimum repetition above 2000; every alternative of an enum or anyOf is matched at each generated token
# (4096 of them: 2.9 s for 8 tokens of the tiny model, 20000: 44 s); a type list multiplies the work below it.
MAX_DEPTH = 64
MAX_MIN_REPEAT = 2000
MAX_MAX_REPEAT = 100_000
MAX_ALTERNATIVES = 1024
MAX_GRAMMAR_BYTES = 64 * 1024


class UnsupportedSchemaError(ValueError):
    pass


def literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def json_literal(value: object) -> str:
    """A GBNF literal matching `value` as JSON; json.dumps writes ASCII only, control characters escaped."""
    try:
        return literal(json.dumps(value))
    except RecursionError as exc:
        raise UnsupportedSchemaError("a const or enum value is nested too deeply") from exc


def bound(schema: dict, keyword: str, limit: int, hint: str) -> int | None:
    if keyword not in schema:
        return None
    value = schema[keyword]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise UnsupportedSchemaError(f"'{keyword}' (at {hint!r}) must be an integer from 0 to {limit} here")
    return value


def bounds(schema: dict, low_keyword: str, high_keyword: str, hint: str) -> tuple[int, int | None]:
    low = bound(schema, low_keyword, MAX_MIN_REPEAT, hint) or 0
    high = bound(schema, high_keyword, MAX_MAX_REPEAT, hint)
    if high is not None and high < low:
        raise UnsupportedSchemaError(f"'{high_keyword}' is below '{low_keyword}' (at {hint!r})")
    return low, high


def alternatives(schema: dict, keyword: str, hint: str) -> list:
    members = schema[keyword]
    if not isinstance(members, list) or not members:
        raise UnsupportedSchemaError(f"'{keyword}' (at {hint!r}) must be a non-empty array")
    if len(members) > MAX_ALTERNATIVES:
        raise UnsupportedSchemaError(f"'{keyword}' (at {hint!r}) has more than {MAX_ALTERNATIVES} alternatives")
    return members


class GrammarBuilder:
    def __init__(self) -> None:
        self.rules: dict[str, str] = {}
        self.size = 0
        self.depth = 0

    def rule(self, schema: object, hint: str) -> str:
        """The name of a rule matching `schema` (a new rule unless a primitive fits)."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise UnsupportedSchemaError(f"the schema is nested more than {MAX_DEPTH} levels deep")
        try:
            expression = self.expression(schema, hint)
        finally:
            self.depth -= 1
        if expression in SIMPLE.values():
            return expression
        name = f"r{len(self.rules)}-{''.join(c for c in hint if c.isascii() and c.isalnum())[:20] or 'v'}"
        self.add(name, expression)
        return name

    def add(self, name: str, expression: str) -> None:
        self.size += len(name) + len(expression) + 5
        if self.size > MAX_GRAMMAR_BYTES:
            raise UnsupportedSchemaError(f"the schema's grammar would exceed {MAX_GRAMMAR_BYTES} bytes")
        self.rules[name] = expression

    def expression(self, schema: object, hint: str) -> str:
        if schema is True or schema == {}:
            return "value"
        if schema is False:
            raise UnsupportedSchemaError(f"schema false (at {hint!r}) matches nothing")
        if not isinstance(schema, dict):
            raise UnsupportedSchemaError(f"schema at {hint!r} is not an object")
        for keyword in UNSUPPORTED:
            if keyword in schema:
                raise UnsupportedSchemaError(f"'{keyword}' (at {hint!r}) is not supported in grammar form")
        if "const" in schema:
            return json_literal(schema["const"])
        if "enum" in schema:
            return "(" + " | ".join(json_literal(v) for v in alternatives(schema, "enum", hint)) + ")"
        for keyword in ("anyOf", "oneOf"):
            if keyword in schema:
                members = alternatives(schema, keyword, hint)
                return "(" + " | ".join(self.rule(s, f"{hint}{i}") for i, s in enumerate(members)) + ")"
        kind = schema.get("type")
        if isinstance(kind, list):
            if not kind or len(kind) > len(SIMPLE) or not all(isinstance(k, str) for k in kind):
                raise UnsupportedSchemaError(f"'type' (at {hint!r}) must be a name or a non-empty array of names")
            return "(" + " | ".join(self.rule({**schema, "type": k}, f"{hint}{k}") for k in kind) + ")"
        if kind == "object" and schema.get("properties"):
            return self.object(schema["properties"], hint)
        if kind == "array" and "items" in schema:
            return self.array(schema, hint)
        if kind == "string" and ("maxLength" in schema or "minLength" in schema):
            low, high = bounds(schema, "minLength", "maxLength", hint)
            return f'"\\"" char{{{low},{"" if high is None else high}}} "\\""'
        if isinstance(kind, str) and kind in SIMPLE:
            return SIMPLE[kind]
        raise UnsupportedSchemaError(f"type {kind!r} (at {hint!r}) is not supported in grammar form")

    def object(self, properties: object, hint: str) -> str:
        if not isinstance(properties, dict):
            raise UnsupportedSchemaError(f"'properties' (at {hint!r}) must be an object")
        parts = ['"{" ws']
        for index, (key, sub) in enumerate(properties.items()):
            separator = '"," ws ' if index else ""
            parts.append(f'{separator}{json_literal(key)} ws ":" ws {self.rule(sub, key)} ws')
        return " ".join(parts) + ' "}"'

    def array(self, schema: dict, hint: str) -> str:
        low, high = bounds(schema, "minItems", "maxItems", hint)
        item = self.rule(schema["items"], f"{hint}item")
        more = f'("," ws {item} ws)'
        if high is not None:
            if high == 0:
                return '"[" ws "]"'
            tail = f"{more}{{{max(low - 1, 0)},{high - 1}}}"
        else:
            tail = f"{more}{{{max(low - 1, 0)},}}"
        body = f"{item} ws {tail}"
        return f'"[" ws {body} "]"' if low > 0 else f'"[" ws ({body})? "]"'


def schema_to_gbnf(schema: object) -> str:
    """The grammar for `schema`, or UnsupportedSchemaError naming what has no grammar form (or is too big)."""
    builder = GrammarBuilder()
    builder.add("root", builder.expression(schema, "root"))
    lines = [f"{name} ::= {body}" for name, body in builder.rules.items()]
    lines.insert(0, lines.pop())  # root first
    return "\n".join(lines) + PRIMITIVES


def response_format_grammar(response_format: dict) -> str | None:
    """The grammar for a `response_format`, or None for plain text."""
    kind = response_format.get("type")
    if kind == "json_object":
        return "root ::= object" + PRIMITIVES
    if kind == "json_schema":
        json_schema = response_format.get("json_schema")
        if not isinstance(json_schema, dict):
            raise UnsupportedSchemaError("response_format.json_schema must be an object")
        schema = json_schema.get("schema")
        return schema_to_gbnf({} if schema is None else schema)
    if kind == "text":
        return None
    raise UnsupportedSchemaError("response_format.type must be 'text', 'json_object' or 'json_schema'")
