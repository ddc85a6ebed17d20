"""Risk levels and the risk classifier of governance (SPEC §3 "Risk"): a configurable table of
tool-name words, raised to HIGH when the call's arguments mention secrets or production. A tenant
adds its own overrides of the table (`RiskOverride`) and changes the argument triggers
(`ArgumentTrigger`, `tenant_triggers`).

Pure: no I/O. The per-tool-name part is cached; the argument scan is one compiled regex per risk
level the triggers raise to (one, HIGH, by default) over the strings of the arguments, with
bounded depth and size.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import re2

__all__ = [
    "DEFAULT_ARGUMENT_TRIGGERS",
    "ArgumentTrigger",
    "DEFAULT_RISK_TABLE",
    "MAX_ARGUMENT_DEPTH",
    "MAX_ARGUMENT_NODES",
    "MAX_ARGUMENT_CHARS",
    "UNKNOWN_TOOL_RISK",
    "Classifier",
    "Risk",
    "RiskOverride",
    "arguments_are_sensitive",
    "tenant_triggers",
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

# Argument text that raises risk to HIGH (SPEC §3 "Risk"): secrets, production, force flags and
# destructive commands. Entries are (label, RE2 pattern), searched in the case-folded strings of
# the arguments (joined by NUL, so no match spans two strings); like the tool-name table, the
# whole list can be replaced (`Classifier(triggers=...)`). RE2 has no look-around: `_L` and `_R`
# stand for word edges where `_`, `-` and `.` separate words, so `access_token` matches but
# `max_tokens` (an LLM parameter in half of all tool calls) does not. Matching is linear in the
# text (RE2), whatever the entries.
_L = r"(?:\A|[^a-z0-9])"
_R = r"(?:[^a-z0-9]|\z)"
_CMD = r"(?:\A|[^a-z0-9_.\-])"  # a command word starts here: `/bin/rm` yes, `firm` no
_ARGS = r"[^\x00\n;|&]*"  # the rest of one shell command
DEFAULT_ARGUMENT_TRIGGERS: tuple[tuple[str, str], ...] = (
    # Secrets.
    ("api key", r"api[\s_\-]?keys?"),
    ("password", r"pass(?:w(?:or)?ds?|phrase)"),
    ("token", _L + r"token" + _R),
    ("bearer", _L + r"bearer\s"),
    ("private key", r"private[\s_\-]?keys?|" + _L + r"id_(?:rsa|ed25519|ecdsa)"),
    ("secret", r"secret"),
    ("credential", r"credential"),
    ("dotenv", r"\.env" + _R),
    # Well-known credential shapes: AWS access key ids, GitHub and Slack tokens, OpenAI-style keys.
    ("credential shape", _L + r"(?:akia[0-9a-z]{16}|gh[pousr]_[a-z0-9]{20,}"
                              r"|xox[abpr]-[a-z0-9\-]{10,}|sk-[a-z0-9_\-]{20,})"),
    # Production.
    ("production", r"production|" + _L + r"prod" + _R),
    ("deploy", r"deploy"),
    ("force flag", r"--force|--hard"),
    # Destructive commands (issue 10, item 9).
    ("recursive delete", _CMD + r"rm\s+(?:-[a-z]*\s+)*(?:-[a-z]*r[a-z]*|--recursive)" + _R),
    ("find -delete", _CMD + r"find\s" + _ARGS + r"\s-delete" + _R),
    ("mkfs", _CMD + r"mkfs(?:\.[a-z0-9]+)?" + _R),
    ("dd of=", _CMD + r"dd\s" + _ARGS + r"\sof="),
    ("drop table", _L + r"drop\s+(?:table|database|schema)" + _R),
    ("truncate", _L + r"truncate\s+(?:table\s|[a-z0-9_.\"`]+\s*(?:;|\z|\x00))"),
    ("git force push", _CMD + r"git\s+push\s(?:" + _ARGS + r"\s)?(?:-[a-z]*f[a-z]*|\+\S+)" + _R),
    ("chmod -R 777", _CMD + r"chmod\s+(?:-[a-z]*\s+)*-[a-z]*r[a-z]*\s+(?:-[a-z]*\s+)*"
                            r"(?:0?777|a\+rwx|ugo\+rwx)" + _R),
    ("pipe to shell", _CMD + r"(?:curl|wget)\s[^\x00\n;&]*\|\s*(?:sudo\s+)?(?:ba|z|da|k)?sh" + _R),
)

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False
_RE2_OPTIONS.dot_nl = True


def _trigger_regex(triggers: Sequence[tuple[str, str]]) -> Any:
    """One RE2 over every trigger; None when there are none. Raises ValueError for a pattern RE2
    cannot compile, naming its label."""
    for label, pattern in triggers:
        try:
            re2.compile(pattern, _RE2_OPTIONS)
        except re2.error as exc:
            raise ValueError(f"argument trigger {label!r} is not RE2: {exc}") from None
    if not triggers:
        return None
    return re2.compile("|".join(f"(?:{p})" for _label, p in triggers), _RE2_OPTIONS)


_DEFAULT_TRIGGERS = _trigger_regex(DEFAULT_ARGUMENT_TRIGGERS)
# A cheap first pass for the default triggers: every default trigger needs one of these literals,
# and every alternative starts with a literal, so Python's `re` skips ahead by first character
# and stays linear (no nested repetition). Most arguments match nothing here and are done without
# the RE2 call (whose wrapper costs about a microsecond).
_DEFAULT_PREFILTER = re.compile(
    r"api[\s_\-]?key|pass(?:w(?:or)?d|phrase)|token(?![a-z0-9])|bearer\s|private[\s_\-]?key"
    r"|id_(?:rsa|ed25519|ecdsa)|secret|credential|\.env(?![a-z0-9])|prod(?:uction|(?![a-z0-9]))"
    r"|--force|--hard|deploy|akia[0-9a-z]{16}|gh[pousr]_[a-z0-9]{20}|xox[abpr]-[a-z0-9\-]{10}"
    r"|sk-[a-z0-9_\-]{20}"
    r"|rm\s|find\s|mkfs|dd\s|drop\s|truncate\s|git\s|chmod\s|curl\s|wget\s"
)


def _sensitive_text(text: str, regex: Any = None) -> bool:
    regex = _DEFAULT_TRIGGERS if regex is None else regex
    folded = text.casefold()  # also maps look-alikes such as "ſ" and "K" (Kelvin) to s and k
    if regex is _DEFAULT_TRIGGERS and _DEFAULT_PREFILTER.search(folded) is None:
        return False
    return regex.search(folded) is not None


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


def _argument_text(arguments: Any) -> str | None:
    """The string keys and values of the arguments joined by NUL (no match spans two strings);
    None when they are too deep or too large to scan."""
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
            return None if len(text) > MAX_ARGUMENT_CHARS else text
    parts = []
    try:
        _collect(arguments, parts, 0, [MAX_ARGUMENT_NODES, MAX_ARGUMENT_CHARS])
    except (_TooBig, RecursionError):
        return None
    return "\x00".join(parts)


def arguments_are_sensitive(arguments: Any, triggers: Any = None) -> bool:
    """Whether any string key or value of the arguments, at any depth, matches an argument
    trigger (secrets, production, destructive commands; `triggers`: a compiled trigger regex,
    default `DEFAULT_ARGUMENT_TRIGGERS`). Arguments too deep or too large to scan count as
    sensitive (fail safe)."""
    if not arguments:
        return False
    text = _argument_text(arguments)
    return text is None or _sensitive_text(text, triggers)


def _fnmatch_re2(word: str) -> str:
    """An fnmatch pattern (`*`, `?`, `[seq]`, `[!seq]`) as RE2 syntax."""
    out, i, n = [], 0, len(word)
    while i < n:
        c = word[i]
        i += 1
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            k = i + 1 if word[i:i + 1] == "!" else i
            k = k + 1 if word[k:k + 1] == "]" else k
            j = word.find("]", k)
            if j < 0:
                out.append("\\x5b")
                continue
            body, i = word[i:j], j + 1
            neg = body.startswith("!")
            body = body[1:] if neg else body
            chars = "".join(ch if ch.isalnum() or ch == "-" else f"\\x{{{ord(ch):x}}}" for ch in body)
            out.append(("[^" if neg else "[") + chars + "]")
        else:
            out.append(c if c.isalnum() or c == "_" else f"\\x{{{ord(c):x}}}")
    return "".join(out)


@dataclass(frozen=True, slots=True)
class ArgumentTrigger:
    """A tenant's change to the argument triggers: with the label of a default trigger it
    replaces that trigger's pattern (empty `pattern` keeps the default's) and risk, or with
    `disabled` removes it; any other label adds a trigger. `risk` is what a match raises the call
    to (MEDIUM, HIGH or CRITICAL); a tenant's patterns match case-insensitively. The entries are
    checked by `limits.trigger_violations`."""

    label: str
    pattern: str = ""
    risk: Risk = HIGH
    disabled: bool = False


_DEFAULT_LABELS = frozenset(label for label, _ in DEFAULT_ARGUMENT_TRIGGERS)


def tenant_triggers(changes: Sequence[ArgumentTrigger]) -> tuple[tuple[str, str, Risk], ...]:
    """The default argument triggers with a tenant's changes applied, as the (label, pattern,
    risk) entries of `Classifier(triggers=...)`: defaults in their order (replaced or dropped),
    then the tenant's added triggers in its order."""
    by_label = {t.label: t for t in changes}
    out: list[tuple[str, str, Risk]] = []
    for label, pattern in DEFAULT_ARGUMENT_TRIGGERS:
        t = by_label.get(label)
        if t is None:
            out.append((label, pattern, HIGH))
        elif not t.disabled:
            out.append((label, f"(?i:{t.pattern})" if t.pattern else pattern, Risk(t.risk or HIGH)))
    out += [(t.label, f"(?i:{t.pattern})", Risk(t.risk or HIGH)) for t in changes
            if t.label not in _DEFAULT_LABELS and not t.disabled]
    return tuple(out)


@dataclass(frozen=True, slots=True)
class RiskOverride:
    """An entry that sets the tool-name risk of the calls it matches, ahead of the word table (a
    tenant's own classification, e.g. `payments.refund` with `amount` under 50 is MEDIUM):
    `tool` is a tool glob with the tool rules' syntax (`*` within a dotted segment, `**` across,
    case-insensitive); every `(argument, bound)` of `below` must hold — that argument (a top-level
    name, or a dotted path into nested objects such as `refund.amount`) is a number (not a bool)
    strictly below the bound — or the entry does not apply. The first
    matching override wins; argument triggers still raise the result (to their level)."""

    tool: str
    risk: Risk
    below: tuple[tuple[str, float], ...] = ()


def _override_regex(glob: str) -> str:
    out = []
    for part in re.split(r"(\*+)", glob):
        if part.startswith("*"):
            out.append(".*" if len(part) >= 2 else "[^.]*")
        elif part:
            out.append("".join(c if c.isalnum() or c == "_" else f"\\x{{{ord(c):x}}}" for c in part))
    return "".join(out)


def _holds(arguments: Any, below: tuple[tuple[str, float], ...]) -> bool:
    if not below:
        return True
    if not isinstance(arguments, Mapping):
        return False
    for name, bound in below:
        value = arguments.get(name)
        if value is None and "." in name:  # a path into nested objects: `refund.amount`
            value = arguments
            for part in name.split("."):
                value = value.get(part) if isinstance(value, Mapping) else None
        if isinstance(value, bool) or not isinstance(value, int | float) or not value < bound:
            return False
    return True


class Classifier:
    """Classifies a tool call's risk from the tool name (configurable word table, cached) and its
    arguments (raised when they match an argument trigger — secrets, production, destructive
    commands — to HIGH, or to the level a tenant's trigger names; configurable too)."""

    __slots__ = ("_entries", "_words", "_word_hits", "_cache", "_levels", "_top", "unknown", "_overrides")

    def __init__(self, table: Sequence[tuple[str, Risk]] | None = None,
                 unknown: Risk = UNKNOWN_TOOL_RISK,
                 triggers: Sequence[tuple[str, str] | tuple[str, str, Risk]] | None = None,
                 overrides: Sequence[RiskOverride] = ()) -> None:
        """`table` replaces `DEFAULT_RISK_TABLE` (see there for the entry syntax); `unknown` is the
        risk of a tool no entry matches; `triggers` replaces `DEFAULT_ARGUMENT_TRIGGERS`
        ((label, RE2 pattern) entries raising to HIGH, or (label, RE2 pattern, risk): see
        `tenant_triggers`); `overrides` (RiskOverride) are tried first, in order."""
        opts = re2.Options()
        opts.case_sensitive = False
        opts.log_errors = False
        self._overrides = tuple((re2.compile(_override_regex(o.tool), opts), Risk(o.risk), tuple(o.below))
                                for o in overrides)
        # Every distinct word pattern of the table goes into one RE2 set: a name's words are
        # matched against all of them in one pass each, in time linear in the name.
        patterns: dict[str, int] = {}
        entries = []
        for pattern, risk in (DEFAULT_RISK_TABLE if table is None else table):
            words = tuple(patterns.setdefault(w.lower(), len(patterns))
                          for w in re.split(r"[\s_.\-]+", pattern.strip()) if w)
            if words:
                entries.append((frozenset(words), Risk(risk)))
        self._entries: tuple[tuple[frozenset[int], Risk], ...] = tuple(entries)
        self._words: Any = None
        if patterns:
            word_set = re2.Set.FullMatchSet(_RE2_OPTIONS)
            for w in patterns:
                word_set.Add(_fnmatch_re2(w))
            word_set.Compile()
            self._words = word_set
        self._cache: dict[str, Risk] = {}
        self._word_hits: dict[str, tuple[int, ...]] = {}  # word → ids of the patterns it matches
        self._levels = _trigger_levels(triggers)
        """(risk, compiled regex) per level a trigger raises to, highest first."""
        self._top = self._levels[0][0] if self._levels else None
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
        matched: set[int] = set()
        if self._words is not None:
            word_hits = self._word_hits
            for w in joined:
                hits = word_hits.get(w)
                if hits is None:
                    hits = tuple(self._words.Match(w) or ())
                    if len(word_hits) >= _CACHE_LIMIT:
                        word_hits.clear()
                    word_hits[w] = hits
                matched.update(hits)
        best: Risk | None = None
        for ids, risk in self._entries:
            if (best is None or risk > best) and ids <= matched:
                best = risk
        return self.unknown if best is None else best

    def classify(self, tool: str, arguments: Any = None) -> Risk:
        """Risk of a call: the first matching override's risk, else the tool name's risk; raised
        to HIGH when an argument trigger matches."""
        risk = None
        for matcher, override, below in self._overrides:
            if matcher.fullmatch(tool) and _holds(arguments, below):
                risk = override
                break
        if risk is None:
            risk = self._cache.get(tool)
        if risk is None:
            risk = self.classify_tool(tool)
        if arguments and self._top is not None and risk < self._top:
            return self._raised(risk, arguments)
        return risk

    def _raised(self, risk: Risk, arguments: Any) -> Risk:
        text = _argument_text(arguments)
        if text is None:  # too deep or too large to scan: fail safe
            return max(risk, HIGH, self._levels[0][0])
        for level, regex in self._levels:
            if level <= risk:
                break
            if _sensitive_text(text, regex):
                return level
        return risk


def _trigger_levels(triggers: Sequence[tuple[Any, ...]] | None) -> tuple[tuple[Risk, Any], ...]:
    if triggers is None:
        return ((HIGH, _DEFAULT_TRIGGERS),)
    by_level: dict[Risk, list[tuple[str, str]]] = {}
    for entry in triggers:
        level = Risk(entry[2]) if len(entry) > 2 else HIGH
        by_level.setdefault(level, []).append((entry[0], entry[1]))
    out = []
    for level in sorted(by_level, reverse=True):
        entries = tuple(by_level[level])
        # The default triggers unchanged keep their compiled regex and its cheap first pass.
        regex = _DEFAULT_TRIGGERS if entries == DEFAULT_ARGUMENT_TRIGGERS else _trigger_regex(entries)
        out.append((level, regex))
    return tuple(out)
