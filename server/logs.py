"""Logging for `muse serve`: one JSON object a line (python-json-logger) or plain text, for
MUSE's loggers, Granian's and the access log alike.  Granian applies the same configuration
in its main process and in every worker it starts.

A JSON line carries the standard fields (``time``, ``level``, ``logger``, ``message``) and
whatever the call passed as ``extra`` (request_id, tenant, key_id, intent, predictor,
generation, ...); a traceback stays inside its line, as ``exc_info``."""

from __future__ import annotations

import logging
import logging.config
from typing import Any, Literal

Format = Literal["json", "text"]
FORMATS: tuple[Format, ...] = ("json", "text")


def config(fmt: Format = "json", level: str = "INFO") -> dict[str, Any]:
    """A logging.config.dictConfig dictionary (what Granian's ``log_dictconfig`` takes)."""
    if fmt == "json":
        formatter: dict[str, Any] = {
            "()": "pythonjsonlogger.json.JsonFormatter",
            "fmt": ["levelname", "name", "message"],
            "rename_fields": {"levelname": "level", "name": "logger"},
            "timestamp": "time",
        }
    else:
        formatter = {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    handler = {"formatter": "default", "class": "logging.StreamHandler", "stream": "ext://sys.stdout"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"console": handler},
        "loggers": {
            "muse": {"handlers": ["console"], "level": level, "propagate": False},
            "_granian": {"handlers": ["console"], "level": level, "propagate": False},
            "granian.access": {"handlers": ["console"], "level": level, "propagate": False},
        },
    }


def configure(fmt: Format = "json", level: str = "INFO") -> None:
    logging.config.dictConfig(config(fmt, level))


class Outage:
    """A background job's failures, logged once when they start and once when the job works again
    (``event``: the log line's event, with ``_unavailable`` and ``_back`` appended)."""

    def __init__(self, log: logging.Logger, what: str, event: str):
        self.log, self.what, self.event = log, what, event
        self.failing = False

    def failed(self, exc: Exception) -> None:
        if not self.failing:
            self.failing = True
            self.log.warning("%s failed, retrying: %s", self.what, exc, extra={"event": f"{self.event}_unavailable"})

    def ok(self) -> None:
        if self.failing:
            self.failing = False
            self.log.info("%s works again", self.what, extra={"event": f"{self.event}_back"})
