"""check_agent_fields(): the shape of `tools`, `tool_choice`, `parallel_tool_calls` and `response_format`,
checked once at the edge so that every backend gets the same well-formed request (or none gets it)."""
from __future__ import annotations

from gateway.errors import InvalidRequestError

TOOL_CHOICES = ("none", "auto", "required")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")
# every field check_agent_fields() reads: a body with none of them passes it unread
AGENT_FIELDS = frozenset({"functions", "function_call", "tools", "tool_choice", "parallel_tool_calls",
                          "response_format"})


def _bad(message: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


def check_agent_fields(doc: dict) -> None:
    for legacy, modern in (("functions", "tools"), ("function_call", "tool_choice")):
        if legacy in doc:
            raise _bad(f"'{legacy}' is the deprecated form: send '{modern}' instead.", legacy)
    tools = doc.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("'tools' must be an array.", "tools")
        for index, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict) \
                    or not isinstance(function.get("name"), str) or not function["name"]:
                raise _bad(f"tools[{index}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}.",
                           f"tools[{index}]")
    choice = doc.get("tool_choice")
    if choice is not None and choice not in TOOL_CHOICES:
        function = choice.get("function") if isinstance(choice, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise _bad("'tool_choice' must be 'none', 'auto', 'required' or "
                       "{\"type\": \"function\", \"function\": {\"name\": ...}}.", "tool_choice")
    if "parallel_tool_calls" in doc and not isinstance(doc["parallel_tool_calls"], bool):
        raise _bad("'parallel_tool_calls' must be a boolean.", "parallel_tool_calls")
    response_format = doc.get("response_format")
    if response_format is not None:
        kind = response_format.get("type") if isinstance(response_format, dict) else None
        if kind not in RESPONSE_FORMATS:
            raise _bad(f"'response_format.type' must be one of {', '.join(RESPONSE_FORMATS)}.", "response_format")
        json_schema = response_format.get("json_schema") if kind == "json_schema" else {}
        if not isinstance(json_schema, dict):
            raise _bad("'response_format.json_schema' must be an object.", "response_format")
        if not isinstance(json_schema.get("schema") if kind == "json_schema" else {}, dict):
            raise _bad("'response_format.json_schema.schema' must be a JSON schema object.", "response_format")
