"""One logging configuration for every command; named loggers per layer (dtgserver.server, .session, .store, ...).

Two formats (`serve --log-format`): `text`, one line of words per record, and `json`, one JSON
object per line with `time`, `level`, `logger` and `message`, and for a session the fields of its
text line as JSON values (a log shipper then needs no parsing rules).
"""

from __future__ import annotations

import json
import logging.config
from datetime import datetime
from typing import Any, Literal

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
current_format: LogFormat = "text"  # what `configure` set last: the supervisor hands it to its processes


class JsonFormatter(logging.Formatter):
    """A record as one JSON object on one line. A record with `event` and `fields` (passed as `extra`,
    as the session line is) has the event as its message and the fields as keys of their own."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": getattr(record, "event", None) or record.getMessage(),  # a session: "session"
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure(verbosity: int = 0, log_format: LogFormat = "text") -> None:
    """verbosity: -1 quiet (warnings), 0 normal (one line per session), 1 debug."""
    global current_format
    level = {-1: "WARNING", 0: "INFO"}.get(verbosity, "DEBUG" if verbosity > 0 else "WARNING")
    current_format = log_format
    logging.config.dictConfig({
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"text": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
                       "json": {"()": JsonFormatter}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": log_format, "stream": "ext://sys.stderr"}},
        "loggers": {"dtgserver": {"level": level, "handlers": ["stderr"], "propagate": False}},
    })
