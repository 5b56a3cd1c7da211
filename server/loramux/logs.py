"""Logging set-up for the `loramux` command: one handler on the root logger, in
text or JSON lines, configured once by `configure`.

Fields passed with `log.info("request finished", extra={"id": ..., "ttft_s": ...})`
come out as top-level keys in JSON and as `key=value` after the message in text.
Standard library only: it is set up before torch loads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
from typing import Any

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")

# Attributes every LogRecord has; whatever else a record carries came in `extra=`.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields given to the logging call with `extra=`, in the order given."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


def _timestamp(record: logging.LogRecord) -> str:
    """ISO 8601 in UTC with milliseconds, e.g. 2025-01-31T12:00:00.123Z."""
    when = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, then the extra fields
    (never overriding those four), then exc_info / stack_info when present.
    Values JSON cannot hold are written as their str()."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"ts": _timestamp(record), "level": record.levelname,
                                 "logger": record.name, "message": record.getMessage()}
        for key, value in extra_fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`2025-01-31 12:00:00,123 INFO loramux.x: message key=value ...`; a value
    with spaces, quotes or `=` is quoted as a JSON string, so a line still splits
    into its fields."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{key}={_text_value(value)}" for key, value in extra_fields(record).items())
        line = super().formatMessage(record)
        return f"{line} {fields}" if fields else line


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    if text == "" or any(c.isspace() or c in "\"'=" for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (tests and tools swap
    it), never to a stream that was closed since configure()."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr


def configure(level: str = "info", fmt: str = "text") -> logging.Handler:
    """Send log records at `level` and above to stderr in `fmt` ("text" or "json").
    Replaces the handler an earlier call installed, leaves others alone (pytest's,
    say); returns the handler."""
    if level not in LEVELS or fmt not in FORMATS:
        raise ValueError(f"log level {level!r} / format {fmt!r}: expected one of {LEVELS} / {FORMATS}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_loramux", False)]:
        root.removeHandler(old)
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler._loramux = True  # type: ignore[attr-defined]  # marks the one configure() owns
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler


def add_log_args(p: argparse.ArgumentParser | argparse._ArgumentGroup, *, shown_default: str,
                 leave_unset: bool = False) -> None:
    """--log-level and --log-format (default None: the command decides).
    shown_default: the level --help names as the default. leave_unset=True (a
    subcommand repeating the global options) keeps them off the namespace unless
    given, so they do not overwrite values given before the subcommand."""
    unset = argparse.SUPPRESS if leave_unset else None
    p.add_argument("--log-level", choices=LEVELS, default=unset,
                   help=f"least severe level logged (default: {shown_default})")
    p.add_argument("--log-format", choices=FORMATS, default=unset,
                   help="text lines, or one JSON object per line with ts, level, logger, message "
                        "and the record's fields (default: text)")
