"""Local decisions in the SDK (issue 16, part 2) against real servers, SQLite and PostgreSQL:
local and remote decisions agree over random policies and calls (hypothesis); a kill switch set
through the API stops local ALLOWs in every subscribed runtime; a lost inputs stream sends calls
to Check (and, Check unreachable too, fails closed); shipping under a governance outage keeps the
decisions in the bounded spool (past its bound, calls go to Check) and loses none; kill -9 of a
runtime mid-burst, then a restart: every decision it acted on is logged exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

from arm.governance.v1 import decision_pb2, policy_pb2
from arm.registry.v1 import access_pb2
from arm_client import Arm, ArmError, GovernanceUnavailable
from arm_client.local import Spool, SpoolError
from arm_governance import models
from tests.client.conftest import Agent, make_agent
from tests.helpers import expect_failure
from tests.processes import base_env, spawn

EXAMPLES = max(2, int(os.environ.get("ARM_FUZZ_EXAMPLES", "12")))


async def until(predicate: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 60) -> None:
    """Bounded wait (a failure names what never happened; no timing is asserted)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never happened within {timeout_s} s: {what}")


class Proxy:
    """A TCP proxy to `target` on 127.0.0.1 that can be cut (every connection closed, no new
    ones) and restored on the same port: a network outage between a runtime and governance."""

    def __init__(self, target: str) -> None:
        self.host, port = target.rsplit(":", 1)
        self.port = int(port)
        self.listen_port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.listen_port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.listen_port)
        self.listen_port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.port)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.close()
        await self._server.wait_closed()

    async def restore(self) -> None:
        await self.start()


def envelope_set(arm: Arm) -> set[tuple[str, int]]:
    local = arm.local
    assert local is not None
    inputs = local._inputs
    return set() if inputs is None else {
        (e.id, e.revision) for e in (*inputs.policy.envelopes, *inputs.policy.shadow_envelopes)}


# --- local and remote agree -------------------------------------------------------------------

TOOLS = ["files.read", "files.delete", "payments.send", "deploy.prod.api", "search.web", "shell.exec"]
GLOBS = ["files.*", "**", "payments.send", "deploy.**", "search.web", "*.read", "shell.*", "*.*"]
ARGUMENTS = [None, {}, {"path": "/tmp/x"}, {"cmd": "rm -rf /"}, {"amount": 10}, {"amount": 5000},
             {"token": "secret-abc", "n": 1.5}, {"env": "production"}]
PATTERNS = ["secret", "rm -rf", "amount", "prod"]
effects = st.sampled_from([policy_pb2.DECISION_ALLOW, policy_pb2.DECISION_DENY, policy_pb2.DECISION_NEEDS_APPROVAL])
risks = st.integers(0, 4)


@st.composite
def tool_rules(draw: Any, lockable: bool) -> policy_pb2.ToolRule:
    rule = policy_pb2.ToolRule(tool=draw(st.sampled_from(GLOBS)), effect=draw(effects),
                               description=draw(st.sampled_from(["", "a rule"])))
    if lockable and rule.effect != policy_pb2.DECISION_ALLOW:
        rule.locked = draw(st.booleans())
    rule.when.min_risk = draw(risks)  # type: ignore[assignment]
    rule.when.environments.extend(draw(st.lists(st.sampled_from(["DEV", "PROD", "other"]), max_size=2)))
    rule.when.arg_patterns.extend(draw(st.lists(st.sampled_from(PATTERNS), max_size=2)))
    return rule


@st.composite
def envelopes(draw: Any, scope: int) -> policy_pb2.PolicyEnvelope:
    env = policy_pb2.PolicyEnvelope(
        name=f"prop-{scope}", scope=scope, mode=draw(st.sampled_from(  # type: ignore[arg-type]
            [policy_pb2.POLICY_MODE_ENFORCE] * 3 + [policy_pb2.POLICY_MODE_SHADOW])), active=True,
        tool_rules=draw(st.lists(tool_rules(scope != policy_pb2.POLICY_SCOPE_VERSION), max_size=4)),
        require_approval_at_risk=draw(risks), deny_at_risk=draw(risks),
        default_effect=draw(st.sampled_from([0, policy_pb2.DECISION_ALLOW, policy_pb2.DECISION_DENY])))
    if draw(st.booleans()):
        env.autonomy_tier = draw(st.integers(0, 3))
    return env


calls = st.lists(st.tuples(st.sampled_from(TOOLS), st.sampled_from(range(len(ARGUMENTS))), risks),
                 min_size=4, max_size=10)
corpus = st.tuples(envelopes(policy_pb2.POLICY_SCOPE_VERSION), envelopes(policy_pb2.POLICY_SCOPE_PROJECT),
                   st.booleans(), calls)


def examples(backend: str) -> list[Any]:
    out: list[Any] = []

    @settings(max_examples=EXAMPLES if backend == "sqlite" else max(2, EXAMPLES // 3), database=None,
              deadline=None, suppress_health_check=list(HealthCheck))
    @given(corpus)
    def collect(example: Any) -> None:
        out.append(example)

    collect()
    # One fixed example first: whatever the random draws, both paths are exercised (an ALLOW
    # decided locally, a NEEDS_APPROVAL left to Check).
    both = policy_pb2.PolicyEnvelope(
        name="fixed", scope=policy_pb2.POLICY_SCOPE_VERSION, mode=policy_pb2.POLICY_MODE_ENFORCE, active=True,
        default_effect=policy_pb2.DECISION_ALLOW,
        tool_rules=[policy_pb2.ToolRule(tool="payments.send", effect=policy_pb2.DECISION_NEEDS_APPROVAL)])
    plain = policy_pb2.PolicyEnvelope(name="fixed", scope=policy_pb2.POLICY_SCOPE_PROJECT,
                                      mode=policy_pb2.POLICY_MODE_ENFORCE, active=True)
    return [(both, plain, False, [("search.web", 0, 0), ("payments.send", 4, 0), ("files.read", 2, 1)]), *out]


def comparable(resp: decision_pb2.CheckResponse) -> decision_pb2.CheckResponse:
    out = decision_pb2.CheckResponse()
    out.CopyFrom(resp)
    for name in ("decision_id", "decide_time", "request_id", "approval_id"):
        out.ClearField(name)  # type: ignore[arg-type]
    return out


async def test_local_and_remote_decisions_agree(agent: Agent, tmp_path: Path) -> None:
    """The same engine on the same inputs: over random envelopes (version and project scope, some
    SHADOW, locked rules, risk thresholds, patterns, environments, tiers, defaults) and random
    calls, the runtime's local answer is Check's answer field by field (a NEEDS_APPROVAL locally
    is "ask Check", which answers NEEDS_APPROVAL)."""
    local_arm = agent.arm(local_decisions=True, local_spool_dir=str(tmp_path))
    remote_arm = agent.arm()
    assert await local_arm.wait_local_ready()
    local = local_arm.local
    assert local is not None
    scope_ids = {policy_pb2.POLICY_SCOPE_VERSION: agent.agents.version.id,
                 policy_pb2.POLICY_SCOPE_PROJECT: agent.agents.project.id}
    live: list[str] = []
    compared = locally = 0
    for version_env, project_env, overrides, call_list in examples(agent.governance.backend):
        for envelope_id in live:
            await agent.admin.policies.DeactivatePolicyEnvelope(
                policy_pb2.DeactivatePolicyEnvelopeRequest(envelope_id=envelope_id, reason="next example"))
        live, expected = [], set()
        for env in (version_env, project_env):
            env.scope_id = scope_ids[env.scope]
            env.name = f"prop-{env.scope}-{compared}"
            created = (await agent.admin.policies.CreatePolicyEnvelope(
                policy_pb2.CreatePolicyEnvelopeRequest(envelope=env))).envelope
            live.append(created.envelope_id)
            expected.add((created.envelope_id, created.revision))
        await agent.admin.policies.SetRiskOverrides(policy_pb2.SetRiskOverridesRequest(overrides=[
            policy_pb2.RiskOverride(tool="files.*", risk=4, arguments_below={"amount": 100})] if overrides else [],
            argument_triggers=[  # the tenant's triggers reach the runtime too: one disabled, one added
                policy_pb2.ArgumentTrigger(label="secret", disabled=True),
                policy_pb2.ArgumentTrigger(label="large path", pattern=r"/tmp/", risk=4)] if overrides else []))

        epoch = (await agent.governance.component.cache.tenant(agent.tenant.tenant.id)).epoch

        async def current(expected: set[tuple[str, int]] = expected, epoch: int = epoch) -> bool:
            inputs = local._inputs
            return envelope_set(local_arm) == expected and inputs is not None and inputs.epoch == epoch
        await until(current, "the runtime received the example's envelopes and overrides")
        for tool, arg_index, declared in call_list:
            args = ARGUMENTS[arg_index]
            request = decision_pb2.CheckRequest(tool_name=tool, declared_risk=declared,  # type: ignore[arg-type]
                                                instance_id=agent.instance_id, tool_call_id=f"tc-{compared}")
            if args is not None:
                request.arguments.update(args)
            decided = await local.decide(request)
            mine = decided[0] if decided is not None else None
            theirs = await agent.admin.decisions.Check(request)
            compared += 1
            if mine is None:
                assert theirs.decision == policy_pb2.DECISION_NEEDS_APPROVAL, (tool, args, theirs)
                continue
            locally += 1
            assert comparable(mine) == comparable(theirs), (tool, args, declared)
    assert locally and compared > locally, "the corpus never exercised both paths"
    del remote_arm
    assert await local.drain(60)


async def test_budgets_are_decided_locally_from_the_streamed_spend(agent: Agent, tmp_path: Path) -> None:
    """A budget applies: the runtime decides from the ledger totals governance streams for the
    instance (UTC day, month, per run), renewed on every spend governance records, and agrees
    with Check on either side of each limit; a snapshot of another UTC day, or a run an
    incomplete snapshot does not list, goes to Check."""
    await agent.admin.policies.CreatePolicyEnvelope(policy_pb2.CreatePolicyEnvelopeRequest(
        envelope=policy_pb2.PolicyEnvelope(
            name="budgets", scope=policy_pb2.POLICY_SCOPE_VERSION, scope_id=agent.agents.version.id,
            mode=policy_pb2.POLICY_MODE_ENFORCE, active=True, default_effect=policy_pb2.DECISION_ALLOW,
            budgets=policy_pb2.Budgets(per_run_usd=5, daily_usd=20, monthly_usd=1000))))
    arm = agent.arm(local_decisions=True, local_spool_dir=str(tmp_path))
    assert await arm.wait_local_ready()
    local = arm.local
    assert local is not None

    def spent(day_usd: float, run_usd: dict[str, float]) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            inputs = local._inputs
            return (inputs is not None and inputs.spend is not None and inputs.spend.day_usd == day_usd
                    and dict(inputs.spend.run_usd) == run_usd)
        return check

    async def report(amount: float, run_id: str) -> None:
        await agent.admin.decisions.ReportSpend(decision_pb2.ReportSpendRequest(entry=decision_pb2.SpendEntry(
            instance_id=agent.instance_id, run_id=run_id, amount_usd=amount,
            idempotency_key=secrets.token_hex(8))))

    async def both(cost: float, run_id: str) -> decision_pb2.CheckResponse | None:
        """The local answer (None: Check's to give), after asserting it is Check's."""
        request = decision_pb2.CheckRequest(tool_name="search.web", instance_id=agent.instance_id,
                                            estimated_cost_usd=cost, run_id=run_id, tool_call_id="tc")
        decided = await local.decide(request)
        theirs = await agent.admin.decisions.Check(request)
        if decided is not None:
            assert comparable(decided[0]) == comparable(theirs), (cost, run_id)
            return decided[0]
        return None

    await until(spent(0.0, {}), "the runtime received the budgets' (empty) spend")
    answer = await both(4.5, "r1")
    assert answer is not None and answer.decision == policy_pb2.DECISION_ALLOW
    await report(4.0, "r1")
    await until(spent(4.0, {"r1": 4.0}), "the recorded spend reached the runtime")
    for cost, run_id, effect in [(2.0, "r1", policy_pb2.DECISION_DENY),  # over the run's $5
                                 (1.0, "r1", policy_pb2.DECISION_ALLOW),  # exactly at it
                                 (2.0, "r2", policy_pb2.DECISION_ALLOW)]:  # a run with no spend
        answer = await both(cost, run_id)
        assert answer is not None and answer.decision == effect, (cost, run_id, answer)
    await report(15.0, "r2")
    await until(spent(19.0, {"r1": 4.0, "r2": 15.0}), "the second spend reached the runtime")
    answer = await both(2.0, "r3")  # over the day's $20
    assert answer is not None and answer.decision == policy_pb2.DECISION_DENY
    assert answer.reasons[0].code == "BUDGET_EXCEEDED" and "daily" in answer.reasons[0].message, answer

    inputs = local._inputs
    assert inputs is not None and inputs.spend is not None
    other_day = decision_pb2.AgentSpend()
    other_day.CopyFrom(inputs.spend)
    other_day.day = "2000-01-01"
    incomplete = decision_pb2.AgentSpend()
    incomplete.CopyFrom(inputs.spend)
    incomplete.runs_complete = False
    local._inputs = dataclasses.replace(inputs, spend=other_day)
    assert await both(0.5, "r1") is None
    local._inputs = dataclasses.replace(inputs, spend=incomplete)
    assert await both(0.5, "r9") is None  # not listed: its spend is not known here
    answer = await both(0.5, "r1")  # listed
    assert answer is not None and answer.decision == policy_pb2.DECISION_ALLOW
    assert await local.drain(60)


# --- kill switch, stream loss -----------------------------------------------------------------

async def test_kill_switch_stops_local_allows_in_every_runtime(agent: Agent, tmp_path: Path) -> None:
    """Three `Arm`s and an `ArmSync` (its own loop and thread) subscribed for one instance."""
    runtimes = [agent.arm(local_decisions=True, local_spool_dir=str(tmp_path / str(i))) for i in range(3)]
    sync = agent.arm_sync(local_decisions=True, local_spool_dir=str(tmp_path / "sync"))
    assert await asyncio.to_thread(sync.submit, sync.arm.wait_local_ready())
    checks: list[Callable[[], Awaitable[Any]]] = [
        *(lambda arm=arm: arm.check("files.read", risk="LOW") for arm in runtimes),
        lambda: asyncio.to_thread(sync.check, "files.read", risk="LOW")]
    runtimes.append(sync.arm)
    for arm, check in zip(runtimes, checks, strict=True):
        if arm is not sync.arm:  # (the ArmSync's was awaited on its own loop above)
            assert await arm.wait_local_ready()
        decision = await check()
        assert decision.allowed and arm.local is not None and arm.local.local == 1
    await agent.admin.policies.SetOperatorControl(policy_pb2.SetOperatorControlRequest(
        scope=policy_pb2.OPERATOR_CONTROL_SCOPE_TENANT, mode=policy_pb2.OPERATOR_CONTROL_MODE_PAUSED,
        reason="stop everything"))
    try:
        for arm, check in zip(runtimes, checks, strict=True):
            async def stopped(check: Callable[[], Awaitable[Any]] = check) -> bool:
                decision = await check()
                return bool(decision.denied and decision.response is not None
                            and decision.response.step == decision_pb2.DECISION_STEP_KILL_SWITCH)
            await until(stopped, "a paused tenant's runtime stops allowing locally")
            assert arm.local is not None and arm.local.remote == 0  # decided locally, as DENY
    finally:
        await agent.admin.policies.SetOperatorControl(policy_pb2.SetOperatorControlRequest(
            scope=policy_pb2.OPERATOR_CONTROL_SCOPE_TENANT, mode=policy_pb2.OPERATOR_CONTROL_MODE_NORMAL,
            reason="resume"))
    for arm in runtimes[:-1]:
        assert arm.local is not None and await arm.local.drain(60)
    assert await asyncio.to_thread(sync.submit, sync.arm.local.drain(60))  # type: ignore[union-attr]
    # Every local decision, the DENYs included, is in the log with its POLICY_DENIED record.
    d = models.DecisionRecord

    async def denied(s: Any) -> int:
        return int((await s.execute(select(func.count()).select_from(d).where(
            d.instance_id == agent.instance_id, d.decision == policy_pb2.DECISION_DENY))).scalar_one())
    assert await agent.governance.db.read(denied) >= len(runtimes)


async def test_stream_loss_falls_back_to_check_and_fails_closed(agent: Agent, tmp_path: Path) -> None:
    stream = Proxy(agent.governance.address)
    await stream.start()
    arm = agent.arm(local_decisions=True, local_spool_dir=str(tmp_path), local_inputs_address=stream.address,
                    local_stale_after_s=0.5, local_heartbeat_ms=100)
    assert await arm.wait_local_ready()
    local = arm.local
    assert local is not None
    assert (await arm.check("files.read", risk="LOW")).allowed and local.local == 1
    await stream.cut()
    await until(lambda: _async(not local.live), "the runtime notices its inputs are stale")
    decision = await arm.check("files.read", risk="LOW")
    assert decision.allowed and local.local == 1 and local.remote == 1  # Check decided it
    d = models.DecisionRecord

    async def logged(s: Any) -> bool:
        return (await s.execute(select(d.id).where(d.id == decision.decision_id))).scalar_one_or_none() is not None
    assert await agent.governance.db.read(logged)  # logged before Check answered
    await stream.restore()
    await until(lambda: _async(local.live), "the stream reconnects")
    assert (await arm.check("files.read", risk="LOW")).allowed and local.local == 2

    # Check unreachable too: fail closed.
    everything = Proxy(agent.governance.address)
    await everything.start()
    env = {**agent.env(), "ARM_GOVERNANCE_ADDRESS": everything.address}
    cut_off = Arm(env=env, local_decisions=True, local_spool_dir=str(tmp_path / "b"),
                  local_stale_after_s=0.5, local_heartbeat_ms=100, timeout_s=1, close_timeout_s=0.1)
    try:
        assert await cut_off.wait_local_ready()
        await everything.cut()
        assert cut_off.local is not None
        await until(lambda: _async(not cut_off.local.live), "the runtime notices its inputs are stale")  # type: ignore[union-attr]
        with pytest.raises(GovernanceUnavailable):
            await cut_off.check("files.read", risk="LOW")
    finally:
        await cut_off.close()


async def _async(value: bool) -> bool:
    return value


# --- outage and crash -------------------------------------------------------------------------

async def test_shipping_under_outage_is_bounded_and_loses_nothing(agent: Agent, tmp_path: Path) -> None:
    """RecordLocalDecisions unreachable (the inputs stream still up): decisions wait in the spool;
    at its bound calls go to Check (unreachable too: fail closed); once governance is back every
    spooled decision is logged, exactly once."""
    rpc = Proxy(agent.governance.address)
    await rpc.start()
    env = {**agent.env(), "ARM_GOVERNANCE_ADDRESS": rpc.address}
    arm = Arm(env=env, local_decisions=True, local_spool_dir=str(tmp_path), local_max_spool=40,
              local_inputs_address=agent.governance.address, timeout_s=1, close_timeout_s=30)
    try:
        assert await arm.wait_local_ready()
        local = arm.local
        assert local is not None
        await rpc.cut()
        ids = []
        for i in range(40):
            decision = await arm.check("files.read", {"i": i}, risk="LOW")
            assert decision.allowed
            ids.append(decision.decision_id)
        assert local.spool.pending == 40 and local.shipped == 0
        with pytest.raises(GovernanceUnavailable):  # the bound: Check, which is unreachable
            await arm.check("files.read", risk="LOW")
        assert local.local == 40 and local.spool.pending == 40
        await rpc.restore()
        assert await local.drain(60)
        assert (await arm.check("files.read", risk="LOW")).allowed and local.local == 41
    finally:
        await arm.close()
    assert await logged_counts(agent, ids) == dict.fromkeys(ids, 1)


async def logged_counts(agent: Agent, ids: list[str]) -> dict[str, int]:
    """How often each id is in governance's decision log."""
    d = models.DecisionRecord

    async def read(s: Any, chunk: list[str]) -> dict[str, int]:
        rows = (await s.execute(select(d.id, func.count()).where(d.id.in_(chunk)).group_by(d.id))).all()
        return {row[0]: int(row[1]) for row in rows}
    counts: dict[str, int] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        counts.update(await agent.governance.db.read(lambda s, chunk=chunk: read(s, chunk)))  # type: ignore[misc]
    return counts


async def test_kill_9_mid_burst_loses_no_decision(agent: Agent, tmp_path: Path) -> None:
    env = base_env(**agent.env(), ARM_SPOOL_DIR=str(tmp_path / "spool"))
    log = tmp_path / "runtime.log"
    proc = spawn("tests.client.local_runtime", "burst", env=env, log=log)
    try:
        async def acted() -> bool:
            assert proc.poll() is None, log.read_text()
            return len(_acted_on(log)) >= 300
        await until(acted, "the runtime acted on 300 local decisions")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    ids = _acted_on(log)
    restart = spawn("tests.client.local_runtime", "replay", env=env, log=tmp_path / "replay.log")
    # The servers run on this event loop: wait without blocking it.
    await until(lambda: _async(restart.poll() is not None), "the restarted runtime shipped its spool", 120)
    assert restart.returncode == 0, (tmp_path / "replay.log").read_text()
    counts = await logged_counts(agent, ids)
    assert counts == dict.fromkeys(ids, 1), f"{len(ids) - len(counts)} of {len(ids)} acted-on decisions not logged"


async def test_spool_reads_back_what_a_crash_left_up_to_a_torn_tail_and_is_one_process_s(tmp_path: Path) -> None:
    """The spool's file format on its own (kill -9 is the test above): records written are read
    back on open, a torn record at a segment's end (a power loss mid-write) ends that segment
    without losing the records before it, a second process cannot open the same spool, and
    acknowledged segments are deleted."""
    first = Spool(tmp_path / "s", segment_bytes=64)
    await first.open()
    bodies = [f"decision {i}".encode() * 3 for i in range(5)]
    for body in bodies:
        first.append(body)
    assert first.pending == 5 and len(list((tmp_path / "s").glob("*.log"))) > 1  # rolled
    second = Spool(tmp_path / "s")
    with pytest.raises(SpoolError, match="in use"):
        await second.open()
    await first.close()
    last = max((tmp_path / "s").glob("*.log"))
    with last.open("ab") as f:
        f.write(b"\x40\x00\x00\x00\x01\x02\x03\x04torn")
    again = Spool(tmp_path / "s")
    await again.open()
    try:
        records = again.take(100)
        assert [body for _, body in records] == bodies and again.pending == 5
        again.acknowledge(records)
        assert again.pending == 0
        assert len(list((tmp_path / "s").glob("*.log"))) == 1  # only the new, active segment
    finally:
        await again.close()


def _acted_on(log: Path) -> list[str]:
    return re.findall(r"^ACTED (dec_\w+)\n", log.read_text(), re.MULTILINE)


# --- the RPCs' edges ----------------------------------------------------------------------------

def _decision(instance_id: str, **response: Any) -> decision_pb2.LocalDecision:
    resp = decision_pb2.CheckResponse(**{"decision": policy_pb2.DECISION_ALLOW, "effective_risk": 1,
                                         "step": decision_pb2.DECISION_STEP_BASELINE, **response})
    resp.decide_time.GetCurrentTime()
    return decision_pb2.LocalDecision(
        decision_id=f"dec_{secrets.token_hex(12)}", response=resp,
        request=decision_pb2.CheckRequest(instance_id=instance_id, tool_name="files.read", tool_call_id="tc-1"))


async def test_record_local_decisions_validates_checks_the_caller_and_is_idempotent(agent: Agent) -> None:
    client = agent.governance.client(agent.key)
    good = _decision(agent.instance_id)
    first = await client.decisions.RecordLocalDecisions(decision_pb2.RecordLocalDecisionsRequest(decisions=[good]))
    again = await client.decisions.RecordLocalDecisions(decision_pb2.RecordLocalDecisionsRequest(
        decisions=[good, good]))
    assert (first.recorded, first.duplicates, again.recorded, again.duplicates) == (1, 0, 0, 2)
    assert await logged_counts(agent, [good.decision_id]) == {good.decision_id: 1}

    bad = _decision(agent.instance_id, decision=policy_pb2.DECISION_NEEDS_APPROVAL)
    bad.decision_id = "not-an-id"
    bad.request.approval_id = "apr_1"
    got = await expect_failure(client.decisions.RecordLocalDecisions(
        decision_pb2.RecordLocalDecisionsRequest(decisions=[good, bad])), grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_FIELDS")
    assert {"decisions[1].decision_id", "decisions[1].response.decision",
            "decisions[1].request.approval_id"} <= set(got.violations)
    await expect_failure(client.decisions.RecordLocalDecisions(decision_pb2.RecordLocalDecisionsRequest()),
                         grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELDS")
    long = _decision(agent.instance_id)
    long.decision_id = "dec_" + "x" * 61  # 65 characters: more than the decision log's ids hold
    got = await expect_failure(client.decisions.RecordLocalDecisions(decision_pb2.RecordLocalDecisionsRequest(
        decisions=[long])), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_FIELDS")
    assert "decisions[0].decision_id" in got.violations
    # What the generic edge check names (checked here per item, each distinct result part once).
    odd = _decision(agent.instance_id, scope_id="a\x00b")
    odd.request.arguments.update({"k\x00": 1, "n": float("nan")})
    odd.response.decide_time.seconds = 253_402_300_800
    got = await expect_failure(client.decisions.RecordLocalDecisions(
        decision_pb2.RecordLocalDecisionsRequest(decisions=[good, odd, odd])), grpc.StatusCode.INVALID_ARGUMENT)
    assert {"decisions[1].request.arguments", "decisions[1].request.arguments.n", "decisions[1].response.scope_id",
            "decisions[2].response.scope_id", "decisions[1].response.decide_time"} <= set(got.violations), got.violations

    # Another agent's key, or an operator's, may not record (nor watch) this instance's decisions.
    other = await make_agent(agent.tenant, agent.governance, agent.telemetry)
    try:
        for key in (other.key, agent.tenant.admin_key):
            c = agent.governance.client(key)
            await expect_failure(c.decisions.RecordLocalDecisions(decision_pb2.RecordLocalDecisionsRequest(
                decisions=[_decision(agent.instance_id)])), grpc.StatusCode.PERMISSION_DENIED)
            stream = c.decisions.WatchDecisionInputs(decision_pb2.WatchDecisionInputsRequest(
                instance_id=agent.instance_id))
            await expect_failure(_first(stream), grpc.StatusCode.PERMISSION_DENIED)
            await c.close()
    finally:
        await other.admin.close()
        for approver in other.approvers:
            await approver.close()
    await client.close()


async def _first(stream: Any) -> Any:
    async for message in stream:
        return message
    return None


async def test_a_revoked_key_ends_the_inputs_stream(agent: Agent, tmp_path: Path) -> None:
    """The stream outlives its authentication: revoking the key ends it, so the runtime stops
    deciding locally (and Check refuses the key)."""
    created = await agent.tenant.admin.access.CreateApiKey(access_pb2.CreateApiKeyRequest(
        instance_id=agent.instance_id))
    arm = Arm(env={**agent.env(), "ARM_API_KEY": created.secret}, local_decisions=True,
              local_spool_dir=str(tmp_path), local_stale_after_s=0.5, local_heartbeat_ms=100, close_timeout_s=0.1)
    try:
        assert await arm.wait_local_ready()
        local = arm.local
        assert local is not None
        assert (await arm.check("files.read", risk="LOW")).allowed and local.local == 1
        await agent.tenant.admin.access.RevokeApiKey(access_pb2.RevokeApiKeyRequest(id=created.api_key.id))
        await until(lambda: _async(not local.live), "the revoked key's inputs stream ends")
        with pytest.raises(ArmError):
            await arm.check("files.read", risk="LOW")
        assert local.local == 1
    finally:
        await arm.close()
