"""The gateway's log lines: JSON (or text) on stderr, each with the id of the request being served when it was
written (a contextvar the data plane and the control plane set), written by a background thread so that no
request ever waits on a blocked stderr pipe (the event loop must not do blocking I/O).

`configure_logging(config.logging)` is called once by `serve`; library code only uses `logging.getLogger`.
"""
from __future__ import annotations

import collections
import contextvars
import logging
import os
import sys
import threading
import time

import orjson

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
# LogRecord attributes that are not a caller's `extra=` fields.
MILLISECONDS = tuple(f".{milli:03d}Z" for milli in range(1000))   # a timestamp's tail, formatted once
STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "request_id",
                                                                             "fields"}


class RequestIdFilter(logging.Filter):
    """Stamps every record with the request id of the context that wrote it (None outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, pid, the caller's `extra=` fields (or
    an access record's `fields`, taken whole: the per-request line skips the scan), traceback."""

    def __init__(self) -> None:
        super().__init__()
        self._second, self._stamp = -1, ""

    def timestamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:  # strftime once a second, not once a line
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return self._stamp + MILLISECONDS[int((created - second) * 1000)]

    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": self.timestamp(record.created), "level": record.levelname.lower(), "logger": record.name,
                "message": record.getMessage()}
        attributes = record.__dict__
        request_id = attributes.get("request_id")
        if request_id is not None:
            line["request_id"] = request_id
        line["pid"] = record.process
        fields = attributes.get("fields")
        if fields is not None:
            line.update(fields)
        else:
            for key, value in attributes.items():
                if key not in STANDARD and not key.startswith("_"):
                    line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    """`time LEVEL logger [request id]: message`, then an access record's fields as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = record.__dict__.get("fields")
        if fields:
            text += " " + " ".join(f"{key}={value}" for key, value in fields.items() if value is not None)
        return text


class BackgroundHandler(logging.Handler):
    """Formats in the caller (the record's fields are only valid there) and writes from a daemon thread that
    wakes every FLUSH_S: waking it per line (a queue) cost ~80 µs per request in GIL hand-offs (bench/). At most
    MAX_PENDING lines wait; past that the oldest are dropped rather than memory growing behind a blocked stderr."""

    FLUSH_S = 0.05
    MAX_PENDING = 100_000

    def __init__(self, stream=None) -> None:
        super().__init__()
        self.stream = stream if stream is not None else sys.stderr
        self.pending: collections.deque[str] = collections.deque(maxlen=self.MAX_PENDING)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self.thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.pending.append(self.format(record))
        except Exception:
            self.handleError(record)

    def sole_json_for(self, logger: logging.Logger) -> bool:
        """A record of `logger` would reach this JSON handler alone, through no filter but the request id's: no
        handler or filter anywhere else on its way, logging not reconfigured since configure_logging()."""
        root = logging.root
        filters = self.filters
        return (self.formatter.__class__ is JsonFormatter and logger.parent is root and not logger.handlers
                and not logger.filters and logger.propagate and len(root.handlers) == 1 and root.handlers[0] is self
                and len(filters) == 1 and filters[0].__class__ is RequestIdFilter and self.level <= logging.INFO)

    def write_json(self, logger: str, message: str, fields: dict) -> None:
        """The line JsonFormatter writes for an INFO record of `logger` with these `fields`, without making
        the record (LogRecord's constructor looks up the thread, the process and the caller's module: a few
        µs per request for the access log). Only where sole_json_for() said so."""
        line = {"ts": self.formatter.timestamp(time.time()), "level": "info", "logger": logger, "message": message}
        request_id = REQUEST_ID.get()
        if request_id is not None:
            line["request_id"] = request_id
        line["pid"] = _pid
        line.update(fields)
        self.pending.append(orjson.dumps(line, default=str).decode())

    def write_json_text(self, logger: str, message: str, fields: str) -> None:
        """write_json() with the logger, message and fields already JSON text (`fields`: `,"key":value…`), for
        the access line (gateway/access_log.py access_json): the same line, without a dict to build and dump."""
        request_id = REQUEST_ID.get()
        if request_id is None:
            request_id = ""
        elif request_id.isalnum() and request_id.isascii():   # the ids request_id_of() makes need no escapes
            request_id = f',"request_id":"{request_id}"'
        else:
            request_id = ',"request_id":' + orjson.dumps(request_id, default=str).decode()
        self.pending.append(f'{{"ts":"{self.formatter.timestamp(time.time())}","level":"info","logger":{logger},'
                            f'"message":{message}{request_id},"pid":{_pid}{fields}}}')

    def _run(self) -> None:
        while not self._stop.wait(self.FLUSH_S):
            self._drain()
        self._drain()

    def _drain(self) -> None:
        pending, lines = self.pending, []
        while pending:
            lines.append(pending.popleft())
        if lines:
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # stderr closed: nothing left to tell

    def close(self) -> None:
        """Write what is pending (bounded: a wedged stderr must not hang shutdown)."""
        self._stop.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=2)
        super().close()


def _forked() -> None:
    global _pid
    _pid = os.getpid()


_pid = os.getpid()   # what LogRecord.process holds, without a getpid() per line
os.register_at_fork(after_in_child=_forked)


def configure_logging(config) -> logging.Handler:
    """Replace the root logger's handlers with the configured one; returns it (tests read its stream)."""
    handler = BackgroundHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if config.format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(LEVELS[config.level])
    access = logging.getLogger("kimi_gateway.access")
    access.disabled = not config.access_log
    return handler
