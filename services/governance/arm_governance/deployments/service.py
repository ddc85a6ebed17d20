"""Deployments: which version of a template is live in an environment. Create (target must be
APPROVED), activate (PROD needs an approved DEPLOYMENT_ACTIVATION approval; retires only the
same template's ACTIVE deployment there) and roll back (the current one goes ROLLING_BACK →
RETIRED, a new ACTIVE one targets the previous version, the template's instances there are
rebound to it through the registry's gRPC API).

Rollback spans two services, so it runs in three idempotent steps: (1) mark the current
deployment ROLLING_BACK and create its ACTIVE successor; (2) ask the registry to rebind (keyed by
the successor's id, so a repeat does nothing twice); (3) retire the rolled-back deployment and
write DEPLOYMENT_ROLLED_BACK. A failure after (1) leaves the deployment ROLLING_BACK; calling
RollbackDeployment on it again resumes at (2)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from arm.common.v1 import common_pb2
from arm.governance.v1 import approvals_pb2 as apb
from arm.governance.v1 import deployments_pb2 as dpb
from arm.registry.v1 import agents_pb2, tenancy_pb2
from arm_common import pagination
from arm_common import validation as val
from arm_common.auth import Principal, actor_of
from arm_common.change_records import change_record
from arm_common.db import Database
from arm_common.errors import (
    Aborted,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Violations,
)
from arm_common.ids import new_id
from arm_common.messages import ts
from arm_common.outbox import TOPIC_CHANGE_RECORD, enqueue
from arm_common.tables import utcnow
from arm_governance import models
from arm_governance.approvals.service import ApprovalStore
from arm_governance.models import OUTBOX

CR = common_pb2.ChangeRecordType
D = dpb.DeploymentStatus
_ROLLOUTS = {0, 1, 2, 3}


def status_name(status: int) -> str:
    return D.Name(status).removeprefix("DEPLOYMENT_STATUS_")


def active_key(tenant_id: str, template_id: str, environment_id: str) -> str:
    return f"{tenant_id}/{template_id}/{environment_id}"


def to_proto(row: models.Deployment) -> dpb.Deployment:
    return dpb.Deployment.FromString(row.body)


def validate_create(r: dpb.CreateDeploymentRequest) -> None:
    v = Violations()
    val.standard_fields(v, r)
    d = r.deployment
    val.resource_id(v, "deployment.template_id", d.template_id)
    val.resource_id(v, "deployment.environment_id", d.environment_id)
    val.resource_id(v, "deployment.target_version_id", d.target_version_id)
    if d.rollout_policy not in _ROLLOUTS:
        v.add("deployment.rollout_policy", f"unknown enum value {d.rollout_policy}")
    if d.rollout_policy == dpb.ROLLOUT_POLICY_CANARY and not 1 <= d.canary_percent <= 100:
        v.add("deployment.canary_percent", "must be 1 to 100 for CANARY")
    if d.rollout_policy == dpb.ROLLOUT_POLICY_ROLLING and d.batch_size < 1:
        v.add("deployment.batch_size", "must be at least 1 for ROLLING")
    if d.canary_percent < 0 or d.canary_percent > 100:
        v.add("deployment.canary_percent", "must be 0 to 100")
    if d.batch_size < 0:
        v.add("deployment.batch_size", "must not be negative")
    v.raise_if_any("the deployment is invalid")


def validate_id_request(r: Any, *names: str) -> None:
    v = Violations()
    val.standard_fields(v, r)
    for name in names:
        val.resource_id(v, name, getattr(r, name))
    if "approval_id" in r.DESCRIPTOR.fields_by_name:
        val.resource_id(v, "approval_id", r.approval_id, required_=False)
    v.raise_if_any()


def validate_list(r: dpb.ListDeploymentsRequest) -> None:
    v = Violations()
    val.standard_fields(v, r)
    val.resource_id(v, "template_id", r.template_id, required_=False)
    val.resource_id(v, "environment_id", r.environment_id, required_=False)
    for i, status in enumerate(r.statuses):
        val.enum_set(v, f"statuses[{i}]", status, set(D.values()) - {0})
    v.raise_if_any()


class DeploymentStore:
    """Deployments of a tenant. The reads own their session and return messages; the writes take
    the session of the caller's idempotent write (`edge.Writes`), and private `_x(s, ...)` methods
    are what both combine."""

    def __init__(self, db: Database, approvals: ApprovalStore) -> None:
        self.db = db
        self.approvals = approvals

    # reads: each owns its session

    async def get(self, tenant_id: str, deployment_id: str) -> dpb.Deployment:
        async def read(s: AsyncSession) -> dpb.Deployment:
            return to_proto(await self._row(s, tenant_id, deployment_id))
        return await self.db.read(read)

    async def get_active(self, tenant_id: str, template_id: str, environment_id: str) -> dpb.Deployment:
        """The template's ACTIVE deployment in the environment; NOT_FOUND NO_ACTIVE_DEPLOYMENT
        when there is none."""
        async def read(s: AsyncSession) -> dpb.Deployment:
            row = await self._active_row(s, tenant_id, template_id, environment_id)
            if row is None:
                raise NotFound(f"template {template_id} has no ACTIVE deployment in environment "
                               f"{environment_id}", reason="NO_ACTIVE_DEPLOYMENT",
                               metadata={"template_id": template_id, "environment_id": environment_id})
            return to_proto(row)
        return await self.db.read(read)

    async def list(self, p: Principal, r: dpb.ListDeploymentsRequest) -> dpb.ListDeploymentsResponse:
        return await self.db.read(lambda s: self._list(s, p, r))

    async def activation_environment(self, tenant_id: str, request: dpb.ActivateDeploymentRequest) -> str:
        """The environment the deployment activates in; NOT_FOUND unless the deployment, and the
        approval when one is named, are the tenant's."""
        async def read(s: AsyncSession) -> str:
            row = await self._row(s, tenant_id, request.deployment_id)
            if request.approval_id:
                await ApprovalStore.check_exists(s, tenant_id, request.approval_id)
            return row.environment_id
        return await self.db.read(read)

    @classmethod
    async def project_and_version(cls, s: AsyncSession, tenant_id: str, deployment_id: str) -> tuple[str, str]:
        """The deployment's project and target version; NOT_FOUND unless it is the tenant's. Takes
        the caller's session, as `ApprovalStore.check_exists` does, for other domains' checks."""
        row = await cls._row(s, tenant_id, deployment_id)
        return row.project_id, row.target_version_id

    # writes and what they combine: each takes the caller's session

    @staticmethod
    async def _row(s: AsyncSession, tenant_id: str, deployment_id: str, *,
                   for_update: bool = False) -> models.Deployment:
        q = select(models.Deployment).where(models.Deployment.id == deployment_id,
                                            models.Deployment.tenant_id == tenant_id)
        if for_update:
            q = q.with_for_update()
        row = (await s.execute(q)).scalar_one_or_none()
        if row is None:
            raise NotFound.of("deployment", deployment_id)
        return row

    @staticmethod
    async def _active_row(s: AsyncSession, tenant_id: str, template_id: str, environment_id: str, *,
                          for_update: bool = False) -> models.Deployment | None:
        q = select(models.Deployment).where(
            models.Deployment.active_key == active_key(tenant_id, template_id, environment_id))
        if for_update:
            q = q.with_for_update()
        return (await s.execute(q)).scalar_one_or_none()

    @staticmethod
    def _save(row: models.Deployment, d: dpb.Deployment, now: datetime) -> None:
        row.revision += 1
        d.etag = str(row.revision)
        d.update_time.CopyFrom(ts(now))
        row.status = d.status
        row.active_key = active_key(row.tenant_id, row.template_id, row.environment_id) \
            if d.status == D.DEPLOYMENT_STATUS_ACTIVE else None
        row.previous_version_id = d.previous_version_id
        row.approval_id = d.approval_id
        row.updated_at = now
        row.body = d.SerializeToString()

    @staticmethod
    async def _record(s: AsyncSession, p: Principal, type_: int, d: dpb.Deployment, summary: str, *,
                     reason: str = "", before: dict[str, Any] | None = None,
                     payload: dict[str, Any] | None = None) -> None:
        rec = change_record(
            type_, tenant_id=p.tenant_id, actor=actor_of(p), target_type="deployment",
            target_id=d.deployment_id, template_id=d.template_id, version_id=d.target_version_id,
            summary=summary, reason=reason, before=before,
            after={"status": status_name(d.status), "target_version_id": d.target_version_id,
                   "previous_version_id": d.previous_version_id},
            payload={"environment_id": d.environment_id, **(payload or {})}, source="governance")
        await enqueue(s, OUTBOX, topic=TOPIC_CHANGE_RECORD, tenant_id=p.tenant_id,
                      message_id=rec.record_id, message=rec)

    @staticmethod
    def _insert(s: AsyncSession, p: Principal, d: dpb.Deployment, project_id: str, now: datetime) -> None:
        d.deployment_id = new_id("dep")
        d.tenant_id = p.tenant_id
        d.create_time.CopyFrom(ts(now))
        d.update_time.CopyFrom(ts(now))
        d.etag = "1"
        s.add(models.Deployment(
            id=d.deployment_id, tenant_id=p.tenant_id, template_id=d.template_id,
            environment_id=d.environment_id, project_id=project_id, target_version_id=d.target_version_id,
            previous_version_id=d.previous_version_id, status=d.status, rollback_of=d.rollback_of,
            approval_id=d.approval_id,
            active_key=active_key(p.tenant_id, d.template_id, d.environment_id)
            if d.status == D.DEPLOYMENT_STATUS_ACTIVE else None,
            body=d.SerializeToString(), created_at=now, updated_at=now, revision=1))

    # --- create --------------------------------------------------------------------------------

    async def create(self, s: AsyncSession, p: Principal, r: dpb.CreateDeploymentRequest,
                     version: agents_pb2.AgentVersion) -> dpb.Deployment:
        src = r.deployment
        p.require("deployments:write", project_id=version.project_id, environment_id=src.environment_id)
        if version.template_id != src.template_id:
            raise InvalidArgument("the target version belongs to another template", reason="INVALID_FIELDS",
                                  violations=[FieldViolation("deployment.target_version_id",
                                                             "must be a version of deployment.template_id")])
        if version.state != agents_pb2.VERSION_STATE_APPROVED:
            state = agents_pb2.VersionState.Name(version.state).removeprefix("VERSION_STATE_")
            raise FailedPrecondition(f"deployments need an APPROVED version; version {version.number} is {state}",
                                     reason="VERSION_NOT_APPROVED",
                                     metadata={"version_id": version.id, "version_state": state})
        now = utcnow()
        current = await self._active_row(s, p.tenant_id, src.template_id, src.environment_id)
        d = dpb.Deployment(
            template_id=src.template_id, environment_id=src.environment_id,
            target_version_id=src.target_version_id,
            previous_version_id=current.target_version_id if current is not None else "",
            rollout_policy=src.rollout_policy or dpb.ROLLOUT_POLICY_ALL_AT_ONCE,
            canary_percent=src.canary_percent, batch_size=src.batch_size,
            status=D.DEPLOYMENT_STATUS_PENDING, created_by=actor_of(p))
        self._insert(s, p, d, version.project_id, now)
        await self._record(s, p, CR.CHANGE_RECORD_TYPE_DEPLOYMENT_CREATED, d,
                          f"deployment of version {version.number} created", reason=r.reason)
        return d

    # --- activate ------------------------------------------------------------------------------

    async def activate(self, s: AsyncSession, p: Principal, r: dpb.ActivateDeploymentRequest,
                       environment: tenancy_pb2.Environment) -> dpb.ActivateDeploymentResponse:
        row = await self._row(s, p.tenant_id, r.deployment_id, for_update=True)
        p.require("deployments:activate", project_id=row.project_id, environment_id=row.environment_id)
        if r.etag and r.etag != str(row.revision):
            raise Aborted(f"etag {r.etag!r} does not match the current {row.revision}; re-read and retry",
                          reason="ETAG_MISMATCH", metadata={"current_etag": str(row.revision)})
        if row.status != D.DEPLOYMENT_STATUS_PENDING:
            raise FailedPrecondition(f"only PENDING deployments are activated; this one is {status_name(row.status)}",
                                     reason="DEPLOYMENT_NOT_PENDING", metadata={"status": status_name(row.status)})
        d = to_proto(row)
        if environment.type == tenancy_pb2.ENVIRONMENT_TYPE_PROD:
            if not r.approval_id:
                raise FailedPrecondition(
                    "activating in a PROD environment needs an approved DEPLOYMENT_ACTIVATION approval "
                    "for this deployment (approval_id)", reason="APPROVAL_REQUIRED",
                    metadata={"action_type": "DEPLOYMENT_ACTIVATION", "deployment_id": row.id})
            approval = await self.approvals.approved_for(
                s, p.tenant_id, r.approval_id, apb.APPROVAL_ACTION_TYPE_DEPLOYMENT_ACTIVATION, row.id)
            d.approval_id = approval.id
            body = apb.Approval.FromString(approval.body)
            approver = next((x.operator_id for x in body.decisions
                             if x.verdict == apb.APPROVAL_VERDICT_APPROVE), "")
            d.approved_by.CopyFrom(common_pb2.Actor(type=common_pb2.ACTOR_TYPE_OPERATOR, id=approver))
        now = utcnow()
        retired = None
        current = await self._active_row(s, p.tenant_id, row.template_id, row.environment_id, for_update=True)
        if current is not None:
            retired = to_proto(current)
            retired.status = D.DEPLOYMENT_STATUS_RETIRED
            retired.retire_time.CopyFrom(ts(now))
            self._save(current, retired, now)
            await s.flush()  # frees the ACTIVE slot (unique active_key) before it is taken
            d.previous_version_id = current.target_version_id
        d.status = D.DEPLOYMENT_STATUS_ACTIVE
        d.activate_time.CopyFrom(ts(now))
        self._save(row, d, now)
        await self._record(s, p, CR.CHANGE_RECORD_TYPE_DEPLOYMENT_ACTIVATED, d, "deployment activated",
                          reason=r.reason, before={"status": "PENDING"},
                          payload={"retired_deployment_id": retired.deployment_id if retired else "",
                                   "approval_id": d.approval_id})
        resp = dpb.ActivateDeploymentResponse(deployment=d)
        if retired is not None:
            resp.retired_deployment.CopyFrom(retired)
        return resp

    # --- rollback ------------------------------------------------------------------------------

    async def begin_rollback(self, s: AsyncSession, p: Principal, r: dpb.RollbackDeploymentRequest
                             ) -> dpb.RollbackDeploymentResponse:
        """Step 1: ACTIVE → ROLLING_BACK plus the ACTIVE successor; on a ROLLING_BACK deployment
        (an interrupted rollback) returns the successor made then."""
        row = await self._row(s, p.tenant_id, r.deployment_id, for_update=True)
        p.require("deployments:write", project_id=row.project_id, environment_id=row.environment_id)
        if r.etag and r.etag != str(row.revision):
            raise Aborted(f"etag {r.etag!r} does not match the current {row.revision}; re-read and retry",
                          reason="ETAG_MISMATCH", metadata={"current_etag": str(row.revision)})
        if row.status == D.DEPLOYMENT_STATUS_ROLLING_BACK:
            successor = (await s.execute(select(models.Deployment).where(
                models.Deployment.tenant_id == p.tenant_id,
                models.Deployment.rollback_of == row.id))).scalar_one()
            return dpb.RollbackDeploymentResponse(deployment=to_proto(successor),
                                                  rolled_back_deployment=to_proto(row))
        if row.status != D.DEPLOYMENT_STATUS_ACTIVE:
            raise FailedPrecondition(f"only ACTIVE deployments roll back; this one is {status_name(row.status)}",
                                     reason="DEPLOYMENT_NOT_ACTIVE", metadata={"status": status_name(row.status)})
        if not row.previous_version_id:
            raise FailedPrecondition("this deployment has no previous version to roll back to",
                                     reason="NO_PREVIOUS_VERSION", metadata={"deployment_id": row.id})
        now = utcnow()
        old = to_proto(row)
        old.status = D.DEPLOYMENT_STATUS_ROLLING_BACK
        self._save(row, old, now)
        await s.flush()
        new = dpb.Deployment(
            template_id=row.template_id, environment_id=row.environment_id,
            target_version_id=row.previous_version_id, previous_version_id=row.target_version_id,
            rollout_policy=dpb.ROLLOUT_POLICY_ALL_AT_ONCE, status=D.DEPLOYMENT_STATUS_ACTIVE,
            rollback_of=row.id, created_by=actor_of(p), activate_time=ts(now))
        self._insert(s, p, new, row.project_id, now)
        return dpb.RollbackDeploymentResponse(deployment=new, rolled_back_deployment=old)

    async def finish_rollback(self, s: AsyncSession, p: Principal, r: dpb.RollbackDeploymentRequest,
                              successor_id: str, rebound: int) -> dpb.RollbackDeploymentResponse:
        """Step 3: ROLLING_BACK → RETIRED and DEPLOYMENT_ROLLED_BACK."""
        row = await self._row(s, p.tenant_id, r.deployment_id, for_update=True)
        successor = await self._row(s, p.tenant_id, successor_id)
        old = to_proto(row)
        if row.status == D.DEPLOYMENT_STATUS_ROLLING_BACK:
            now = utcnow()
            old.status = D.DEPLOYMENT_STATUS_RETIRED
            old.retire_time.CopyFrom(ts(now))
            self._save(row, old, now)
            await self._record(s, p, CR.CHANGE_RECORD_TYPE_DEPLOYMENT_ROLLED_BACK, old,
                              "deployment rolled back", reason=r.reason, before={"status": "ACTIVE"},
                              payload={"new_deployment_id": successor_id,
                                       "rolled_back_to_version_id": successor.target_version_id,
                                       "rebound_instance_count": rebound})
        return dpb.RollbackDeploymentResponse(deployment=to_proto(successor), rolled_back_deployment=old,
                                              rebound_instance_count=rebound)

    async def _list(self, s: AsyncSession, p: Principal, r: dpb.ListDeploymentsRequest) -> dpb.ListDeploymentsResponse:
        size = pagination.page_size(r.page_size)
        filters = {"template": r.template_id, "environment": r.environment_id, "statuses": sorted(r.statuses)}
        after = pagination.decode_time_id_token(r.page_token, filters)
        m = models.Deployment
        q = select(m).where(m.tenant_id == p.tenant_id)
        if r.template_id:
            q = q.where(m.template_id == r.template_id)
        if r.environment_id:
            q = q.where(m.environment_id == r.environment_id)
        if r.statuses:
            q = q.where(m.status.in_(list(r.statuses)))
        rows = (await s.execute(pagination.newest_first_page(q, m.created_at, m.id, after, size))).scalars().all()
        page, more = pagination.split_page(rows, size)
        return dpb.ListDeploymentsResponse(deployments=[to_proto(x) for x in page],
                                           next_page_token=pagination.time_id_token(page, more, filters))
