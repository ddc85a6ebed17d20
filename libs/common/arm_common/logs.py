"""Process-wide logging set-up: level from ARM_LOG_LEVEL (default INFO), format from
ARM_LOG_FORMAT: `text` (the default, one readable line) or `json` (one JSON object per line with
time, level, logger, message, the exception if any, and the trace_id / span_id of the span the
line was logged in, to join logs with traces)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from datetime import UTC, datetime

from opentelemetry import trace

from arm_common.config import ConfigError

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line; `trace_id` and `span_id` (hex) when logged inside a span."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            line["trace_id"] = format(context.trace_id, "032x")
            line["span_id"] = format(context.span_id, "016x")
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def formatter(env: Mapping[str, str] | None = None) -> logging.Formatter:
    """The formatter ARM_LOG_FORMAT asks for; anything but text or json is a ConfigError."""
    kind = ((env if env is not None else os.environ).get("ARM_LOG_FORMAT") or "text").strip().lower()
    if kind == "json":
        return JsonFormatter()
    if kind == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ConfigError(f"ARM_LOG_FORMAT must be text or json, got {kind!r}")


def configure() -> None:
    try:
        chosen = formatter()
    except ConfigError as exc:
        raise SystemExit(f"arm: {exc}") from None  # exit status 1, the message on stderr
    handler = logging.StreamHandler()
    handler.setFormatter(chosen)
    logging.basicConfig(level=os.environ.get("ARM_LOG_LEVEL", "INFO").upper(), handlers=[handler])
