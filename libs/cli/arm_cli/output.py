"""Printing: rich tables for people, `-o json|yaml` for scripts, and the one error block."""

from __future__ import annotations

import enum
import json
import sys
from collections.abc import Sequence
from typing import Any

import yaml
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table

from arm_client.errors import ArmError


class Format(enum.StrEnum):
    table = "table"
    json = "json"
    yaml = "yaml"


def console(stderr: bool = False) -> Console:
    """A console on the current stdout/stderr (unbounded when not a terminal, so pipes and tests
    see whole cells)."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(file=stream, width=None if stream.isatty() else 1000, soft_wrap=False,
                   highlight=False)


def as_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def short_enum(value: str, prefix: str) -> str:
    return value.removeprefix(prefix) if value else ""


def emit_rows(rows: Sequence[dict[str, Any]], fmt: Format, columns: Sequence[str], *,
              title: str | None = None, raw: Any = None) -> None:
    """A list: a table with `columns` of `rows`, or the machine form (`raw`, else `rows`)."""
    data = rows if raw is None else raw
    if fmt is not Format.table:
        _dump(data, fmt)
        return
    table = Table(title=title, show_lines=False)
    for col in columns:
        table.add_column(col.replace("_", " "))
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    console().print(table)


def emit_object(obj: dict[str, Any], fmt: Format, *, title: str | None = None, raw: Any = None) -> None:
    """One object: field / value pairs, or the machine form."""
    if fmt is not Format.table:
        _dump(obj if raw is None else raw, fmt)
        return
    table = Table(title=title, show_header=False, box=None, pad_edge=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in obj.items():
        table.add_row(key.replace("_", " "), _cell(value))
    console().print(table)


def _dump(data: Any, fmt: Format) -> None:
    if fmt is Format.json:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    else:
        sys.stdout.write(yaml.safe_dump(data, sort_keys=False))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return "\n".join(_cell(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def error_block(err: ArmError) -> str:
    """The one readable block a failed call prints: message, code, reason, field violations,
    request id. Never a traceback."""
    lines = [f"Error: {err.message}"]
    if err.code is not None:
        lines.append(f"  code:       {err.code.name}")
    if err.reason and (err.code is None or err.reason != err.code.name):
        lines.append(f"  reason:     {err.reason}")
    for v in err.field_violations:
        lines.append(f"  field:      {v.field}: {v.description}")
    details = {k: val for k, val in err.metadata.items() if k != "request_id"}
    for k, val in sorted(details.items()):
        lines.append(f"  {k + ':':<11} {val}")
    if err.request_id:
        lines.append(f"  request id: {err.request_id}")
    return "\n".join(lines)


def print_error(text: str) -> None:
    sys.stderr.write(text.rstrip("\n") + "\n")
