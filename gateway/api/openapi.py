"""The data plane's two paths in the gateway's OpenAPI schema: they are served by plain ASGI, not FastAPI,
so FastAPI cannot describe them itself. Kept to what the gateway checks (backends/protocol.py)."""
from __future__ import annotations

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {}}}}}

SAMPLING = {
    "model": {"type": "string"}, "stream": {"type": "boolean"}, "max_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number"}, "top_p": {"type": "number"}, "min_p": {"type": "number"},
    "top_k": {"type": "integer"}, "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
    "user": {"type": "string"}, "seed": {"type": "integer"},
    "thinking": {"type": "object", "properties": {"type": {"enum": ["enabled", "disabled"]}}},
    "chat_template_kwargs": {"type": "object", "properties": {"thinking": {"type": "boolean"}}},
}
CONTENT_PART = {"type": "object", "required": ["type"], "properties": {
    "type": {"enum": ["text", "image_url"]}, "text": {"type": "string"},
    "image_url": {"type": "object", "properties": {"url": {"type": "string"}}}}}
MESSAGE = {"type": "object", "required": ["role"], "properties": {
    "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
    "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": CONTENT_PART}, {"type": "null"}]}}}


def operation(summary: str, body: dict) -> dict:
    responses = {"200": {"description": "An OpenAI response, or an SSE stream when `stream` is true",
                         "content": {"application/json": {"schema": {"type": "object"}},
                                     "text/event-stream": {"schema": {"type": "string"}}}}}
    for status, what in (("400", "invalid request"), ("401", "no or wrong key"), ("403", "model not allowed"),
                         ("404", "unknown model"), ("413", "body too large"), ("429", "rate limited"),
                         ("502", "backend failed"), ("503", "no backend available"), ("504", "backend timed out")):
        responses[status] = {"description": what, "content": {"application/json": {"schema": ERROR}}}
    return {"post": {"summary": summary, "requestBody": {"required": True, "content": {"application/json": {
        "schema": body}}}, "responses": responses}}


def data_plane_paths() -> dict:
    chat = {"type": "object", "required": ["model", "messages"],
            "properties": {**SAMPLING, "messages": {"type": "array", "items": MESSAGE}}}
    completion = {"type": "object", "required": ["model", "prompt"],
                  "properties": {**SAMPLING, "prompt": {"oneOf": [{"type": "string"}, {"type": "array"}]}}}
    return {"/v1/chat/completions": operation("Chat completion (OpenAI wire format)", chat),
            "/v1/completions": operation("Text completion (OpenAI wire format)", completion)}
