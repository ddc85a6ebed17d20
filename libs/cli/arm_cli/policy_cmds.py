"""`arm policy …`: policies as files (docs/policies.md).

- `apply -f DIR`: a plan (created / updated with a rule-level diff / unchanged / deactivated with
  `--prune`), then its writes, each guarded by the etag the plan read. `--dry-run` plans only;
  `--save-plan FILE` keeps the plan and `--plan FILE` applies exactly it later. A write that fails
  (another operator changed an envelope since the plan: ABORTED) undoes the writes already made,
  so a plan is applied whole or not at all.
- `export`: the live active envelopes in the same YAML form (export then apply is a no-op).
- `test DIR`: `*_test.yaml` files run offline with the engine governance uses (arm_engine).
"""

from __future__ import annotations

import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from google.protobuf import json_format

from arm.governance.v1 import policy_pb2
from arm.registry.v1 import agents_pb2, tenancy_pb2
from arm_cli import policy_files as pf
from arm_cli import policy_tests
from arm_cli.main import Output, app, call
from arm_cli.output import Format, console, emit_rows, print_error
from arm_cli.registry_cmds import pages, project_id, version
from arm_client.errors import Aborted, ArmError, from_rpc_error
from arm_client.stubs import ArmClient

policy_app = typer.Typer(help="Policies as files: apply, export, test (docs/policies.md).", no_args_is_help=True)
app.add_typer(policy_app, name="policy")

_SCOPE_KIND = {policy_pb2.POLICY_SCOPE_TENANT: "tenant", policy_pb2.POLICY_SCOPE_PROJECT: "project",
               policy_pb2.POLICY_SCOPE_VERSION: "version"}


class PlanConflict(ArmError):
    """The live envelopes changed since the plan was made; nothing of the plan is left applied."""

    default_reason = "POLICY_PLAN_CONFLICT"


@dataclass
class Action:
    """One write of a plan: create, update, deactivate (prune) or unchanged (no write)."""

    kind: str
    name: str
    envelope_id: str = ""
    etag: str = ""
    wanted: policy_pb2.PolicyEnvelope | None = None
    live: policy_pb2.PolicyEnvelope | None = None
    changes: list[str] = field(default_factory=list)
    risk: list[policy_pb2.RiskOverride] | None = None
    """For the tenant's risk overrides (name RISK_OVERRIDES): the wanted entries."""
    risk_live: list[policy_pb2.RiskOverride] | None = None
    triggers: list[policy_pb2.ArgumentTrigger] = field(default_factory=list)
    """For RISK_OVERRIDES: the wanted argument-trigger changes (and the live ones, for an undo)."""
    triggers_live: list[policy_pb2.ArgumentTrigger] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        def overrides(v: list[Any] | None) -> Any:
            return None if v is None else [json_format.MessageToDict(o) for o in v]
        return {"kind": self.kind, "name": self.name, "envelope_id": self.envelope_id, "etag": self.etag,
                "changes": self.changes,
                "wanted": json_format.MessageToDict(self.wanted) if self.wanted is not None else None,
                "live": json_format.MessageToDict(self.live) if self.live is not None else None,
                "risk": overrides(self.risk), "risk_live": overrides(self.risk_live),
                "triggers": overrides(self.triggers), "triggers_live": overrides(self.triggers_live)}

    @staticmethod
    def from_json(d: dict[str, Any]) -> Action:
        def env(v: Any) -> policy_pb2.PolicyEnvelope | None:
            return None if v is None else json_format.ParseDict(v, policy_pb2.PolicyEnvelope())

        def overrides(v: Any) -> list[policy_pb2.RiskOverride] | None:
            return None if v is None else [json_format.ParseDict(o, policy_pb2.RiskOverride()) for o in v]

        def triggers(v: Any) -> list[policy_pb2.ArgumentTrigger]:
            return [json_format.ParseDict(t, policy_pb2.ArgumentTrigger()) for t in v or []]
        return Action(d["kind"], d["name"], d.get("envelope_id", ""), d.get("etag", ""), env(d.get("wanted")),
                      env(d.get("live")), list(d.get("changes") or []), overrides(d.get("risk")),
                      overrides(d.get("risk_live")), triggers(d.get("triggers")), triggers(d.get("triggers_live")))


class Scopes:
    """Scope slugs ↔ ids for one tenant, looked up once each."""

    def __init__(self, c: ArmClient) -> None:
        self.c = c
        self._ids: dict[pf.ScopeRef, str] = {}
        self._refs: dict[tuple[int, str], pf.ScopeRef] = {}

    async def scope_id(self, ref: pf.ScopeRef) -> str:
        if ref not in self._ids:
            if ref.kind == "tenant":
                self._ids[ref] = ""
            elif ref.kind == "project":
                self._ids[ref] = await project_id(self.c, ref.ref)
            else:
                self._ids[ref] = str((await version(self.c, ref.ref, ref.project or None)).id)
        return self._ids[ref]

    async def ref(self, env: policy_pb2.PolicyEnvelope) -> pf.ScopeRef:
        key = (env.scope, env.scope_id)
        if key not in self._refs:
            kind = _SCOPE_KIND.get(env.scope, "tenant")
            if kind == "tenant":
                ref = pf.ScopeRef("tenant")
            elif kind == "project":
                p = (await self.c.tenancy.GetProject(tenancy_pb2.GetProjectRequest(id=env.scope_id))).project
                ref = pf.ScopeRef("project", p.slug)
            else:
                v = (await self.c.agents.GetAgentVersion(agents_pb2.GetAgentVersionRequest(id=env.scope_id))
                     ).agent_version
                t = (await self.c.agents.GetAgentTemplate(agents_pb2.GetAgentTemplateRequest(id=v.template_id))
                     ).agent_template
                p = (await self.c.tenancy.GetProject(tenancy_pb2.GetProjectRequest(id=t.project_id))).project
                ref = pf.ScopeRef("version", f"{t.slug}@{v.number}", p.slug)  # unambiguous on re-apply
            self._refs[key] = ref
        return self._refs[key]


async def live_envelopes(c: ArmClient) -> list[policy_pb2.PolicyEnvelope]:
    """Every envelope of the caller's tenant, active or not (names are unique among them all)."""
    return await pages(lambda t: c.policies.ListPolicyEnvelopes(policy_pb2.ListPolicyEnvelopesRequest(
        page_size=500, page_token=t)), "envelopes")


RISK_OVERRIDES = "(risk overrides)"


async def plan(c: ArmClient, specs: list[pf.Spec], *, prune: bool,
               risk: pf.RiskSpec | None = None) -> list[Action]:
    """What applying `specs` (and the risk overrides, when the files have them) would do, from
    the live envelopes read now (their etags kept)."""
    scopes = Scopes(c)
    live = {e.name: e for e in await live_envelopes(c)}
    out: list[Action] = []
    if risk is not None:
        cur = (await c.policies.GetRiskOverrides(policy_pb2.GetRiskOverridesRequest())).risk_overrides
        changes = risk_changes(pf.risk_from_proto(cur), risk)
        out.append(Action("update" if changes else "unchanged", RISK_OVERRIDES, etag=cur.etag or "0",
                          changes=changes, risk=pf.risk_overrides_to_proto(risk.overrides),
                          risk_live=list(cur.overrides), triggers=pf.argument_triggers_to_proto(risk.triggers),
                          triggers_live=list(cur.argument_triggers)))
    for spec in specs:
        wanted = pf.to_proto(spec, await scopes.scope_id(spec.scope))
        cur = live.get(spec.name)
        if cur is None:
            out.append(Action("create", spec.name, wanted=wanted, changes=[f"+ rule: {pf.rule_line(r)}"
                                                                           for r in spec.tool_rules]))
            continue
        have = pf.from_proto(cur, await scopes.ref(cur))
        changes = pf.diff(have, spec)
        out.append(Action("update" if changes else "unchanged", spec.name, cur.envelope_id, cur.etag,
                          wanted if changes else None, cur, changes))
    if prune:
        covered = {s.scope for s in specs}
        names = {s.name for s in specs}
        for cur in live.values():
            active = cur.active if cur.HasField("active") else True
            if active and cur.name not in names and await scopes.ref(cur) in covered:
                out.append(Action("deactivate", cur.name, cur.envelope_id, cur.etag, live=cur,
                                  changes=[f"~ active: True → False (not in the files; scope {await scopes.ref(cur)})"]))
    return out


def risk_changes(have: pf.RiskSpec, want: pf.RiskSpec) -> list[str]:
    """The plan lines of the risk overrides: entries removed (-) and added (+)."""
    if have == want:
        return []

    def override(o: dict[str, Any]) -> str:
        bounds = " ".join(f"{k}<{v:g}" for k, v in o["arguments_below"])
        return f"{o['tool']} → {o['risk']}" + (f" when {bounds}" if bounds else "")

    def trigger(t: dict[str, Any]) -> str:
        if t["disabled"]:
            return f"{t['label']} disabled"
        return t["label"] + (f" /{t['pattern']}/" if t["pattern"] else "") + f" → {t['risk']}"
    changes = [f"- override: {override(o)}" for o in have.overrides if o not in want.overrides] + [
        f"+ override: {override(o)}" for o in want.overrides if o not in have.overrides]
    changes += [f"- trigger: {trigger(t)}" for t in have.triggers if t not in want.triggers] + [
        f"+ trigger: {trigger(t)}" for t in want.triggers if t not in have.triggers]
    return changes or ["~ order of the overrides or triggers"]


async def execute(c: ArmClient, actions: list[Action], reason: str) -> list[str]:
    """Applies the writes of a plan in order (updates, deactivations, then creates), each with the
    etag its plan read; on any failure undoes the writes already made and raises (a conflict as
    PlanConflict). Returns the ids written."""
    order = {"update": 0, "deactivate": 1, "create": 2}
    todo = sorted((a for a in actions if a.kind in order), key=lambda a: order[a.kind])
    done: list[tuple[Action, policy_pb2.PolicyEnvelope]] = []
    try:
        for a in todo:
            rid = str(uuid.uuid4())
            if a.risk is not None:
                rr = await c.policies.SetRiskOverrides(policy_pb2.SetRiskOverridesRequest(
                    request_id=rid, overrides=a.risk, argument_triggers=a.triggers, etag=a.etag, reason=reason))
                done.append((a, policy_pb2.PolicyEnvelope(etag=rr.risk_overrides.etag)))
                continue
            if a.kind == "create":
                assert a.wanted is not None
                r = await c.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(
                    request_id=rid, envelope=a.wanted, reason=reason))
            elif a.kind == "update":
                assert a.wanted is not None
                w = policy_pb2.PolicyEnvelope()
                w.CopyFrom(a.wanted)
                w.envelope_id = a.envelope_id
                r = await c.policies.UpdatePolicyEnvelope(policy_pb2.UpdatePolicyEnvelopeRequest(
                    request_id=rid, envelope=w, etag=a.etag, reason=reason))
            else:
                r = await c.policies.DeactivatePolicyEnvelope(policy_pb2.DeactivatePolicyEnvelopeRequest(
                    request_id=rid, envelope_id=a.envelope_id, etag=a.etag, reason=reason))
            done.append((a, r.envelope))
    except (ArmError, grpc.aio.AioRpcError) as exc:
        err = from_rpc_error(exc) if isinstance(exc, grpc.aio.AioRpcError) else exc
        undone = await _undo(c, done, reason)
        failed = todo[len(done)]
        if isinstance(err, Aborted):
            raise PlanConflict(
                f"envelope {failed.name!r} changed since the plan was made (another operator edited it); "
                f"{undone} — plan again and review the new diff", code=err.code,
                request_id=err.request_id) from None
        err.message = f"{err.message} (while applying {failed.kind} of {failed.name!r}; {undone})"
        raise err from None
    return [env.envelope_id for _, env in done]


async def _undo(c: ArmClient, done: list[tuple[Action, policy_pb2.PolicyEnvelope]], reason: str) -> str:
    """Puts back what a failed plan wrote, newest first; says what it did."""
    failed: list[str] = []
    for a, written in reversed(done):
        try:
            if a.risk is not None:
                await c.policies.SetRiskOverrides(policy_pb2.SetRiskOverridesRequest(
                    request_id=str(uuid.uuid4()), overrides=a.risk_live, argument_triggers=a.triggers_live,
                    etag=written.etag,
                    reason=f"undo: {reason}"))
            elif a.kind == "create":
                await c.policies.DeactivatePolicyEnvelope(policy_pb2.DeactivatePolicyEnvelopeRequest(
                    request_id=str(uuid.uuid4()), envelope_id=written.envelope_id, etag=written.etag,
                    reason=f"undo: {reason}"))
            else:
                assert a.live is not None
                back = policy_pb2.PolicyEnvelope()
                back.CopyFrom(a.live)
                await c.policies.UpdatePolicyEnvelope(policy_pb2.UpdatePolicyEnvelopeRequest(
                    request_id=str(uuid.uuid4()), envelope=back, etag=written.etag, reason=f"undo: {reason}"))
        except (ArmError, grpc.aio.AioRpcError) as exc:
            err = from_rpc_error(exc) if isinstance(exc, grpc.aio.AioRpcError) else exc
            failed.append(f"{a.name}: {err.message}")
    if not done:
        return "nothing was written"
    if failed:
        return "the undo of the earlier writes FAILED for " + "; ".join(failed)
    return f"the {len(done)} earlier write(s) were undone, nothing is left half-applied"


def print_plan(actions: list[Action], fmt: Format) -> None:
    if fmt is not Format.table:
        emit_rows([], fmt, [], raw=[{"action": a.kind, "name": a.name, "envelope_id": a.envelope_id,
                                     "changes": a.changes} for a in actions])
        return
    out = console()
    marks = {"create": "+", "update": "~", "deactivate": "-", "unchanged": "="}
    for a in actions:
        out.print(f"{marks[a.kind]} {a.kind:<10} {a.name}" + (f"  ({a.envelope_id})" if a.envelope_id else ""),
                  markup=False)
        for line in a.changes:
            out.print(f"      {line}", markup=False)
    counts = {k: sum(1 for a in actions if a.kind == k) for k in marks}
    out.print(f"Plan: {counts['create']} to create, {counts['update']} to update, "
              f"{counts['deactivate']} to deactivate, {counts['unchanged']} unchanged.", markup=False)


def _load_all(path: Path) -> tuple[list[pf.Spec], pf.RiskSpec | None]:
    try:
        return pf.load_all(path)
    except pf.FileError as exc:
        print_error(f"Error: {exc}")
        raise typer.Exit(2) from None


@policy_app.command("apply")
def apply_cmd(ctx: typer.Context,
              files: Annotated[Path | None, typer.Option("--file", "-f", help="Policy file or folder")] = None,
              prune: Annotated[bool, typer.Option(help="Deactivate envelopes of the files' scopes that "
                                                       "the files do not name")] = False,
              dry_run: Annotated[bool, typer.Option("--dry-run", help="Show the plan, write nothing")] = False,
              save_plan: Annotated[Path | None, typer.Option(help="Write the plan (with etags) here")] = None,
              plan_file: Annotated[Path | None, typer.Option("--plan", help="Apply a saved plan exactly")] = None,
              reason: Annotated[str, typer.Option(help="Reason stored with each revision")] = "arm policy apply",
              output: Output = Format.table) -> None:
    """Makes the live envelopes what the files say: shows the plan, then applies it with etags."""
    if (files is None) == (plan_file is None):
        raise typer.BadParameter("give exactly one of --file and --plan", param_hint="--file")
    if plan_file is not None:
        try:
            actions = [Action.from_json(d) for d in json.loads(plan_file.read_text())]
        except (OSError, ValueError, KeyError, json_format.ParseError) as exc:
            raise typer.BadParameter(f"not a saved plan: {exc}", param_hint="--plan") from None
    else:
        assert files is not None
        specs, risk = _load_all(files)
        actions = call(ctx, lambda c: plan(c, specs, prune=prune, risk=risk))
    print_plan(actions, output)
    if save_plan is not None:
        save_plan.write_text(json.dumps([a.to_json() for a in actions], indent=1))
    if dry_run or not any(a.kind != "unchanged" for a in actions):
        if output is Format.table:
            console().print("Nothing to do." if not dry_run else "Dry run: nothing written.")
        return
    ids = call(ctx, lambda c: execute(c, actions, reason))
    if output is Format.table:
        console().print(f"Applied: {len(ids)} envelope(s) written.")


@policy_app.command("export")
def export_cmd(ctx: typer.Context,
               out: Annotated[Path | None, typer.Option("--out", help="File to write (default stdout)")] = None,
               ) -> None:
    """Writes the live active envelopes (and the tenant's risk overrides and argument triggers) as
    policy files."""
    async def go(c: ArmClient) -> tuple[list[pf.Spec], pf.RiskSpec]:
        scopes = Scopes(c)
        envs = [e for e in await live_envelopes(c) if (e.active if e.HasField("active") else True)]
        envs.sort(key=lambda e: (e.scope, e.name))
        risk = (await c.policies.GetRiskOverrides(policy_pb2.GetRiskOverridesRequest())).risk_overrides
        return [pf.from_proto(e, await scopes.ref(e)) for e in envs], pf.risk_from_proto(risk)

    specs, risk = call(ctx, go)
    text = pf.dump(specs, risk)
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)


@policy_app.command("test")
def test_cmd(ctx: typer.Context,
             path: Annotated[Path, typer.Argument(help="Folder of policies and *_test.yaml files")],
             junit: Annotated[Path | None, typer.Option(help="Write JUnit XML here")] = None,
             server: Annotated[bool, typer.Option("--server", help="Decide on the live governance of the "
                                                  "context (EvaluatePolicy: nothing logged) instead")] = False,
             output: Output = Format.table) -> None:
    """Runs the `*_test.yaml` cases offline with the engine governance uses (or, with --server, on
    governance itself); exit 1 on a failure."""
    try:
        policy_tests.load_suite(path)  # file errors first, as usage errors (exit 2)
    except (pf.FileError, policy_tests.TestFileError) as exc:
        print_error(f"Error: {exc}")
        raise typer.Exit(2) from None
    if server:
        results = call(ctx, lambda c: policy_tests.run_server(path, c.decisions))
    else:
        results = policy_tests.run_offline(path)
    policy_tests.report(results, output)
    if junit is not None:
        junit.write_text(policy_tests.junit_xml(results))
    if any(not r.passed for r in results):
        raise typer.Exit(1)
