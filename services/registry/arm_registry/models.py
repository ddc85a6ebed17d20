"""Registry tables (SQLAlchemy ORM). Converted to protobuf in convert.py only."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Index, Integer, MetaData, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from arm_common.tables import NAMING_CONVENTION, UtcDateTime, add_shared_tables


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UtcDateTime, dict[str, Any]: JSON, list[str]: JSON}


add_shared_tables(Base.metadata)
OUTBOX = Base.metadata.tables["outbox_messages"]
IDEMPOTENCY = Base.metadata.tables["idempotency_keys"]


class Stamped:
    """Creation/update times and the etag (a revision counter) every mutable resource has."""

    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    revision: Mapped[int] = mapped_column(Integer, default=1)


class Tenant(Stamped, Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    slug: Mapped[str] = mapped_column(String(63), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    system: Mapped[bool] = mapped_column(Boolean, default=False)


class Environment(Stamped, Base):
    __tablename__ = "environments"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    type: Mapped[str] = mapped_column(String(16))
    require_active_deployment: Mapped[bool] = mapped_column(Boolean, default=False)


class Project(Stamped, Base):
    __tablename__ = "projects"
    __table_args__ = (UniqueConstraint("tenant_id", "slug"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    slug: Mapped[str] = mapped_column(String(63))
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")


class Operator(Stamped, Base):
    __tablename__ = "operators"
    __table_args__ = (UniqueConstraint("tenant_id", "email"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    email: Mapped[str] = mapped_column(String(254))
    name: Mapped[str] = mapped_column(String(200))
    external_subject: Mapped[str] = mapped_column(String(200), default="")
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class Role(Base):
    __tablename__ = "roles"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    description: Mapped[str] = mapped_column(Text, default="")
    permissions: Mapped[list[str]]
    built_in: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime]


class RoleAssignment(Base):
    __tablename__ = "role_assignments"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    operator_id: Mapped[str] = mapped_column(ForeignKey("operators.id"), index=True)
    role_id: Mapped[str] = mapped_column(ForeignKey("roles.id"))
    scope_type: Mapped[str] = mapped_column(String(16))
    scope_id: Mapped[str] = mapped_column(String(64), default="")
    expires_at: Mapped[datetime | None]
    created_at: Mapped[datetime]


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    operator_id: Mapped[str | None] = mapped_column(ForeignKey("operators.id"))
    instance_id: Mapped[str | None] = mapped_column(ForeignKey("agent_instances.id"))
    key_hash: Mapped[str] = mapped_column(String(64))
    display_name: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    parent_key_id: Mapped[str | None] = mapped_column(String(64), index=True, default=None)
    """For a session key (CreateSessionKey): the key it was made from; revoked with it."""


class AgentTemplate(Stamped, Base):
    __tablename__ = "agent_templates"
    __table_args__ = (UniqueConstraint("tenant_id", "slug"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), index=True)
    slug: Mapped[str] = mapped_column(String(63))
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    owners: Mapped[list[str]]
    tags: Mapped[list[str]]
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    version_count: Mapped[int] = mapped_column(Integer, default=0)


class AgentVersion(Stamped, Base):
    __tablename__ = "agent_versions"
    __table_args__ = (UniqueConstraint("template_id", "number"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    template_id: Mapped[str] = mapped_column(ForeignKey("agent_templates.id"), index=True)
    project_id: Mapped[str] = mapped_column(String(64))
    number: Mapped[int] = mapped_column(Integer)
    genome_json: Mapped[str] = mapped_column(Text)  # canonical JSON text, hashed as stored
    genome_hash: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    eval_status: Mapped[str] = mapped_column(String(16))
    eval_summary: Mapped[str] = mapped_column(Text, default="")
    parent_version_id: Mapped[str] = mapped_column(String(64), default="")
    notes: Mapped[str] = mapped_column(Text, default="")
    created_by: Mapped[str] = mapped_column(String(64))
    approved_by: Mapped[str] = mapped_column(String(64), default="")


class AgentInstance(Stamped, Base):
    __tablename__ = "agent_instances"
    __table_args__ = (UniqueConstraint("tenant_id", "legacy_agent_id"),
                      Index("ix_instances_tenant_template", "tenant_id", "template_id"))
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    template_id: Mapped[str] = mapped_column(ForeignKey("agent_templates.id"))
    version_id: Mapped[str] = mapped_column(ForeignKey("agent_versions.id"), index=True)
    environment_id: Mapped[str] = mapped_column(ForeignKey("environments.id"))
    project_id: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    state: Mapped[str] = mapped_column(String(16))
    # NULL, not "", when absent: the unique constraint then admits any number of unlinked ones.
    legacy_agent_id: Mapped[str | None] = mapped_column(String(100))
    last_heartbeat_at: Mapped[datetime | None]
    activated_at: Mapped[datetime | None]
    retired_at: Mapped[datetime | None]


class AgentIdentity(Stamped, Base):
    __tablename__ = "agent_identities"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    soul_content: Mapped[str] = mapped_column(Text, default="")
    soul_hash: Mapped[str] = mapped_column(String(64), default="")
    tools_notes: Mapped[str] = mapped_column(Text, default="")
    validation_status: Mapped[str] = mapped_column(String(16))
    template_id: Mapped[str] = mapped_column(String(64), default="")
    instance_id: Mapped[str] = mapped_column(String(64), default="")
    legacy_agent_id: Mapped[str] = mapped_column(String(100), default="")
    description: Mapped[str] = mapped_column(Text, default="")
