"""Risk levels and the risk classifier of governance (SPEC §3 "Risk"): a configurable table of
tool-name words, raised to HIGH when the call's arguments mention secrets or production.

Pure: no I/O. The per-tool-name part is cached; the argument scan is one compiled regex over the
strings of the arguments, with bounded depth and size.
"""

from __future__ import annotations

import enum
import fnmatch
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "DEFAULT_RISK_TABLE",
    "MAX_ARGUMENT_DEPTH",
    "MAX_ARGUMENT_NODES",
    "MAX_ARGUMENT_CHARS",
    "UNKNOWN_TOOL_RISK",
    "Classifier",
    "Risk",
    "arguments_are_sensitive",
    "tool_words",
]


class Risk(enum.IntEnum):
    """Risk level; same numbers as `arm.common.v1.RiskLevel` (0 = UNSPECIFIED is `None` here)."""

    LOW = 1
    MEDIUM = 2
    HIGH = 3
    CRITICAL = 4


LOW, MEDIUM, HIGH, CRITICAL = Risk.LOW, Risk.MEDIUM, Risk.HIGH, Risk.CRITICAL

# A tool no table entry matches is MEDIUM: LOW is earned by a read-like name, never assumed.
UNKNOWN_TOOL_RISK = Risk.MEDIUM

# Entries: one or more words separated by `-`, `_`, `.` or spaces; each word is an fnmatch
# pattern (`*`, `?`) matched against the words of the tool name. An entry matches when each of
# its words matches some word of the name, in any order ("send-*mail" matches `email.send`,
# `sendEmail` and `gmail_send`; "force-push" matches `git.push_force`).
# The classified risk is the HIGHEST risk among matching entries (so `get_and_write` is MEDIUM,
# `list_payments` HIGH): mistakes err on the strict side.
DEFAULT_RISK_TABLE: tuple[tuple[str, Risk], ...] = (
    # Reads and searches.
    *((w, LOW) for w in (
        "read*", "get", "list*", "search*", "find", "lookup", "view", "show", "describe",
        "inspect", "grep", "glob", "ls", "cat", "head", "tail", "stat", "status", "count",
        "diff", "peek", "browse", "summari?e",
    )),
    # Writes, edits, shell, network fetches, ordinary git pushes.
    *((w, MEDIUM) for w in (
        "write*", "edit*", "update*", "create*", "insert*", "put", "post", "patch", "set",
        "delete*", "remove*", "rm", "mv", "move", "rename", "copy", "cp", "upload*", "download*",
        "save", "append", "replace", "apply", "commit", "merge", "push", "send", "install",
        "shell", "bash", "sh", "zsh", "terminal", "exec*", "run", "command", "cmd", "script",
        "fetch", "http", "https", "curl", "wget", "request", "navigate", "click",
        "kill", "stop", "start", "restart", "scale", "git-push",
    )),
    # Deploys, publishing, payments, e-mail, force pushes, database deletion, secrets.
    *((w, HIGH) for w in (
        "deploy", "deploys", "redeploy", "rollout", "publish", "publishes", "release",
        "pay", "payment*", "payout*", "charge", "refund*", "wire",
        "send-*mail", "send-sms", "force-push", "forcepush",
        "delete-database", "drop-database", "delete-db", "drop-db", "drop-table",
        "drop-schema", "truncate-table", "secret*", "credential*", "password*",
    )),
)

# Argument text that raises risk to HIGH: secrets and production (SPEC §3 "Risk"), matched in
# case-folded text. `(?<![a-z0-9])` and `(?![a-z0-9])` stand for word edges where `_`, `-` and `.`
# separate words, so `access_token` matches but `max_tokens` (an LLM parameter in half of all tool
# calls) does not.
_SENSITIVE = re.compile(
    r"api[\s_\-]?keys?"
    r"|pass(?:w(?:or)?ds?|phrase)"
    r"|(?<![a-z0-9])token(?![a-z0-9])|(?<![a-z0-9])bearer\s"
    r"|private[\s_\-]?keys?|(?<![a-z0-9])id_(?:rsa|ed25519|ecdsa)"
    r"|secret|credential"
    r"|\.env(?![a-z0-9])"
    r"|production|(?<![a-z0-9])prod(?![a-z0-9])"
    r"|--force|--hard"
    r"|deploy"
    # Well-known credential shapes: AWS access key ids, GitHub and Slack tokens, OpenAI-style keys.
    r"|(?<![a-z0-9])(?:akia[0-9a-z]{16}|gh[pousr]_[a-z0-9]{20,}|xox[abpr]-[a-z0-9\-]{10,}"
    r"|sk-[a-z0-9_\-]{20,})"
)
# A cheap first pass: _SENSITIVE without its lookbehinds, so that every alternative starts with a
# literal and the regex engine can skip ahead by first character (lookbehinds or IGNORECASE would
# defeat that and cost about 5x). Most arguments match nothing here and are done.
_PREFILTER = re.compile(
    r"api[\s_\-]?key|pass(?:w(?:or)?d|phrase)|token(?![a-z0-9])|bearer\s|private[\s_\-]?key"
    r"|id_(?:rsa|ed25519|ecdsa)|secret|credential|\.env(?![a-z0-9])|prod(?:uction|(?![a-z0-9]))"
    r"|--force|--hard|deploy|akia[0-9a-z]{16}|gh[pousr]_[a-z0-9]{20}|xox[abpr]-[a-z0-9\-]{10}"
    r"|sk-[a-z0-9_\-]{20}"
)


def _sensitive_text(text: str) -> bool:
    folded = text.casefold()  # also maps look-alikes such as "ſ" and "K" (Kelvin) to s and k
    return _PREFILTER.search(folded) is not None and _SENSITIVE.search(folded) is not None


# Arguments deeper, larger or longer than this are not scanned but classified HIGH (fail safe).
MAX_ARGUMENT_DEPTH = 32
MAX_ARGUMENT_NODES = 10_000
MAX_ARGUMENT_CHARS = 1 << 20

_WORD_SPLIT = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_CACHE_LIMIT = 8192


def tool_words(tool: str) -> tuple[str, ...]:
    """Lower-case words of a tool name, split at punctuation and camelCase: `gitHub.pr_merge` →
    `("git", "hub", "pr", "merge")`."""
    return tuple(w.lower() for w in _WORD_SPLIT.findall(tool))


_SCALARS = frozenset({int, float, bool, type(None)})


class _TooBig(Exception):
    pass


def _collect(value: Any, out: list[str], depth: int, budget: list[int]) -> None:
    # budget = [nodes left, chars left]
    budget[0] -= 1
    if budget[0] < 0 or depth > MAX_ARGUMENT_DEPTH:
        raise _TooBig
    if isinstance(value, str):
        budget[1] -= len(value)
        if budget[1] < 0:
            raise _TooBig
        out.append(value)
    elif isinstance(value, Mapping):
        for key, item in value.items():
            if isinstance(key, str):
                budget[1] -= len(key)
                if budget[1] < 0:
                    raise _TooBig
                out.append(key)
            if not isinstance(item, (int, float, type(None))):
                _collect(item, out, depth + 1, budget)
    elif isinstance(value, (list, tuple)):
        for item in value:
            if not isinstance(item, (int, float, type(None))):
                _collect(item, out, depth + 1, budget)
    # Numbers, booleans, None and other objects mention nothing.


def arguments_are_sensitive(arguments: Any) -> bool:
    """Whether any string key or value of the arguments, at any depth, mentions secrets or
    production. Arguments too deep or too large to scan count as sensitive (fail safe)."""
    if not arguments:
        return False
    if type(arguments) is dict and len(arguments) <= MAX_ARGUMENT_NODES:
        # Fast path for the common flat {str: str | number} shape: no recursion, one join.
        flat = True
        parts: list[str] = []
        for key, item in arguments.items():
            if type(key) is str:
                parts.append(key)
            if type(item) is str:
                parts.append(item)
            elif type(item) not in _SCALARS:
                flat = False
                break
        if flat:
            text = "\x00".join(parts)
            return len(text) > MAX_ARGUMENT_CHARS or _sensitive_text(text)
    parts = []
    try:
        _collect(arguments, parts, 0, [MAX_ARGUMENT_NODES, MAX_ARGUMENT_CHARS])
    except (_TooBig, RecursionError):
        return True
    # \x00 cannot be part of a match, so no match spans two strings.
    return _sensitive_text("\x00".join(parts))


class Classifier:
    """Classifies a tool call's risk from the tool name (configurable word table, cached) and its
    arguments (raised to HIGH when they mention secrets or production)."""

    __slots__ = ("_entries", "_cache", "unknown")

    def __init__(self, table: Sequence[tuple[str, Risk]] | None = None,
                 unknown: Risk = UNKNOWN_TOOL_RISK) -> None:
        """`table` replaces `DEFAULT_RISK_TABLE` (see there for the entry syntax); `unknown` is the
        risk of a tool no entry matches."""
        entries = []
        for pattern, risk in (DEFAULT_RISK_TABLE if table is None else table):
            words = tuple(
                re.compile(fnmatch.translate(w.lower()))
                for w in re.split(r"[\s_.\-]+", pattern.strip()) if w
            )
            if words:
                entries.append((words, Risk(risk)))
        self._entries: tuple[tuple[tuple[re.Pattern[str], ...], Risk], ...] = tuple(entries)
        self._cache: dict[str, Risk] = {}
        self.unknown = Risk(unknown)

    def classify_tool(self, tool: str) -> Risk:
        """Risk of the tool name alone (table lookup; cached)."""
        risk = self._cache.get(tool)
        if risk is None:
            risk = self._classify_name(tool)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[tool] = risk
        return risk

    def _classify_name(self, tool: str) -> Risk:
        words = tool_words(tool)
        joined = set(words)
        # Also try adjacent pairs glued together, so "force-push" entries match "forcepush" names
        # and vice versa without listing both spellings.
        joined.update(a + b for a, b in zip(words, words[1:], strict=False))
        best: Risk | None = None
        for patterns, risk in self._entries:
            if (best is None or risk > best) and all(
                    any(p.match(w) for w in joined) for p in patterns):
                best = risk
        return self.unknown if best is None else best

    def classify(self, tool: str, arguments: Any = None) -> Risk:
        """Risk of a call: the tool name's risk, raised to HIGH when the arguments are sensitive."""
        risk = self._cache.get(tool)
        if risk is None:
            risk = self.classify_tool(tool)
        if arguments and risk < HIGH and arguments_are_sensitive(arguments):
            return HIGH
        return risk
