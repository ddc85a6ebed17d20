"""The `arm` command (typer + rich). Exit codes: 0 ok, 1 a failed call or a failed check
(e.g. a broken audit chain), 2 a usage error (bad option, bad argument, unknown context)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import grpc
import typer
from google.protobuf import struct_pb2

from arm.common.v1 import common_pb2
from arm.governance.v1 import approvals_pb2, audit_pb2, decision_pb2, policy_pb2
from arm.registry.v1 import access_pb2, agents_pb2
from arm_cli import config as cfg
from arm_cli.output import Format, as_dict, emit_object, emit_rows, error_block, print_error, short_enum
from arm_client.errors import ArmError, NotFound, from_rpc_error
from arm_client.stubs import ArmClient
from arm_common.chain import ChainReport, parse_export_lines, verify_records
from arm_common.checkpoints import checkpoint_line, load_public_key
from arm_common.verify_audit import verify_export

T = TypeVar("T")

app = typer.Typer(name="arm", help="ARM from a terminal: contexts, approvals, checks, the audit trail.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
context_app = typer.Typer(help="Named contexts (address and key) in the config file.", no_args_is_help=True)
approvals_app = typer.Typer(help="An approver's inbox: list, show, approve, deny, cancel, watch.",
                            no_args_is_help=True)
audit_app = typer.Typer(help="The audit trail: list, verify (online or a file offline), export.",
                        no_args_is_help=True)
app.add_typer(context_app, name="context")
app.add_typer(approvals_app, name="approvals")
app.add_typer(audit_app, name="audit")

Output = Annotated[Format, typer.Option("--output", "-o", help="table (default), json or yaml")]


@dataclass
class State:
    context: str | None = None


@app.callback()
def _root(ctx: typer.Context,
          context: Annotated[str | None, typer.Option("--context", "-c", envvar="ARM_CONTEXT",
                                                      help="Context to use instead of the current one")] = None,
          ) -> None:
    ctx.obj = State(context)


def _state(ctx: typer.Context) -> State:
    return ctx.obj if isinstance(ctx.obj, State) else State()


def _fail(text: str, code: int = 1) -> typer.Exit:
    print_error(text)
    return typer.Exit(code)


def call(ctx: typer.Context, fn: Callable[[ArmClient], Awaitable[T]]) -> T:
    """Runs `fn` with a client for the chosen context; a failed call prints the error block and
    exits 1; a config problem exits 2. Never a traceback (unless ARM_DEBUG is set)."""
    try:
        settings = cfg.settings(cfg.load(cfg.config_path()), _state(ctx).context)
    except (cfg.ConfigError, ValueError) as exc:
        raise _fail(f"Error: {exc}", 2) from None

    async def go() -> T:
        async with ArmClient(settings=settings) as client:
            try:
                return await fn(client)
            except grpc.aio.AioRpcError as exc:
                raise from_rpc_error(exc) from None

    try:
        return asyncio.run(go())
    except ArmError as err:
        raise _fail(error_block(err)) from None
    except (typer.Exit, typer.Abort, typer.exceptions.TyperException, KeyboardInterrupt):  # usage errors: exit 2
        raise
    except Exception as exc:  # the last net: one line, no traceback
        if os.environ.get("ARM_DEBUG"):
            raise
        raise _fail(f"Error: unexpected failure: {type(exc).__name__}: {exc}") from None


def _struct(text: str | None, option: str) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    if not text:
        return out
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint=option) from None
    if not isinstance(value, dict):
        raise typer.BadParameter("must be a JSON object", param_hint=option)
    out.update(value)
    return out


# --- contexts ----------------------------------------------------------------------------------

@app.command()
def login(ctx: typer.Context,
          address: Annotated[str, typer.Option(help="host:port of ARM (all three services)")],
          key: Annotated[str | None, typer.Option(help="API key (prefer --key-file)")] = None,
          key_file: Annotated[Path | None, typer.Option(help="File holding the API key (- for stdin)")] = None,
          name: Annotated[str, typer.Option(help="Context name")] = "default",
          registry_address: Annotated[str, typer.Option(help="registry, when the services run apart")] = "",
          governance_address: Annotated[str, typer.Option(help="governance, when apart")] = "",
          telemetry_address: Annotated[str, typer.Option(help="telemetry, when apart")] = "",
          output: Output = Format.table) -> None:
    """Checks the key against ARM and stores it as context NAME (made current)."""
    if (key is None) == (key_file is None):
        raise typer.BadParameter("give exactly one of --key and --key-file", param_hint="--key")
    if key_file is not None:
        try:
            key = (sys.stdin.read() if str(key_file) == "-" else key_file.read_text()).strip()
        except OSError as exc:
            raise typer.BadParameter(str(exc), param_hint="--key-file") from None
    assert key is not None
    if not key:
        raise typer.BadParameter("the key is empty", param_hint="--key")
    context = cfg.Context(address, key, registry_address, governance_address, telemetry_address)
    settings = cfg.settings(cfg.Config("x", {"x": context}), None, {})

    async def whoami(client: ArmClient) -> access_pb2.Principal:
        return (await client.access.Authenticate(access_pb2.AuthenticateRequest())).principal

    async def go() -> access_pb2.Principal:
        async with ArmClient(settings=settings) as client:
            try:
                return await whoami(client)
            except grpc.aio.AioRpcError as exc:
                raise from_rpc_error(exc) from None

    try:
        principal = asyncio.run(go())
    except ArmError as err:
        raise _fail(error_block(err)) from None
    path = cfg.config_path()
    try:
        config = cfg.load(path)
    except cfg.ConfigError as exc:
        raise _fail(f"Error: {exc}", 2) from None
    config.contexts[name] = context
    config.current = name
    cfg.save(path, config)
    emit_object({"context": name, "tenant": principal.tenant_id,
                 "actor": f"{short_enum(common_pb2.ActorType.Name(principal.actor.type), 'ACTOR_TYPE_').lower()} "
                          f"{principal.actor.id}",
                 "config": str(path)}, output, title="Logged in")


@context_app.command("list")
def context_list(output: Output = Format.table) -> None:
    """The contexts in the config file (keys shown by their last characters only)."""
    try:
        config = cfg.load(cfg.config_path())
    except cfg.ConfigError as exc:
        raise _fail(f"Error: {exc}", 2) from None
    rows = [c.public(n, n == config.current) for n, c in config.contexts.items()]
    emit_rows(rows, output, ["name", "current", "address", "registry", "governance", "telemetry", "key"])


@context_app.command("use")
def context_use(name: str) -> None:
    """Makes NAME the current context."""
    path = cfg.config_path()
    try:
        config = cfg.load(path)
    except cfg.ConfigError as exc:
        raise _fail(f"Error: {exc}", 2) from None
    if name not in config.contexts:
        raise _fail(f"Error: no context named {name!r}; known: {', '.join(sorted(config.contexts)) or 'none'}", 2)
    config.current = name
    cfg.save(path, config)
    sys.stdout.write(f"current context: {name}\n")


# --- approvals ---------------------------------------------------------------------------------

_OPEN = [approvals_pb2.APPROVAL_STATUS_PENDING, approvals_pb2.APPROVAL_STATUS_ESCALATED]
_FINAL = {approvals_pb2.APPROVAL_STATUS_APPROVED, approvals_pb2.APPROVAL_STATUS_DENIED,
          approvals_pb2.APPROVAL_STATUS_EXPIRED, approvals_pb2.APPROVAL_STATUS_CANCELLED}


async def operator_emails(c: ArmClient) -> dict[str, str]:
    """Operator id → e-mail, to name who decided; empty when the caller may not list operators."""
    out: dict[str, str] = {}
    token = ""
    try:
        while True:
            page = await c.access.ListOperators(access_pb2.ListOperatorsRequest(page_size=500, page_token=token))
            out.update({o.id: o.email for o in page.operators})
            token = page.next_page_token
            if not token:
                return out
    except grpc.aio.AioRpcError:
        return out


def _who(operator_id: str, emails: dict[str, str]) -> str:
    return emails.get(operator_id, operator_id)


def _decided(a: approvals_pb2.Approval, emails: dict[str, str] | None = None) -> str:
    approves = sum(d.verdict == approvals_pb2.APPROVAL_VERDICT_APPROVE for d in a.decisions)
    who = ", ".join(f"{_who(d.operator_id, emails or {})} "
                    f"{short_enum(approvals_pb2.ApprovalVerdict.Name(d.verdict), 'APPROVAL_VERDICT_').lower()}"
                    for d in a.decisions)
    return f"{approves}/{a.required_decisions or 1}" + (f" ({who})" if who else "")


def _approval_row(a: approvals_pb2.Approval, emails: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "id": a.approval_id,
        "status": short_enum(approvals_pb2.ApprovalStatus.Name(a.status), "APPROVAL_STATUS_"),
        "risk": short_enum(common_pb2.RiskLevel.Name(a.risk), "RISK_LEVEL_"),
        "action": short_enum(approvals_pb2.ApprovalActionType.Name(a.action_type), "APPROVAL_ACTION_TYPE_"),
        "tool": a.tool_name,
        "digest": a.argument_digest[:16],
        "justification": a.justification,
        "decided": _decided(a, emails),
        "expires": a.expire_time.ToDatetime().isoformat(timespec="seconds") + "Z" if a.HasField("expire_time") else "",
    }


_APPROVAL_COLUMNS = ["id", "status", "risk", "tool", "digest", "justification", "decided", "expires"]
_STATUS_NAMES = {short_enum(n, "APPROVAL_STATUS_").lower(): v for n, v in approvals_pb2.ApprovalStatus.items() if v}
_RISK_NAMES = {short_enum(n, "RISK_LEVEL_").lower(): v for n, v in common_pb2.RiskLevel.items() if v}


@approvals_app.command("list")
def approvals_list(ctx: typer.Context,
                   status: Annotated[list[str] | None, typer.Option(
                       help=f"Status to show, repeatable ({', '.join(_STATUS_NAMES)}, or all); default: pending and escalated")] = None,
                   min_risk: Annotated[str | None, typer.Option(help="low, medium, high or critical")] = None,
                   instance: Annotated[str, typer.Option(help="Only this agent instance's")] = "",
                   limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
                   output: Output = Format.table) -> None:
    """The approvals waiting for a decision (or those of --status)."""
    statuses: list[int] = list(_OPEN)
    if status:
        if [s.lower() for s in status] == ["all"]:
            statuses = []
        else:
            unknown = [s for s in status if s.lower() not in _STATUS_NAMES]
            if unknown:
                raise typer.BadParameter(f"unknown status {unknown[0]!r}; one of {', '.join(_STATUS_NAMES)}, all",
                                         param_hint="--status")
            statuses = [_STATUS_NAMES[s.lower()] for s in status]
    risk = 0
    if min_risk is not None:
        if min_risk.lower() not in _RISK_NAMES:
            raise typer.BadParameter(f"one of {', '.join(_RISK_NAMES)}", param_hint="--min-risk")
        risk = _RISK_NAMES[min_risk.lower()]
    request = approvals_pb2.ListApprovalsRequest(page_size=limit, statuses=statuses, instance_id=instance,
                                                 min_risk=risk)  # type: ignore[arg-type]
    async def fetch(c: ArmClient) -> tuple[Any, dict[str, str]]:
        found = (await c.approvals.ListApprovals(request)).approvals
        return found, (await operator_emails(c) if any(a.decisions for a in found) else {})

    approvals, emails = call(ctx, fetch)
    emit_rows([_approval_row(a, emails) for a in approvals], output, _APPROVAL_COLUMNS,
              raw=[as_dict(a) for a in approvals])


def _show(ctx: typer.Context, fetch: Callable[[ArmClient], Awaitable[Any]], output: Format) -> None:
    """Runs `fetch` (a call answering with an approval) and prints the approval, naming who
    decided by e-mail when the caller may read operators."""
    async def go(c: ArmClient) -> tuple[approvals_pb2.Approval, dict[str, str]]:
        approval = (await fetch(c)).approval
        return approval, (await operator_emails(c) if approval.decisions else {})

    a, emails = call(ctx, go)
    row = _approval_row(a, emails)
    row.update({"project": a.project_id, "instance": a.instance_id, "run": a.run_id,
                "argument_digest": a.argument_digest,
                "arguments": json.dumps(as_dict(a.arguments), sort_keys=True) if a.HasField("arguments") else "",
                "estimated_cost_usd": a.estimated_cost_usd or "",
                "requester": f"{short_enum(common_pb2.ActorType.Name(a.requester.type), 'ACTOR_TYPE_').lower()} {a.requester.id}",
                "decisions": [f"{_who(d.operator_id, emails)}: {short_enum(approvals_pb2.ApprovalVerdict.Name(d.verdict), 'APPROVAL_VERDICT_')}"
                              + (f" — {d.reason}" if d.reason else "") for d in a.decisions],
                "cancellation_reason": a.cancellation_reason})
    row.pop("digest")
    emit_object({k: v for k, v in row.items() if v not in ("", [], None)}, output,
                title=f"Approval {a.approval_id}", raw=as_dict(a))


@approvals_app.command("show")
def approvals_show(ctx: typer.Context, approval_id: str, output: Output = Format.table) -> None:
    """One approval with its arguments and every decision so far."""
    _show(ctx, lambda c: c.approvals.GetApproval(approvals_pb2.GetApprovalRequest(approval_id=approval_id)), output)


def _decide(ctx: typer.Context, approval_id: str, verdict: int, reason: str, output: Format) -> None:
    request = approvals_pb2.DecideApprovalRequest(approval_id=approval_id, verdict=verdict,  # type: ignore[arg-type]
                                                  reason=reason)
    _show(ctx, lambda c: c.approvals.DecideApproval(request), output)


Reason = Annotated[str, typer.Option("--reason", "-r", help="Why (kept in the audit trail)")]


@approvals_app.command("approve")
def approvals_approve(ctx: typer.Context, approval_id: str, reason: Reason = "", output: Output = Format.table) -> None:
    """Approves (one operator's decision; some approvals need more than one)."""
    _decide(ctx, approval_id, approvals_pb2.APPROVAL_VERDICT_APPROVE, reason, output)


@approvals_app.command("deny")
def approvals_deny(ctx: typer.Context, approval_id: str, reason: Reason = "", output: Output = Format.table) -> None:
    """Denies (one denial settles it)."""
    _decide(ctx, approval_id, approvals_pb2.APPROVAL_VERDICT_DENY, reason, output)


@approvals_app.command("cancel")
def approvals_cancel(ctx: typer.Context, approval_id: str, reason: Reason = "", output: Output = Format.table) -> None:
    """Cancels an open approval (the requester's or an admin's call)."""
    request = approvals_pb2.CancelApprovalRequest(approval_id=approval_id, reason=reason)
    _show(ctx, lambda c: c.approvals.CancelApproval(request), output)


def _watch_line(a: approvals_pb2.Approval, output: Format, emails: dict[str, str]) -> None:
    if output is Format.table:
        row = _approval_row(a, emails)
        sys.stdout.write(" ".join(str(row[k]) for k in ("id", "status", "risk", "tool", "decided")) +
                         (f" — {row['justification']}" if row["justification"] else "") + "\n")
    else:
        sys.stdout.write(json.dumps(as_dict(a), sort_keys=True) + "\n")
    sys.stdout.flush()


@approvals_app.command("watch")
def approvals_watch(ctx: typer.Context,
                    approval_id: Annotated[str | None, typer.Argument(
                        help="Follow this approval; without it, follow the inbox")] = None,
                    interval: Annotated[float, typer.Option(min=0.2, help="Inbox poll interval, seconds")] = 2.0,
                    output: Output = Format.table) -> None:
    """Follows one approval, a line per change, until it is decided, expires or is cancelled; or,
    without an id, the inbox: a line for every approval that opens, gains a decision or is
    resolved, until interrupted (Ctrl-C, exit 130)."""

    async def follow(c: ArmClient) -> None:
        assert approval_id is not None
        stream = c.approvals.WatchApproval(approvals_pb2.WatchApprovalRequest(approval_id=approval_id))
        emails: dict[str, str] = {}
        async for item in stream:
            a = item.approval
            if a.decisions and not emails:
                emails = await operator_emails(c)
            _watch_line(a, output, emails)
            if a.status in _FINAL:
                stream.cancel()
                return

    async def inbox(c: ArmClient) -> None:
        seen: dict[str, tuple[int, int]] = {}
        emails: dict[str, str] = {}
        while True:
            page = await c.approvals.ListApprovals(approvals_pb2.ListApprovalsRequest(
                page_size=1000, statuses=_OPEN))  # type: ignore[arg-type]
            current = {a.approval_id: a for a in page.approvals}
            changed = [a for a in page.approvals if seen.get(a.approval_id) != (a.status, len(a.decisions))]
            gone = [i for i in seen if i not in current]
            for approval_id_ in gone:  # resolved since the last look: show how
                changed.append((await c.approvals.GetApproval(
                    approvals_pb2.GetApprovalRequest(approval_id=approval_id_))).approval)
                del seen[approval_id_]
            if any(a.decisions and not all(d.operator_id in emails for d in a.decisions) for a in changed):
                emails = await operator_emails(c)
            for a in changed:
                _watch_line(a, output, emails)
                if a.approval_id in current:
                    seen[a.approval_id] = (a.status, len(a.decisions))
            await asyncio.sleep(interval)

    try:
        call(ctx, follow if approval_id is not None else inbox)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


async def instance_id(c: ArmClient, ref: str) -> str:
    """An agent instance's id from its name (an id, `ins_…`, is used as is)."""
    if ref.startswith("ins_"):
        return ref
    token, found = "", []
    while True:
        page = await c.agents.ListAgentInstances(agents_pb2.ListAgentInstancesRequest(page_size=500, page_token=token))
        found += [i.id for i in page.agent_instances if i.name == ref]
        token = page.next_page_token
        if not token:
            break
    if not found:
        raise NotFound(f"no agent instance named {ref!r} in your tenant", reason="INSTANCE_NOT_FOUND")
    if len(found) > 1:
        raise NotFound(f"{len(found)} agent instances are named {ref!r}; give the id", reason="AMBIGUOUS_INSTANCE")
    return str(found[0])


# --- check -------------------------------------------------------------------------------------

@app.command()
def check(ctx: typer.Context,
          tool: Annotated[str, typer.Argument(help="Tool name, e.g. payments.send")],
          instance: Annotated[str, typer.Option(help="Agent instance id or name")],
          args: Annotated[str | None, typer.Option("--args", help="Arguments as a JSON object")] = None,
          cost: Annotated[float, typer.Option(help="Estimated cost in USD")] = 0.0,
          risk: Annotated[str | None, typer.Option(help="Declared risk: low, medium, high or critical")] = None,
          approval: Annotated[str, typer.Option(help="An approval id granting this call")] = "",
          output: Output = Format.table) -> None:
    """Asks governance for one decision and prints it with its explanation. Note: like any
    Check, a NEEDS_APPROVAL answer opens an approval and the decision is logged."""
    arguments = _struct(args, "--args")
    if risk is not None and risk.lower() not in _RISK_NAMES:
        raise typer.BadParameter(f"one of {', '.join(_RISK_NAMES)}", param_hint="--risk")
    declared = _RISK_NAMES[risk.lower()] if risk else 0

    async def decide(c: ArmClient) -> decision_pb2.CheckResponse:
        request = decision_pb2.CheckRequest(instance_id=await instance_id(c, instance), tool_name=tool,
                                            arguments=arguments, estimated_cost_usd=cost, approval_id=approval,
                                            declared_risk=declared)  # type: ignore[arg-type]
        return await c.decisions.Check(request)

    r = call(ctx, decide)
    rule = ""
    if r.rule_kind:
        rule = short_enum(policy_pb2.RuleKind.Name(r.rule_kind), "RULE_KIND_")
        if r.HasField("rule_index"):
            rule += f" #{r.rule_index}"
        if r.rule_description:
            rule += f": {r.rule_description}"
    emit_object({
        "decision": short_enum(policy_pb2.Decision.Name(r.decision), "DECISION_"),
        "step": short_enum(decision_pb2.DecisionStep.Name(r.step), "DECISION_STEP_"),
        "scope": (short_enum(policy_pb2.PolicyScope.Name(r.scope), "POLICY_SCOPE_") + f" {r.scope_id}").strip(),
        "envelope": r.envelope_id,
        "revision": r.envelope_revision or "",
        "rule": rule,
        "risk": short_enum(common_pb2.RiskLevel.Name(r.effective_risk), "RISK_LEVEL_"),
        "reasons": [f"{x.code}: {x.message}" for x in r.reasons],
        "approval": r.approval_id,
        "decision_id": r.decision_id,
        "shadow": [f"{short_enum(policy_pb2.Decision.Name(s.decision), 'DECISION_')} by {s.envelope_id} r{s.envelope_revision}"
                   for s in r.shadow_results],
    }, output, title=f"check {tool}", raw=as_dict(r))


# --- audit -------------------------------------------------------------------------------------

def _record_row(r: common_pb2.ChangeRecord) -> dict[str, Any]:
    return {"seq": r.sequence, "time": r.record_time.ToDatetime().isoformat(timespec="seconds") + "Z",
            "type": short_enum(common_pb2.ChangeRecordType.Name(r.type), "CHANGE_RECORD_TYPE_"),
            "actor": f"{short_enum(common_pb2.ActorType.Name(r.actor.type), 'ACTOR_TYPE_').lower()} {r.actor.id}",
            "target": f"{r.target_type} {r.target_id}".strip(), "summary": r.summary}


@audit_app.command("list")
def audit_list(ctx: typer.Context, limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
               target: Annotated[str, typer.Option(help="Only records about this target id")] = "",
               oldest_first: Annotated[bool, typer.Option(help="Oldest first (default newest)")] = False,
               output: Output = Format.table) -> None:
    """The latest audit records of your tenant."""
    request = audit_pb2.ListChangeRecordsRequest(page_size=limit, newest_first=not oldest_first,
                                                 filter=audit_pb2.ChangeRecordFilter(target_id=target))
    records = call(ctx, lambda c: c.audit.ListChangeRecords(request)).records
    emit_rows([_record_row(r) for r in records], output, ["seq", "time", "type", "actor", "target", "summary"],
              raw=[as_dict(r) for r in records])


def _report(ok: bool, checked: int, broken: int, reason: str, message: str, last_seq: int, last_hash: str,
            output: Format, source: str, checkpoints: tuple[int, int] | None = None) -> None:
    out: dict[str, Any] = {"ok": ok, "source": source, "records_checked": checked, "last_sequence": last_seq,
                           "last_hash": last_hash}
    if checkpoints is not None:
        out.update({"checkpoints_checked": checkpoints[0], "last_checkpoint_sequence": checkpoints[1] or ""})
    out.update({"first_broken_sequence": broken or "", "reason": reason, "message": message})
    emit_object(out, output, title="audit chain")
    if not ok:
        raise typer.Exit(1)


@audit_app.command("verify")
def audit_verify(ctx: typer.Context,
                 file: Annotated[Path | None, typer.Option("--file", "-f", help="An export to verify offline")] = None,
                 checkpoints: Annotated[Path | None, typer.Option(
                     help="Kept signed checkpoints (JSON lines) the export must agree with")] = None,
                 public_key: Annotated[list[Path] | None, typer.Option(
                     help="The audit signing key (PEM) the checkpoints must verify with; repeatable")] = None,
                 output: Output = Format.table) -> None:
    """Verifies the hash chain: online (governance walks the trail, with its stored checkpoints),
    or offline with --file (an `arm audit export`, checked here with the same chain rules; with
    --checkpoints and --public-key also against signed checkpoints kept outside the database, so a
    history rewritten with every hash recomputed is caught). Exit 1 when it is broken."""
    if file is None and (checkpoints is not None or public_key):
        raise typer.BadParameter("--checkpoints and --public-key verify a --file offline", param_hint="--file")
    if checkpoints is not None and not public_key:
        raise typer.BadParameter("--checkpoints needs --public-key (from `arm audit key`)", param_hint="--public-key")
    if file is not None:
        try:
            keys = [load_public_key(p.read_bytes()) for p in public_key or []]
            lines = checkpoints.read_text(encoding="utf-8").splitlines() if checkpoints is not None else None
            with file.open() as f:
                report: ChainReport = (verify_records(parse_export_lines(f)) if lines is None
                                       else verify_export(parse_export_lines(f), lines, keys))
        except OSError as exc:
            raise typer.BadParameter(str(exc), param_hint="--file") from None
        except Exception as exc:  # a line that is not a change record or a checkpoint, a key that is no key
            raise _fail(f"Error: {file} (or its checkpoints or key) is not usable: {type(exc).__name__}: {exc}") from None
        _report(report.ok, report.records_checked, report.first_broken_sequence, report.reason, report.message,
                report.last_sequence, report.last_hash, output, f"file {file}",
                (report.checkpoints_checked, report.last_checkpoint_sequence) if lines is not None else None)
        return
    r = call(ctx, lambda c: c.audit.VerifyChain(audit_pb2.VerifyChainRequest()))
    reason = short_enum(audit_pb2.ChainBreak.Name(r.reason), "CHAIN_BREAK_") if r.reason else ""
    _report(r.ok, r.records_checked, r.first_broken_sequence, reason, r.message, r.last_sequence,
            r.last_hash, output, "governance", (r.checkpoints_checked, r.last_checkpoint_sequence))


@audit_app.command("export")
def audit_export(ctx: typer.Context,
                 file: Annotated[Path | None, typer.Option("--file", "-f", help="Write here (default stdout)")] = None,
                 checkpoints: Annotated[Path | None, typer.Option(
                     help="Also write the signed checkpoints here (JSON lines)")] = None,
                 public_key: Annotated[Path | None, typer.Option(
                     help="Also write the audit signing public key here (PEM)")] = None,
                 ) -> None:
    """Writes the tenant's trail as JSON lines, oldest first (verify it with `arm audit verify
    --file`), and with --checkpoints / --public-key what verifies it against signed checkpoints."""

    async def export(c: ArmClient) -> int:
        if checkpoints is not None:
            kept = await _checkpoints(c)
            checkpoints.write_text("".join(checkpoint_line(cp) for cp in kept), encoding="utf-8")
            sys.stderr.write(f"{len(kept)} checkpoints written to {checkpoints}\n")
        if public_key is not None:
            key = await c.audit.GetAuditSigningKey(audit_pb2.GetAuditSigningKeyRequest())
            public_key.write_text(key.public_key_pem, encoding="utf-8")
            sys.stderr.write(f"public key {key.key_id} written to {public_key}\n")
        count = 0
        out = file.open("wb") if file is not None else sys.stdout.buffer
        try:
            async for chunk in c.audit.ExportChangeRecords(audit_pb2.ExportChangeRecordsRequest()):
                out.write(chunk.data)
                count += chunk.record_count
        finally:
            if file is not None:
                out.close()
            else:
                out.flush()
        return count

    count = call(ctx, export)
    if file is not None:
        sys.stderr.write(f"{count} records written to {file}\n")


checkpoints_app = typer.Typer(help="Signed audit checkpoints: list, create.", no_args_is_help=True)
audit_app.add_typer(checkpoints_app, name="checkpoints")


async def _checkpoints(c: ArmClient) -> list[audit_pb2.AuditCheckpoint]:
    out: list[audit_pb2.AuditCheckpoint] = []
    token = ""
    while True:
        page = await c.audit.ListCheckpoints(audit_pb2.ListCheckpointsRequest(page_size=500, page_token=token))
        out += list(page.checkpoints)
        token = page.next_page_token
        if not token:
            return out


def _checkpoint_row(cp: audit_pb2.AuditCheckpoint) -> dict[str, Any]:
    return {"sequence": cp.sequence, "head_hash": cp.head_hash, "key": cp.key_id,
            "signed": cp.sign_time.ToDatetime().isoformat(timespec="seconds") + "Z" if cp.HasField("sign_time") else "",
            "tree_root": cp.tree_root}


@checkpoints_app.command("list")
def checkpoints_list(ctx: typer.Context,
                     file: Annotated[Path | None, typer.Option(
                         "--file", "-f", help="Write them as JSON lines (what `arm audit verify --checkpoints` reads)")] = None,
                     output: Output = Format.table) -> None:
    """The tenant's signed checkpoints, oldest first."""
    kept = call(ctx, _checkpoints)
    if file is not None:
        file.write_text("".join(checkpoint_line(cp) for cp in kept), encoding="utf-8")
        sys.stderr.write(f"{len(kept)} checkpoints written to {file}\n")
        return
    emit_rows([_checkpoint_row(cp) for cp in kept], output, ["sequence", "head_hash", "key", "signed", "tree_root"],
              raw=[as_dict(cp) for cp in kept])


@checkpoints_app.command("create")
def checkpoints_create(ctx: typer.Context, output: Output = Format.table) -> None:
    """Signs the trail's current head now (an unmoved head is not signed twice)."""
    r = call(ctx, lambda c: c.audit.CreateCheckpoint(audit_pb2.CreateCheckpointRequest()))
    emit_object({**_checkpoint_row(r.checkpoint), "created": r.created}, output,
                title="Checkpoint " + ("created" if r.created else "unchanged (head not moved)"), raw=as_dict(r))


@audit_app.command("key")
def audit_key(ctx: typer.Context,
              file: Annotated[Path | None, typer.Option("--file", "-f", help="Write the PEM here")] = None,
              output: Output = Format.table) -> None:
    """The public key governance signs checkpoints with (keep it with the checkpoints)."""
    k = call(ctx, lambda c: c.audit.GetAuditSigningKey(audit_pb2.GetAuditSigningKeyRequest()))
    if file is not None:
        file.write_text(k.public_key_pem, encoding="utf-8")
        sys.stderr.write(f"public key {k.key_id} written to {file}\n")
        return
    emit_object({"algorithm": k.algorithm, "key_id": k.key_id, "public_key_pem": k.public_key_pem}, output,
                title="audit signing key", raw={"algorithm": k.algorithm, "key_id": k.key_id,
                                                "public_key_pem": k.public_key_pem})


# The registry commands register themselves on `app`.
from arm_cli import fleet_cmds, policy_cmds, quick_cmds, registry_cmds, telemetry_cmds, webhook_cmds  # noqa: E402,F401


def main() -> None:
    """The console script: `arm …`."""
    app()


if __name__ == "__main__":
    main()
