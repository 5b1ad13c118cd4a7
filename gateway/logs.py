"""The gateway's log lines: JSON (or text) on stderr, each with the id of the request being served when it was
written (a contextvar the data plane and the control plane set), written by a background thread so that no
request ever waits on a blocked stderr pipe (the event loop must not do blocking I/O).

`configure_logging(config.logging)` is called once by `serve`; library code only uses `logging.getLogger`.
"""
from __future__ import annotations

import contextvars
import logging
import queue
import sys
import threading
import time

import orjson

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
# LogRecord attributes that are not a caller's `extra=` fields.
STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "request_id"}


class RequestIdFilter(logging.Filter):
    """Stamps every record with the request id of the context that wrote it (None outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, any `extra=` fields, traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            line["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s")


class BackgroundHandler(logging.Handler):
    """Formats in the caller (the record's fields are only valid there) and writes from a daemon thread."""

    def __init__(self, stream=None) -> None:
        super().__init__()
        self.stream = stream if stream is not None else sys.stderr
        self.lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._write, name="log-writer", daemon=True)
        self.thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.put(self.format(record))
        except Exception:
            self.handleError(record)

    def _write(self) -> None:
        while True:
            line = self.lines.get()
            batch = [line]
            while not self.lines.empty() and len(batch) < 512:  # one write for a burst
                batch.append(self.lines.get())
            stop = None in batch
            text = "\n".join(item for item in batch if item is not None)
            if text:
                try:
                    self.stream.write(text + "\n")
                    self.stream.flush()
                except (OSError, ValueError):
                    pass  # stderr closed: nothing left to tell
            if stop:
                return

    def close(self) -> None:
        """Flush what is queued (bounded: a wedged stderr must not hang shutdown)."""
        if self.thread.is_alive():
            self.lines.put(None)
            self.thread.join(timeout=2)
        super().close()


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
