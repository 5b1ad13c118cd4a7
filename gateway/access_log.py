"""The access log: one line per data-plane request, written when it ends (logger `kimi_gateway.access`).

It says what the metrics count, for one request: route, adapter version, variant, backend, status, TTFT,
duration, the gateway's own time, tokens. Never the prompt or the output, and never a header (keys), unless
the config opts in to prompts (`logging.include_prompts`).
"""
from __future__ import annotations

import logging

import orjson

from gateway.logs import BackgroundHandler

log = logging.getLogger("kimi_gateway.access")
EMPTY: dict = {}
LOGGER = orjson.dumps(log.name).decode()
# (path, route, adapter, variant, backend, status, stream, client) -> the line's text for them: bounded by config
_names: dict[tuple, tuple[str, str]] = {}


def ms(seconds: float | None) -> float | None:
    """Milliseconds to the microsecond. round(x * 1e6) / 1e3 is round(x * 1e3, 3) without its decimal
    conversion (about 2,000 instructions less a call)."""
    return None if seconds is None else round(seconds * 1e6) / 1e3


def write_access_line(recorder, path: str, client: str | None, stream: bool, doc: dict | None,
                      include_prompts: bool) -> None:
    if not log.isEnabledFor(logging.INFO):  # False when the access log is off (`disabled`) or the level is above
        return
    prompt = include_prompts and isinstance(doc, dict)
    sink = logging.root.handlers[0] if logging.root.handlers else None
    if sink.__class__ is BackgroundHandler and sink.sole_json_for(log):
        text = None if prompt else access_json(recorder, path, client, stream)
        if text is not None:   # the line as JSON text, without a dict or a LogRecord (gateway/logs.py write_json_text)
            sink.write_json_text(LOGGER, '"request"', text)
        else:
            sink.write_json(log.name, "request", access_fields(recorder, path, client, stream, doc if prompt else None))
        return
    # The record made directly: Logger.info would also look up the caller's frame (unused here, ~1 µs).
    record = log.makeRecord(log.name, logging.INFO, __file__, 0, "request", None, None)
    record.fields = access_fields(recorder, path, client, stream, doc if prompt else None)
    log.handle(record)


def access_fields(recorder, path: str, client: str | None, stream: bool, doc: dict | None) -> dict:
    """The line's fields; `doc`: the request whose prompt the config says to log, else None."""
    usage = recorder.usage or EMPTY
    ttft = recorder.ttft_s
    fields = {"path": path, "route": recorder.route or None, "adapter": recorder.version or recorder.adapter or None,
              "variant": recorder.variant, "backend": recorder.backend or None, "status": recorder.code,
              "stream": stream, "ttft_ms": None if ttft is None else round(ttft * 1e6) / 1e3,
              "duration_ms": ms(recorder.duration_s),
              "upstream_ms": round(recorder.upstream_s * 1e6) / 1e3 if recorder.backend else None,
              "overhead_ms": ms(recorder.overhead_s), "prompt_tokens": usage.get("prompt_tokens"),
              "completion_tokens": usage.get("completion_tokens"), "client": client or None}
    if doc is not None:
        fields["prompt"] = doc.get("messages", doc.get("prompt"))
    return fields


def access_json(recorder, path: str, client: str | None, stream: bool) -> str | None:
    """access_fields() as the JSON text orjson writes for them (`,"path":…` to the last field; tested against
    it): the names and status from a table (a few per route), the numbers by one orjson call. None for a token
    count that is not an int (the caller writes the fields' dict)."""
    usage = recorder.usage or EMPTY
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if (prompt is not None and prompt.__class__ is not int) or (completion is not None and completion.__class__ is not int):
        return None
    ttft, duration, overhead, backend = recorder.ttft_s, recorder.duration_s, recorder.overhead_s, recorder.backend
    key = (path, recorder.route, recorder.version or recorder.adapter, recorder.variant, backend, recorder.code,
           stream, client)
    names = _names.get(key)
    if names is None:
        names = _names_of(key)
    numbers = orjson.dumps((None if ttft is None else round(ttft * 1e6) / 1e3,
                            None if duration is None else round(duration * 1e6) / 1e3,
                            round(recorder.upstream_s * 1e6) / 1e3 if backend else None,
                            None if overhead is None else round(overhead * 1e6) / 1e3, prompt, completion))
    ttft_ms, duration_ms, upstream_ms, overhead_ms, prompt, completion = numbers.decode()[1:-1].split(",")
    return (f'{names[0]},"ttft_ms":{ttft_ms},"duration_ms":{duration_ms},"upstream_ms":{upstream_ms},'
            f'"overhead_ms":{overhead_ms},"prompt_tokens":{prompt},"completion_tokens":{completion}{names[1]}')


def _names_of(key: tuple) -> tuple[str, str]:
    """The text before the numbers (path to stream) and after them (client), for one combination of names."""
    path, route, adapter, variant, backend, code, stream, client = key
    head = orjson.dumps({"path": path, "route": route or None, "adapter": adapter or None, "variant": variant,
                         "backend": backend or None, "status": code, "stream": stream}, default=str).decode()
    tail = orjson.dumps({"client": client or None}, default=str).decode()
    if len(_names) >= 4096:   # routes and keys changed many times over: names that may be gone
        _names.clear()
    names = _names[key] = ("," + head[1:-1], "," + tail[1:-1])
    return names
