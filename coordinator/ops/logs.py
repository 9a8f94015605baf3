"""Structured logs: one line per event, text or JSON, secrets masked.

``configure_logging(settings)`` installs one handler on the root logger (and on
uvicorn's loggers, which do not propagate) so that every line:

- is one line: JSON objects when ``COORDINATOR_LOG_FORMAT=json``, else text;
  tracebacks go inside the JSON object (or follow the text line);
- carries ``instance_id``, and ``term`` (the fencing token) while this process
  leads, when a ``term`` source is given; ``channel`` and any other ``extra=``
  fields of the call are included too;
- never shows a password: anything that looks like ``scheme://user:password@``
  in a message, its arguments or a traceback is rewritten to
  ``scheme://user:***@`` before it is written, whoever logged it.

It is idempotent: calling it again replaces the handler it installed.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

from coordinator.settings import CoordinatorSettings

TermSource = Callable[[], "int | None"]

_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@\s]+@")
_OWN = "_coordinator_handler"
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
_UVICORN = ("uvicorn", "uvicorn.error", "uvicorn.access")


def mask_secrets(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***``."""
    return _URL_PASSWORD.sub(r"\1***@", text)


class ContextFilter(logging.Filter):
    """Adds ``instance_id`` and ``term`` to every record; masks URL passwords."""

    def __init__(self, instance_id: str, term: TermSource | None = None) -> None:
        super().__init__()
        self.instance_id = instance_id
        self.term = term

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "instance_id"):
            record.instance_id = self.instance_id
        if not hasattr(record, "term"):
            try:
                record.term = self.term() if self.term is not None else None
            except Exception:
                record.term = None
        message = record.getMessage()
        masked = mask_secrets(message)
        if masked != message or record.args:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_secrets(record.exc_text)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, message, instance_id, term, extras."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "instance_id": getattr(record, "instance_id", None),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out and value is not None:
                out[key] = value if isinstance(value, (str, int, float, bool)) else str(value)
        if record.exc_text:
            out["exc"] = record.exc_text
        return mask_secrets(json.dumps(out, ensure_ascii=False, default=str))


class TextFormatter(logging.Formatter):
    """``time LEVEL logger [instance term=N channel=C] message``, on one line when possible."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(context)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        parts = [str(getattr(record, "instance_id", "-"))]
        for key in ("term", "channel"):
            value = getattr(record, key, None)
            if value is not None:
                parts.append(f"{key}={value}")
        record.context = " ".join(parts)
        return mask_secrets(super().format(record))


def configure_logging(
    settings: CoordinatorSettings,
    *,
    term: TermSource | None = None,
    stream: TextIO | None = None,
) -> logging.Handler:
    """Send every log line through one handler in ``settings.log_format``.

    ``term`` returns the current fencing token, or ``None`` when not leading
    (``lambda: coordinator.elector.token``). Returns the handler installed.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    handler.addFilter(ContextFilter(settings.instance_id, term))
    setattr(handler, _OWN, True)
    level = settings.log_level.upper()
    root = logging.getLogger()
    _replace(root, handler)
    root.setLevel(level)
    for name in _UVICORN:
        logger = logging.getLogger(name)
        if logger.handlers:
            _replace(logger, handler, keep_foreign=False)
    return handler


def _replace(logger: logging.Logger, handler: logging.Handler, keep_foreign: bool = True) -> None:
    for old in list(logger.handlers):
        # basicConfig's plain StreamHandler is replaced; capture handlers (pytest's) are kept.
        if getattr(old, _OWN, False) or not keep_foreign or type(old) is logging.StreamHandler:
            logger.removeHandler(old)
    logger.addHandler(handler)
