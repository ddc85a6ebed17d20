"""gRPC servicer of the audit trail: validate, check permissions, delegate to `AuditTrail`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from arm.governance.v1 import audit_pb2, audit_pb2_grpc
from arm_common import merkle, pagination
from arm_common import validation as val
from arm_common.auth import current_principal
from arm_common.checkpoints import ALGORITHM, public_key_pem, raw_public_key, signature_problem
from arm_common.errors import FieldViolation, InvalidArgument, Violations
from arm_common.server import Ctx
from arm_governance.audit.checkpoints import Checkpoints
from arm_governance.audit.trail import MAX_APPEND, VALID_ACTORS, VALID_TYPES, AuditTrail, Filter, export_line
from arm_governance.edge import Session, idempotent_write

EXPORT_CHUNK = 500
MAX_KEPT_CHECKPOINTS = 10_000


def _filter(v: Violations, f: audit_pb2.ChangeRecordFilter, path: str) -> Filter:
    for i, t in enumerate(f.types):
        val.enum_set(v, f"{path}.types[{i}]", t, VALID_TYPES)
    if f.actor_type:
        val.enum_set(v, f"{path}.actor_type", f.actor_type, VALID_ACTORS)
    val.optional(v, f"{path}.target_type", f.target_type, 64)
    val.optional(v, f"{path}.target_id", f.target_id, 128)
    val.optional(v, f"{path}.actor_id", f.actor_id, 128)
    if f.HasField("start_time") and f.HasField("end_time") and \
            f.end_time.ToDatetime() <= f.start_time.ToDatetime():
        v.add(f"{path}.end_time", "must be after start_time")
    return Filter.of(f)


def _kept_checkpoints(v: Violations, request: audit_pb2.VerifyChainRequest, tenant: str,
                      keys: dict[str, Any]) -> list[audit_pb2.AuditCheckpoint]:
    """The caller's kept checkpoints, each its tenant's and signed by a trusted key."""
    if len(request.checkpoints) > MAX_KEPT_CHECKPOINTS:
        v.add("checkpoints", f"at most {MAX_KEPT_CHECKPOINTS} checkpoints")
        return []
    for i, cp in enumerate(request.checkpoints):
        if cp.tenant_id != tenant:
            v.add(f"checkpoints[{i}].tenant_id", "must be the caller's tenant")
        elif cp.key_id not in keys:
            v.add(f"checkpoints[{i}].key_id", "is not the key governance signs with (see GetAuditSigningKey)")
        elif (problem := signature_problem(cp, keys)) is not None:
            v.add(f"checkpoints[{i}].signature", problem)
    return list(request.checkpoints)


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, trail: AuditTrail, checkpoints: Checkpoints) -> None:
        self.trail = trail
        self.checkpoints = checkpoints

    async def AppendChangeRecords(self, request: audit_pb2.AppendChangeRecordsRequest, context: Ctx) -> Any:
        v = Violations()
        val.standard_fields(v, request)
        if not request.records:
            v.add("records", "at least one record is required")
        elif len(request.records) > MAX_APPEND:
            v.add("records", f"at most {MAX_APPEND} records per call")
        v.raise_if_any()
        p = current_principal()
        p.require("audit:write")
        records = list(request.records)

        async def write(s: Session) -> Any:
            results = await self.trail.append_in(s, records, caller_tenant=p.tenant_id,
                                                 any_tenant=p.system_tenant)
            return audit_pb2.AppendChangeRecordsResponse(results=results)

        return await idempotent_write(self.trail.db, p.tenant_id, "AppendChangeRecords", request,
                                      audit_pb2.AppendChangeRecordsResponse, write)

    async def GetChangeRecord(self, request: audit_pb2.GetChangeRecordRequest, context: Ctx) -> Any:
        v = Violations()
        val.resource_id(v, "record_id", request.record_id)
        v.raise_if_any()
        p = current_principal()
        p.require("audit:read")
        return audit_pb2.GetChangeRecordResponse(record=await self.trail.get(p.tenant_id, request.record_id))

    async def ListChangeRecords(self, request: audit_pb2.ListChangeRecordsRequest, context: Ctx) -> Any:
        v = Violations()
        val.standard_fields(v, request)
        flt = _filter(v, request.filter, "filter")
        v.raise_if_any()
        p = current_principal()
        p.require("audit:read")
        size = pagination.page_size(request.page_size)
        fingerprint = {**flt.fingerprint(), "newest_first": int(request.newest_first)}
        after = pagination.decode_token(request.page_token, fingerprint)
        if after is not None and not isinstance(after, int):
            raise InvalidArgument("page_token is malformed", reason="INVALID_PAGE_TOKEN",
                                  violations=[FieldViolation("page_token", "is malformed")])
        rows = await self.trail.page(p.tenant_id, flt, after=after, size=size + 1,
                                     newest_first=request.newest_first)
        page, more = pagination.split_page(rows, size)
        return audit_pb2.ListChangeRecordsResponse(
            records=page,
            next_page_token=pagination.encode_token(page[-1].sequence, fingerprint) if more and page else "")

    async def VerifyChain(self, request: audit_pb2.VerifyChainRequest, context: Ctx) -> Any:
        p = current_principal()
        p.require("audit:read")
        v = Violations()
        kept = _kept_checkpoints(v, request, p.tenant_id, self.checkpoints.keys)
        v.raise_if_any()
        report = await self.checkpoints.verify(p.tenant_id, kept)
        return audit_pb2.VerifyChainResponse(
            ok=report.ok, records_checked=report.records_checked,
            first_broken_sequence=report.first_broken_sequence,
            reason=audit_pb2.ChainBreak.Value(f"CHAIN_BREAK_{report.reason}") if report.reason else 0,
            message=report.message, last_sequence=report.last_sequence, last_hash=report.last_hash,
            checkpoints_checked=report.checkpoints_checked,
            last_checkpoint_sequence=report.last_checkpoint_sequence)

    async def CreateCheckpoint(self, request: audit_pb2.CreateCheckpointRequest, context: Ctx) -> Any:
        p = current_principal()
        p.require("audit:write")
        checkpoint, created = await self.checkpoints.create(p.tenant_id)
        return audit_pb2.CreateCheckpointResponse(checkpoint=checkpoint, created=created)

    async def ListCheckpoints(self, request: audit_pb2.ListCheckpointsRequest, context: Ctx) -> Any:
        p = current_principal()
        p.require("audit:read")
        size = pagination.page_size(request.page_size)
        after = pagination.decode_token(request.page_token, {})
        if after is not None and not (isinstance(after, list) and len(after) == 2
                                      and isinstance(after[0], int) and 0 <= after[0] < 2**63
                                      and isinstance(after[1], str) and after[1].isalnum()
                                      and len(after[1]) <= 16):
            raise InvalidArgument("page_token is malformed", reason="INVALID_PAGE_TOKEN",
                                  violations=[FieldViolation("page_token", "is malformed")])
        rows = await self.checkpoints.page(p.tenant_id, after=None if after is None else (after[0], after[1]),
                                           size=size + 1)
        page, more = pagination.split_page(rows, size)
        return audit_pb2.ListCheckpointsResponse(
            checkpoints=page,
            next_page_token=pagination.encode_token([page[-1].sequence, page[-1].key_id], {})
            if more and page else "")

    async def GetInclusionProof(self, request: audit_pb2.GetInclusionProofRequest, context: Ctx) -> Any:
        v = Violations()
        val.resource_id(v, "record_id", request.record_id)
        if request.tree_size < 1:
            v.add("tree_size", "must be at least 1 (a checkpoint's sequence)")
        v.raise_if_any()
        p = current_principal()
        p.require("audit:read")
        record = await self.trail.get(p.tenant_id, request.record_id)
        head = await self.trail.head(p.tenant_id)
        if request.tree_size > head:
            v.add("tree_size", f"must be at most the trail's {head} records")
        elif record.sequence > request.tree_size:
            v.add("tree_size", f"must be at least the record's sequence {record.sequence}")
        v.raise_if_any()
        ranges = merkle.inclusion_ranges(record.sequence - 1, request.tree_size)
        proof = await self.checkpoints.prove(p.tenant_id, ranges, request.tree_size)
        return audit_pb2.GetInclusionProofResponse(record=record, leaf_index=record.sequence - 1,
                                                   tree_size=request.tree_size, proof=proof)

    async def GetConsistencyProof(self, request: audit_pb2.GetConsistencyProofRequest, context: Ctx) -> Any:
        v = Violations()
        if request.first_size < 1:
            v.add("first_size", "must be at least 1")
        if request.second_size < max(request.first_size, 1):
            v.add("second_size", "must be at least first_size")
        v.raise_if_any()
        p = current_principal()
        p.require("audit:read")
        head = await self.trail.head(p.tenant_id)
        if request.second_size > head:
            v.add("second_size", f"must be at most the trail's {head} records")
        v.raise_if_any()
        ranges = merkle.consistency_ranges(request.first_size, request.second_size)
        proof = await self.checkpoints.prove(p.tenant_id, ranges, request.second_size)
        return audit_pb2.GetConsistencyProofResponse(proof=proof)

    async def GetAuditSigningKey(self, request: audit_pb2.GetAuditSigningKeyRequest, context: Ctx) -> Any:
        current_principal().require("audit:read")
        key = self.checkpoints.key
        return audit_pb2.GetAuditSigningKeyResponse(
            algorithm=ALGORITHM, key_id=key.key_id, public_key=raw_public_key(key.public),
            public_key_pem=public_key_pem(key.public))

    async def ExportChangeRecords(self, request: audit_pb2.ExportChangeRecordsRequest,
                                  context: Ctx) -> AsyncIterator[audit_pb2.ExportChangeRecordsResponse]:
        v = Violations()
        flt = _filter(v, request.filter, "filter")
        v.raise_if_any()
        p = current_principal()
        p.require("audit:read")
        async for batch in self.trail.scan(p.tenant_id, flt):
            for start in range(0, len(batch), EXPORT_CHUNK):
                chunk = batch[start:start + EXPORT_CHUNK]
                yield audit_pb2.ExportChangeRecordsResponse(
                    data="".join(export_line(r) for r in chunk).encode(), record_count=len(chunk))
