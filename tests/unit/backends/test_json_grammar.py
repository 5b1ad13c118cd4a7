"""schema_to_gbnf: the supported subset becomes rules; anything else is refused by name."""
import pytest

from backends.json_grammar import UnsupportedSchemaError, response_format_grammar, schema_to_gbnf


def test_object_properties_in_order_with_bounded_strings():
    grammar = schema_to_gbnf({"type": "object", "properties": {"b": {"type": "string", "maxLength": 3},
                                                              "a": {"type": "integer"}}})
    root = grammar.splitlines()[0]
    assert root.index('"\\"b\\""') < root.index('"\\"a\\""') and "integer" in root
    assert 'char{0,3}' in grammar


def test_enum_const_and_type_lists():
    assert '"\\"x\\""' in schema_to_gbnf({"enum": ["x", 1]})
    assert schema_to_gbnf({"const": True}).startswith('root ::= "true"')
    assert schema_to_gbnf({"type": ["integer", "null"]}).splitlines()[0] == "root ::= (integer | null)"


@pytest.mark.parametrize("schema, word", [({"$ref": "#/x"}, "$ref"), ({"type": "string", "pattern": "a"}, "pattern"),
                                          ({"type": "string", "format": "date"}, "format"), ({"type": "tuple"}, "tuple")])
def test_unsupported_constructs_are_named(schema, word):
    with pytest.raises(UnsupportedSchemaError, match=word.replace("$", r"\$")):
        schema_to_gbnf(schema)


def test_response_formats():
    assert response_format_grammar({"type": "text"}) is None
    assert response_format_grammar({"type": "json_object"}).startswith("root ::= object")
