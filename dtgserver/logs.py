"""One logging configuration for every command; named loggers per layer (dtgserver.server, .session, .store, ...)."""

from __future__ import annotations

import logging.config


def configure(verbosity: int = 0) -> None:
    """verbosity: -1 quiet (warnings), 0 normal (one line per session), 1 debug."""
    level = {-1: "WARNING", 0: "INFO"}.get(verbosity, "DEBUG" if verbosity > 0 else "WARNING")
    logging.config.dictConfig({
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
        "loggers": {"dtgserver": {"level": level, "handlers": ["stderr"], "propagate": False}},
    })
