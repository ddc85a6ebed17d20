"""ARM_LOG_FORMAT: json lines carry the trace and span ids of the span they were logged in."""

from __future__ import annotations

import json
import logging
import sys

import pytest
from opentelemetry.sdk.trace import TracerProvider

from arm_common import logs
from arm_common.config import ConfigError


def _record(message: str, *, exc: bool = False) -> logging.LogRecord:
    info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            info = sys.exc_info()
    return logging.LogRecord("arm.test", logging.WARNING, __file__, 1, message, (), info)


def test_json_lines_carry_the_current_trace_and_span_ids() -> None:
    formatter = logs.formatter({"ARM_LOG_FORMAT": "json"})
    tracer = TracerProvider().get_tracer("test")  # a provider of its own: the global one stays
    with tracer.start_as_current_span("work") as span:
        inside = json.loads(formatter.format(_record("inside %s")))
        context = span.get_span_context()
    assert inside["trace_id"] == format(context.trace_id, "032x")
    assert inside["span_id"] == format(context.span_id, "016x")
    assert (inside["level"], inside["logger"], inside["message"]) == ("WARNING", "arm.test", "inside %s")
    outside = json.loads(formatter.format(_record("outside", exc=True)))
    assert "trace_id" not in outside and "span_id" not in outside
    assert "ValueError: boom" in outside["exception"]


def test_text_is_the_default_and_a_bad_format_is_refused() -> None:
    line = logs.formatter({}).format(_record("plain"))
    assert line.endswith("WARNING arm.test: plain")
    with pytest.raises(ConfigError, match="ARM_LOG_FORMAT"):
        logs.formatter({"ARM_LOG_FORMAT": "xml"})
