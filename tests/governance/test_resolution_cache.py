"""Governance's agent-resolution cache drops, for any registry change notice, exactly what the
rule says (checked against that rule written as a scan over every entry, how the cache worked
before it was indexed): the whole tenant for a tenant change; else the refs the notice names,
every ref resolving to its instance, and for a version change every ref resolving to that
version. Nothing of another tenant, nothing else."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from arm.registry.v1 import compat_pb2
from arm.registry.v1.compat_pb2 import AgentChange, ResolvedAgent
from arm_governance.agent_cache import ResolutionCache
from tests.unit._strategies import PROPERTY

C = compat_pb2
KINDS = [C.AGENT_CHANGE_KIND_RESET, C.AGENT_CHANGE_KIND_TENANT, C.AGENT_CHANGE_KIND_INSTANCE,
         C.AGENT_CHANGE_KIND_VERSION]
tenants = st.sampled_from(["t1", "t2"])
instances = st.sampled_from(["ins_1", "ins_2", "ins_3"])
versions = st.sampled_from(["ver_1", "ver_2"])
legacy_ids = st.sampled_from(["", "legacy-a", "legacy-b"])


@st.composite
def entries(draw: st.DrawFn) -> tuple[tuple[str, str, str], ResolvedAgent | None]:
    tenant = draw(tenants)
    kind = draw(st.sampled_from(["instance_id", "legacy_agent_id"]))
    ref = draw(instances if kind == "instance_id" else legacy_ids.filter(bool))
    found = None
    if draw(st.booleans()):  # else the registry did not know the ref (negative entry)
        found = C.ResolvedAgent(tenant_id=tenant, instance_id=draw(instances), version_id=draw(versions),
                                legacy_agent_id=draw(legacy_ids))
    return (tenant, kind, ref), found


changes = st.builds(C.AgentChange, kind=st.sampled_from(KINDS), tenant_id=tenants, instance_id=instances,
                    version_id=versions, legacy_agent_id=legacy_ids)


def stale(key: tuple[str, str, str], value: ResolvedAgent | None, change: AgentChange) -> bool:
    """The rule as a predicate over one entry."""
    tenant, ref_kind, ref = key
    if change.kind == C.AGENT_CHANGE_KIND_RESET:
        return True
    if tenant != change.tenant_id:
        return False
    return bool(change.kind == C.AGENT_CHANGE_KIND_TENANT
                or (ref_kind == "instance_id" and ref == change.instance_id)
                or (ref_kind == "legacy_agent_id" and change.legacy_agent_id and ref == change.legacy_agent_id)
                or (value is not None and (value.instance_id == change.instance_id
                                           or (change.kind == C.AGENT_CHANGE_KIND_VERSION
                                               and value.version_id == change.version_id))))


@PROPERTY
@given(st.lists(entries(), max_size=25), st.lists(changes, min_size=1, max_size=4))
def test_a_change_drops_exactly_the_stale_entries(cached: list[tuple[tuple[str, str, str], ResolvedAgent | None]],
                                                  notices: list[AgentChange]) -> None:
    cache = ResolutionCache()
    model = {}
    for key, found in cached:
        cache.put(key, found)
        model[key] = found
    for change in notices:
        cache.invalidate(change)
        model = {k: v for k, v in model.items() if not stale(k, v, change)}
        assert len(cache) == len(model)
        for key, found in model.items():
            assert cache.get(key) == (True, found)


def test_a_version_change_drops_every_ref_of_that_version_only() -> None:
    cache = ResolutionCache()
    on_v1 = C.ResolvedAgent(tenant_id="t1", instance_id="ins_1", version_id="ver_1", legacy_agent_id="legacy-a")
    on_v2 = C.ResolvedAgent(tenant_id="t1", instance_id="ins_2", version_id="ver_2")
    cache.put(("t1", "instance_id", "ins_1"), on_v1)
    cache.put(("t1", "legacy_agent_id", "legacy-a"), on_v1)
    cache.put(("t1", "instance_id", "ins_2"), on_v2)
    cache.put(("t2", "instance_id", "ins_9"), C.ResolvedAgent(tenant_id="t2", instance_id="ins_9", version_id="ver_1"))
    cache.invalidate(C.AgentChange(kind=C.AGENT_CHANGE_KIND_VERSION, tenant_id="t1", version_id="ver_1"))
    assert cache.get(("t1", "instance_id", "ins_1")) == (False, None)
    assert cache.get(("t1", "legacy_agent_id", "legacy-a")) == (False, None)
    assert cache.get(("t1", "instance_id", "ins_2")) == (True, on_v2)
    assert cache.get(("t2", "instance_id", "ins_9"))[0]  # another tenant's version of the same id
