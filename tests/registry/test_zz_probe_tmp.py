import asyncio, grpc, base64
from arm.registry.v1 import tenancy_pb2, agents_pb2, access_pb2, compat_pb2
from arm_client import ArmClient
from tests.conftest import make_tenant
from tests.helpers import failure, approved_version, genome

async def show(call):
    try:
        r = await call
        return ("OK", str(r)[:150].replace("\n"," "))
    except grpc.aio.AioRpcError as e:
        f = failure(e)
        return (f.code.name, f.reason, f.violations, f.metadata, f.message[:100])

async def test_probe(registry, tenant):
    c = tenant.admin
    print(registry.backend)
    s = await approved_version(c)
    inst = (await c.agents.CreateAgentInstance(agents_pb2.CreateAgentInstanceRequest(version_id=s.version.id, environment_id=s.environment.id, name="w"))).agent_instance
    key = (await c.access.CreateApiKey(access_pb2.CreateApiKeyRequest(instance_id=inst.id))).secret
    ag = ArmClient(registry.address, key)
    print("hb", await show(ag.agents.RecordHeartbeat(agents_pb2.RecordHeartbeatRequest(id=inst.id))))
    print("retire", await show(c.agents.TransitionAgentInstance(agents_pb2.TransitionAgentInstanceRequest(id=inst.id, to_state=agents_pb2.INSTANCE_STATE_RETIRED))))
    print("hb after retire", await show(ag.agents.RecordHeartbeat(agents_pb2.RecordHeartbeatRequest(id=inst.id))))
    print("ident empty", await show(c.agents.UpsertAgentIdentity(agents_pb2.UpsertAgentIdentityRequest(agent_identity=agents_pb2.AgentIdentity(name="")))))
    print("ident tools", await show(c.agents.UpsertAgentIdentity(agents_pb2.UpsertAgentIdentityRequest(agent_identity=agents_pb2.AgentIdentity(name="x", tools_notes="a"*50001)))))
    for tok in ["!!!", base64.urlsafe_b64encode(b"\xff\xfe\x00garbage").decode(), base64.urlsafe_b64encode(b"[1,2]").decode(), base64.urlsafe_b64encode(b'"s"').decode(), "ü", "a"*1001, base64.urlsafe_b64encode(b'{"k":"x"}').decode()]:
        print("tok", tok[:20], await show(c.tenancy.ListProjects(tenancy_pb2.ListProjectsRequest(page_token=tok))))
    print("ps", await show(c.tenancy.ListProjects(tenancy_pb2.ListProjectsRequest(page_size=-1))))
    print("type99", await show(c.tenancy.CreateEnvironment(tenancy_pb2.CreateEnvironmentRequest(name="e", type=99))))
    g = genome(); del g["model_config"]["provider"]
    print("genome", await show(c.agents.CreateAgentVersion(agents_pb2.CreateAgentVersionRequest(template_id=s.template.id, genome=g))))
    print("nogenome", await show(c.agents.CreateAgentVersion(agents_pb2.CreateAgentVersionRequest(template_id=s.template.id))))
    print("reqid", await show(c.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(slug="abc", name="n", request_id="r"*500))))
    print("name", await show(c.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(slug="abc", name="n"*10000))))
    print("ctrl name", await show(c.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(slug="abcd", name="tab\tname"))))
    print("unpaired surrogate?", await show(c.tenancy.CreateProject(tenancy_pb2.CreateProjectRequest(slug="abcde", name="é漢字🙂"))))
    print("genome nested nul", await show(c.agents.CreateAgentVersion(agents_pb2.CreateAgentVersionRequest(template_id=s.template.id, genome=genome(extra="a\x00b")))))
    print("identity nul", await show(c.agents.UpsertAgentIdentity(agents_pb2.UpsertAgentIdentityRequest(agent_identity=agents_pb2.AgentIdentity(name="y", soul_content="a\x00b")))))
    print("ping", await show(c.tenancy.ListProjects(tenancy_pb2.ListProjectsRequest())))
