"""Ingest benchmark: events per second acknowledged (committed) by one telemetry process on
PostgreSQL, batches of 1000 over IngestEvents, from a load generator in its own process; next to
raw asyncpg COPY of the same rows into the same table layout (one transaction per 1000-row
batch), measured in the same run, right before each point, as the reference.

  .venv/bin/python bench/ingest.py [--postgres URL] [--seconds 10] [--in-flight 1 4]

Prints figures; asserts nothing."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BATCH = 1000


def make_batch(prefix: str, n: int):  # type: ignore[no-untyped-def]
    """One batch of realistic events (ids unique per batch), as the load generator sends it."""
    from google.protobuf import struct_pb2, timestamp_pb2

    from arm.telemetry.v1 import events_pb2, telemetry_pb2

    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    payload = struct_pb2.Struct()
    payload.update({"step": 3, "model": "gpt-4.1", "tokens": 512})
    events = [events_pb2.OpEvent(
        event_id=f"{prefix}-{i}", type=events_pb2.OP_EVENT_TYPE_RUN_STEP, occur_time=now,
        project_id="prj_bench", environment_id="env_bench", template_id="tpl_bench",
        version_id="ver_bench", instance_id=f"ins_bench_{i % 16}", run_id=f"run-{prefix}",
        trace_id="4bf92f3577b34da6a3ce929d0e0e4736", payload=payload) for i in range(n)]
    return telemetry_pb2.IngestEventsRequest(events=events)


async def load(address: str, key: str, in_flight: int, seconds: float) -> dict[str, float]:
    import grpc

    from arm.telemetry.v1 import telemetry_pb2_grpc
    from arm_client import auth_interceptors

    channel = grpc.aio.insecure_channel(address, interceptors=auth_interceptors(key),
                                        options=[("grpc.max_send_message_length", 16 * 1024 * 1024)])
    stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
    run = secrets.token_hex(4)
    counter = 0
    accepted = 0
    pushed_back = 0

    async def worker(n: int, until: float) -> None:
        nonlocal counter, accepted, pushed_back
        while time.perf_counter() < until:
            counter += 1
            request = make_batch(f"{run}-{n}-{counter}", BATCH)
            try:
                resp = await stub.IngestEvents(request, timeout=30)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                pushed_back += 1
                await asyncio.sleep(0.05)
                continue
            accepted += resp.accepted_count

    warm = time.perf_counter() + min(2.0, seconds / 5)
    await asyncio.gather(*(worker(n, warm) for n in range(in_flight)))
    accepted = pushed_back = 0
    started = time.perf_counter()
    await asyncio.gather(*(worker(n, started + seconds) for n in range(in_flight)))
    elapsed = time.perf_counter() - started
    await channel.close()
    return {"events_per_s": accepted / elapsed, "events": accepted, "pushed_back": pushed_back}


async def raw_copy(dsn: str, schema: str, seconds: float) -> float:
    """Rows/s of asyncpg COPY of the same rows into the events table, 1000 rows per transaction."""
    import asyncpg

    from arm_common.auth import Principal
    from arm_telemetry.ingest import COLUMNS, validate

    p = Principal(tenant_id="bench", actor_type="OPERATOR", actor_id="op", api_key_id="k")
    now = datetime.now(UTC).replace(tzinfo=None)
    conn = await asyncpg.connect(dsn, server_settings={"search_path": schema})
    done = 0
    n = 0
    template = make_batch("copy", BATCH)
    run = secrets.token_hex(4)  # unique ids on every call (the table keeps earlier rows)
    try:
        # Rows prepared up front: this measures the database, not the Python that builds rows.
        batches = []
        for _ in range(50):
            rows = []
            for i, ev in enumerate(template.events):
                row = validate(i, ev, p, now, datetime(2000, 1, 1))
                assert isinstance(row, list)
                rows.append(tuple(row))
            batches.append(rows)
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            rows = [(r[0], f"{run}-{n}-{r[1]}", *r[2:]) for r in batches[n % 50]]
            n += 1
            async with conn.transaction():
                await conn.copy_records_to_table("events", records=rows, columns=COLUMNS)
            done += len(rows)
        return done / (time.perf_counter() - started)
    finally:
        await conn.close()


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, *args], env=env, cwd=ROOT, stdout=open(log, "ab"),  # noqa: SIM115
                            stderr=subprocess.STDOUT)


async def orchestrate(args: argparse.Namespace) -> None:
    import asyncpg

    from tests.processes import base_env, free_port, wait_serving
    tmp = Path(tempfile.mkdtemp(prefix="arm-bench-ingest-"))
    suffix = secrets.token_hex(4)
    schemas = {"registry": f"bench_reg_{suffix}", "telemetry": f"bench_tel_{suffix}",
               "copy": f"bench_copy_{suffix}"}
    procs: list[subprocess.Popen[bytes]] = []
    log = tmp / "services.log"
    try:
        reg_port, tel_port = free_port(), free_port()
        reg_env = base_env(ARM_REGISTRY_LISTEN=f"127.0.0.1:{reg_port}", ARM_LOG_LEVEL="WARNING",
                           ARM_REGISTRY_DATABASE_URL=args.postgres, ARM_DATABASE_SCHEMA=schemas["registry"])
        for cmd in (["migrate"], ["bootstrap"]):
            subprocess.run([sys.executable, "-m", "arm_registry", *cmd], env=reg_env, cwd=ROOT, check=True,
                           stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        key = log.read_text().split("(shown once): ")[1].split()[0]
        procs.append(spawn(["-m", "arm_registry"], reg_env, log))
        await wait_serving(f"127.0.0.1:{reg_port}", procs[-1], log)
        for name in ("telemetry", "copy"):
            env = base_env(ARM_TELEMETRY_LISTEN=f"127.0.0.1:{tel_port}", ARM_LOG_LEVEL="WARNING",
                           ARM_TELEMETRY_DATABASE_URL=args.postgres, ARM_DATABASE_SCHEMA=schemas[name],
                           ARM_REGISTRY_ADDRESS=f"127.0.0.1:{reg_port}", ARM_SERVICE_API_KEY=key)
            subprocess.run([sys.executable, "-m", "arm_telemetry", "migrate"], env=env, cwd=ROOT, check=True,
                           stdout=open(log, "ab"), stderr=subprocess.STDOUT)  # noqa: SIM115
        procs.append(spawn(["-m", "arm_telemetry"], env | {"ARM_DATABASE_SCHEMA": schemas["telemetry"]}, log))
        await wait_serving(f"127.0.0.1:{tel_port}", procs[-1], log)
        print(f"# {os.cpu_count()} cores; PostgreSQL {args.postgres}; {args.seconds:.0f}s per point; "
              f"batches of {BATCH}; load generator in its own process")
        # The reference is measured right before each point: on a shared machine the rates drift
        # over a run, and a ratio to a distant measurement would mostly show that drift.
        for n in args.in_flight:
            copy_rate = await raw_copy(args.postgres, schemas["copy"], args.seconds)
            print(f"{'raw asyncpg COPY (reference)':40} {copy_rate:>10.0f} events/s")
            out = subprocess.run([sys.executable, __file__, "--load", f"127.0.0.1:{tel_port}", "--key", key,
                                  "--in-flight", str(n), "--seconds", str(args.seconds)],
                                 check=True, capture_output=True, text=True, cwd=ROOT)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            label = f"IngestEvents, {n} batch{'es' if n > 1 else ''} in flight"
            print(f"{label:40} {r['events_per_s']:>10.0f} events/s   ({r['events_per_s'] / copy_rate:.2f}x raw COPY;"
                  f" {r['pushed_back']} batches pushed back with RESOURCE_EXHAUSTED)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(30)
        conn = await asyncpg.connect(args.postgres)
        for schema in schemas.values():
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres", default=os.environ.get("ARM_TEST_POSTGRES_URL",
                                                             "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--load", help=argparse.SUPPRESS)
    parser.add_argument("--key", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        print(json.dumps(asyncio.run(load(args.load, args.key, args.in_flight[0], args.seconds))))
    else:
        asyncio.run(orchestrate(args))


if __name__ == "__main__":
    main()
