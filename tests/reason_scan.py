"""Finds every `google.rpc.ErrorInfo` reason the code under services/ and libs/ can raise, from its
syntax: `reason="X"` (also `a if c else b` of literals), `default_reason = "X"` of error classes,
`NotFound.of("kind", …)` (reason KIND_NOT_FOUND), the registry store's `get(…, "kind")` and
`flush_unique(…, "what", …)` (WHAT_EXISTS). Reasons built at run time from something else are listed
as dynamic sites, so that the catalogue test can insist each one is known."""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
UPPER_SNAKE = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)*$")
ERRORS = {"InvalidArgument": "INVALID_ARGUMENT", "NotFound": "NOT_FOUND", "AlreadyExists": "ALREADY_EXISTS",
          "FailedPrecondition": "FAILED_PRECONDITION", "Aborted": "ABORTED",
          "PermissionDenied": "PERMISSION_DENIED", "Unauthenticated": "UNAUTHENTICATED",
          "ResourceExhausted": "RESOURCE_EXHAUSTED", "Unavailable": "UNAVAILABLE",
          "DatabaseUnavailable": "UNAVAILABLE", "Unimplemented": "UNIMPLEMENTED", "ArmError": "INTERNAL"}


@dataclass
class Scan:
    reasons: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    """reason → (gRPC code or "", example message, where)."""
    dynamic: set[tuple[str, str]] = field(default_factory=set)
    """(path, source of the reason expression) of reasons computed from something else."""

    def add(self, reason: str, code: str, message: str, where: str) -> None:
        if reason not in self.reasons or (code and not self.reasons[reason][0]):
            self.reasons[reason] = (code, message, where)


def _text(node: ast.AST | None) -> str:
    if node is None:
        return ""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return ast.unparse(node)


def _literals(node: ast.AST) -> list[str] | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        a, b = _literals(node.body), _literals(node.orelse)
        return None if a is None or b is None else a + b
    return None


def scan(roots: tuple[str, ...] = ("services", "libs")) -> Scan:
    out = Scan()
    for root in roots:
        for path in sorted((ROOT / root).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if rel.startswith("libs/proto/") or "/migrations/" in rel:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Assign) and any(
                        isinstance(t, ast.Name) and t.id == "default_reason" for t in node.targets):
                    out.add(node.value.value, "", "", f"{rel}:{node.lineno}")  # type: ignore[attr-defined]
                if not isinstance(node, ast.Call):
                    continue
                func = node.func
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                code = ERRORS.get(name, "")
                message = _text(node.args[0]) if node.args else ""
                where = f"{rel}:{node.lineno}"
                for kw in node.keywords:
                    if kw.arg != "reason":
                        continue
                    values = _literals(kw.value)
                    if values is None:
                        if code:  # an error's reason from a variable: must be a known site
                            out.dynamic.add((rel, ast.unparse(kw.value)))
                        continue
                    for v in values:
                        if UPPER_SNAKE.match(v):
                            out.add(v, code, message, where)
                if name == "of" and isinstance(func, ast.Attribute) and _text(func.value) == "NotFound":
                    kinds = _literals(node.args[0])
                    if kinds is None:
                        out.dynamic.add((rel, f"NotFound.of({ast.unparse(node.args[0])})"))
                    for kind in kinds or ():
                        out.add(f"{kind.upper()}_NOT_FOUND", "NOT_FOUND", f"{kind} '…' not found", where)
                if name == "get" and rel.startswith("services/registry/") and len(node.args) >= 5:
                    for kind in _literals(node.args[4]) or ():
                        out.add(f"{kind.upper()}_NOT_FOUND", "NOT_FOUND", f"{kind} '…' not found", where)
                if name == "flush_unique" and len(node.args) >= 2:
                    for what in _literals(node.args[1]) or ():
                        out.add(f"{what.upper().replace(' ', '_')}_EXISTS", "ALREADY_EXISTS",
                                f"{what} already exists: …", where)
    return out
