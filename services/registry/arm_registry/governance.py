"""The registry's questions to governance, over gRPC only (ARM_GOVERNANCE_ADDRESS; the all-in-one
server uses its own address): the ACTIVE deployment of a template in an environment, and
approvals that authorise a transition. Calls carry the caller's own key, so governance applies
the caller's tenant and permissions. Without an address, or when governance cannot answer, the
registry refuses (fails closed): nothing that needs a check is waved through."""

from __future__ import annotations

from datetime import UTC, datetime

import grpc

from arm.governance.v1 import approvals_pb2, approvals_pb2_grpc, deployments_pb2, deployments_pb2_grpc
from arm_common import tls
from arm_common.errors import FailedPrecondition, NotFound, PermissionDenied, Unavailable

_TIMEOUT_S = 5


class Governance:
    def __init__(self, address: str | None, tls_settings: tls.TlsSettings | None = None) -> None:
        self.address: str | None = None
        self.tls = tls_settings
        self.channel: grpc.aio.Channel | None = None
        if address:
            self.connect(address)

    def connect(self, address: str) -> None:
        """Points the registry at governance (the all-in-one server calls this once bound)."""
        self.address = address
        self.channel = tls.open_channel(address, self.tls)
        self.approvals = approvals_pb2_grpc.ApprovalServiceStub(self.channel)
        self.deployments = deployments_pb2_grpc.DeploymentServiceStub(self.channel)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()

    def _require(self, what: str, reason: str) -> None:
        if self.channel is None:
            raise FailedPrecondition(
                f"{what}, and the registry has no governance to ask (ARM_GOVERNANCE_ADDRESS is unset)",
                reason=reason, metadata={"setting": "ARM_GOVERNANCE_ADDRESS"})

    @staticmethod
    def _md(api_key: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {api_key}"),)

    async def active_version(self, api_key: str, template_id: str, environment_id: str) -> str | None:
        """Target version of the template's ACTIVE deployment in the environment; None when there
        is none."""
        self._require("the environment requires an active deployment", "DEPLOYMENT_CHECK_UNAVAILABLE")
        try:
            resp = await self.deployments.GetActiveDeployment(
                deployments_pb2.GetActiveDeploymentRequest(template_id=template_id, environment_id=environment_id),
                metadata=self._md(api_key), timeout=_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                raise PermissionDenied(f"governance refused the deployment check: {exc.details()}",
                                       reason="DEPLOYMENT_CHECK_DENIED") from None
            raise Unavailable(f"governance could not check the active deployment ({exc.code().name}); "
                              "refusing rather than skipping the check", reason="DEPLOYMENT_CHECK_UNAVAILABLE",
                              retry_delay_s=1) from None
        return resp.deployment.target_version_id

    async def approved(self, api_key: str, approval_id: str, action_type: int, *, instance_id: str = "",
                       version_id: str = "") -> approvals_pb2.Approval:
        """The approval, when it is an APPROVED, unexpired approval of this type for this
        instance or version; otherwise FAILED_PRECONDITION saying what is wrong."""
        action = approvals_pb2.ApprovalActionType.Name(action_type).removeprefix("APPROVAL_ACTION_TYPE_")
        self._require(f"this transition needs an approved {action} approval", "APPROVAL_CHECK_UNAVAILABLE")
        try:
            resp = await self.approvals.GetApproval(approvals_pb2.GetApprovalRequest(approval_id=approval_id),
                                                    metadata=self._md(api_key), timeout=_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound.of("approval", approval_id) from None
            if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                raise PermissionDenied(f"governance refused to show the approval: {exc.details()}",
                                       reason="APPROVAL_NOT_READABLE") from None
            raise Unavailable(f"governance could not check the approval ({exc.code().name}); refusing "
                              "rather than skipping the check", reason="APPROVAL_CHECK_UNAVAILABLE",
                              retry_delay_s=1) from None
        a = resp.approval
        meta = {"approval_id": approval_id, "action_type": action}
        if a.action_type != action_type or (instance_id and a.instance_id != instance_id) or (
                version_id and a.version_id != version_id):
            raise FailedPrecondition(f"approval {approval_id} is not an {action} approval for this "
                                     f"{'instance' if instance_id else 'version'}",
                                     reason="APPROVAL_MISMATCH", metadata=meta)
        if a.status != approvals_pb2.APPROVAL_STATUS_APPROVED:
            status = approvals_pb2.ApprovalStatus.Name(a.status).removeprefix("APPROVAL_STATUS_")
            raise FailedPrecondition(f"approval {approval_id} is {status}, not APPROVED",
                                     reason="APPROVAL_NOT_APPROVED", metadata={**meta, "status": status})
        if a.expire_time.ToDatetime(tzinfo=UTC) <= datetime.now(UTC):
            raise FailedPrecondition(f"approval {approval_id} expired", reason="APPROVAL_EXPIRED", metadata=meta)
        return a
