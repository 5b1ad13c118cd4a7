"""The statements both experiment stores run (sqlite_store.py, postgres_store.py), written once in PostgreSQL's
numbered-parameter form; SQLite takes them through `for_sqlite` (`$n` -> `?n`, which SQLite binds the same way).
Columns come from the record types, so a table, its INSERT and its SELECT cannot disagree on their order. Each
store keeps its own schema (types differ) and the statements whose dialects really differ."""
from __future__ import annotations

import re
from dataclasses import fields

from gateway.experiments.store import RequestFact, ShadowCall


def names(record_type) -> tuple[str, ...]:
    """The columns of a record type: a NamedTuple's fields (RequestFact) or a dataclass's (the others)."""
    return getattr(record_type, "_fields", None) or tuple(field.name for field in fields(record_type))


def columns(record_type) -> str:
    return ", ".join(names(record_type))


def row(record) -> tuple:
    """A shadow call's values in column order (a RequestFact already is that tuple)."""
    return tuple(getattr(record, field.name) for field in fields(record))


def _params(record_type) -> str:
    return ",".join(f"${n}" for n in range(1, len(names(record_type)) + 1))


def for_sqlite(statement: str) -> str:
    return re.sub(r"\$(\d+)", r"?\1", statement)


INSERT_FACT = (f"INSERT INTO request_fact ({columns(RequestFact)}) VALUES ({_params(RequestFact)}) "
               "ON CONFLICT (request_id) DO NOTHING")   # the first fact of a request id wins
INSERT_SHADOW = f"INSERT INTO shadow_call ({columns(ShadowCall)}) VALUES ({_params(ShadowCall)})"
SELECT_FACT = f"SELECT {columns(RequestFact)} FROM request_fact WHERE request_id = $1"
SELECT_EXPERIMENT = """
SELECT f.at, f.variant, f.status, f.latency_s, f.ttft_s, f.prompt_tokens, f.completion_tokens, s.value, l.value
FROM request_fact f
LEFT JOIN feedback s ON s.request_id = f.request_id AND s.kind = 'score'
LEFT JOIN feedback l ON l.request_id = f.request_id AND l.kind = 'label'
WHERE f.experiment = $1 AND f.at >= $2
ORDER BY f.at
"""
SELECT_SHADOWS = f"SELECT {columns(ShadowCall)} FROM shadow_call WHERE experiment = $1 AND at >= $2 ORDER BY at"
INSERT_EVENT = "INSERT INTO experiment_event (experiment, at, kind, variant, detail) VALUES ($1, $2, $3, $4, $5)"
SELECT_EVENTS = "SELECT experiment, at, kind, variant, detail FROM experiment_event WHERE experiment = $1 ORDER BY at"
SELECT_ROUTES = "SELECT name, route, updated_at FROM route_override ORDER BY name"
PURGE = (
    "DELETE FROM feedback WHERE request_id IN (SELECT request_id FROM request_fact WHERE at < $1)",
    "DELETE FROM request_fact WHERE at < $1",
    "DELETE FROM shadow_call WHERE at < $1",
)
