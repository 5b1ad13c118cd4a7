"""schema_to_gbnf(): a JSON schema (the common subset) as a llama.cpp GBNF grammar.

llama-server ignores `response_format` under its Kimi K2 chat handler but enforces a top-level `grammar`
(reference/llamacpp.md §9), so the llama.cpp driver sends this instead. Supported: object (properties;
every declared property is emitted, in order), array (items, minItems, maxItems), string (minLength,
maxLength), integer, number, boolean, null, enum, const, anyOf/oneOf and type lists. Anything else
($ref, patterns, formats) raises UnsupportedSchemaError, which the driver turns into a clear 400.
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


class UnsupportedSchemaError(ValueError):
    pass


def literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class GrammarBuilder:
    def __init__(self) -> None:
        self.rules: dict[str, str] = {}

    def rule(self, schema: object, hint: str) -> str:
        """The name of a rule matching `schema` (a new rule unless a primitive fits)."""
        expression = self.expression(schema, hint)
        if expression in SIMPLE.values():
            return expression
        name = f"r{len(self.rules)}-{''.join(c for c in hint if c.isalnum())[:20] or 'v'}"
        self.rules[name] = expression
        return name

    def expression(self, schema: object, hint: str) -> str:
        if schema is True or schema == {}:
            return "value"
        if not isinstance(schema, dict):
            raise UnsupportedSchemaError(f"schema at {hint!r} is not an object")
        for keyword in UNSUPPORTED:
            if keyword in schema:
                raise UnsupportedSchemaError(f"'{keyword}' (at {hint!r}) is not supported in grammar form")
        if "const" in schema:
            return literal(json.dumps(schema["const"]))
        if "enum" in schema:
            return "(" + " | ".join(literal(json.dumps(v)) for v in schema["enum"]) + ")"
        for keyword in ("anyOf", "oneOf"):
            if keyword in schema:
                return "(" + " | ".join(self.rule(s, f"{hint}{i}") for i, s in enumerate(schema[keyword])) + ")"
        kind = schema.get("type")
        if isinstance(kind, list):
            return "(" + " | ".join(self.rule({**schema, "type": k}, f"{hint}{k}") for k in kind) + ")"
        if kind == "object" and schema.get("properties"):
            return self.object(schema["properties"], hint)
        if kind == "array" and "items" in schema:
            return self.array(schema, hint)
        if kind == "string" and ("maxLength" in schema or "minLength" in schema):
            low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
            return f'"\\"" char{{{low},{"" if high is None else int(high)}}} "\\""'
        if kind in SIMPLE:
            return SIMPLE[kind]
        raise UnsupportedSchemaError(f"type {kind!r} (at {hint!r}) is not supported in grammar form")

    def object(self, properties: dict, hint: str) -> str:
        parts = ['"{" ws']
        for index, (key, sub) in enumerate(properties.items()):
            separator = '"," ws ' if index else ""
            parts.append(f'{separator}{literal(json.dumps(key))} ws ":" ws {self.rule(sub, key)} ws')
        return " ".join(parts) + ' "}"'

    def array(self, schema: dict, hint: str) -> str:
        item = self.rule(schema["items"], f"{hint}item")
        low, high = int(schema.get("minItems", 0)), schema.get("maxItems")
        more = f'("," ws {item} ws)'
        if high is not None:
            if int(high) == 0:
                return '"[" ws "]"'
            tail = f"{more}{{{max(low - 1, 0)},{int(high) - 1}}}"
        else:
            tail = f"{more}{{{max(low - 1, 0)},}}"
        body = f"{item} ws {tail}"
        return f'"[" ws {body} "]"' if low > 0 else f'"[" ws ({body})? "]"'


def schema_to_gbnf(schema: object) -> str:
    builder = GrammarBuilder()
    root = builder.expression(schema, "root")
    lines = [f"root ::= {root}"] + [f"{name} ::= {body}" for name, body in builder.rules.items()]
    return "\n".join(lines) + PRIMITIVES


def response_format_grammar(response_format: dict) -> str | None:
    """The grammar for a `response_format`, or None for plain text."""
    kind = response_format.get("type")
    if kind == "json_object":
        return "root ::= object" + PRIMITIVES
    if kind == "json_schema":
        return schema_to_gbnf((response_format.get("json_schema") or {}).get("schema") or {})
    return None
