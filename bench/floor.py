"""The floor under `Check`: what a grpc.aio unary call costs when it may answer only after a
group-committed write to PostgreSQL, with none of ARM's code in the process.

Each mode is a server process of its own, loaded by check_grpc.py's load generator (its own
process) at 1 and at 64 calls in flight:

  echo          returns the request bytes (check_grpc.py's reference)
  typed         parses a CheckRequest, answers a constant CheckResponse
  suspend       typed, but the handler awaits a future that a batching task resolves: the hop
                to a group-commit writer, with no database behind it
  commit        suspend, and the batching task first inserts one row per waiting call (an id
                and the request bytes) in ONE statement, committed with fsync (durable)
  commit-async  commit with `synchronous_commit = off`: the commit returns before its WAL is
                flushed, so a PostgreSQL crash can lose it (not durable; for comparison)

  .venv/bin/python bench/floor.py [--postgres URL] [--seconds 4] [--rounds 2] [--modes ...]

Prints figures; asserts nothing."""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import grpc  # noqa: E402

from arm.governance.v1 import decision_pb2, decision_pb2_grpc, policy_pb2  # noqa: E402

MODES = ("echo", "typed", "suspend", "commit", "commit-async")


class Batcher:
    """Resolves waiting calls in batches: everything queued while the previous batch was being
    written goes into the next one (the shape of governance's decision log)."""

    def __init__(self, pool: object | None, table: str) -> None:
        self.pool, self.table = pool, table
        self.queue: asyncio.Queue[tuple[str, bytes, asyncio.Future[None]]] = asyncio.Queue()

    async def run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            if self.pool is not None:
                await self.pool.execute(  # type: ignore[attr-defined]
                    f"INSERT INTO {self.table} (id, request) SELECT * FROM unnest($1::text[], $2::bytea[])",
                    [b[0] for b in batch], [b[1] for b in batch])
            for _, _, done in batch:
                done.set_result(None)

    async def wait(self, request: bytes) -> None:
        done = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((secrets.token_hex(8), request, done))
        await done


async def serve(mode: str, port: int, postgres: str, table: str) -> None:
    # About the size of a real ALLOW answer: a reason, the deciding rule, ids, a time.
    response = decision_pb2.CheckResponse(
        decision=policy_pb2.DECISION_ALLOW, effective_risk=1, step=5, scope=3, scope_id="ver_" + "0" * 26,
        envelope_id="pol_" + "0" * 26, envelope_revision=1, rule_kind=1, rule_index=0,
        rule_description="fs.read -> ALLOW", decision_id="dec_" + "0" * 26, policy_epoch=7,
        reasons=[policy_pb2.Reason(code="TOOL_RULE", message="fs.read is allowed by the version's envelope")])
    response.decide_time.GetCurrentTime()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    writer: asyncio.Task[None] | None = None
    if mode == "echo":
        async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return request
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),))
    else:
        pool = None
        if mode.startswith("commit"):
            import asyncpg
            settings = {"synchronous_commit": "off"} if mode == "commit-async" else {}
            pool = await asyncpg.create_pool(postgres, min_size=1, max_size=1, server_settings=settings)
            await pool.execute(f"CREATE TABLE IF NOT EXISTS {table} (id text PRIMARY KEY, request bytea NOT NULL)")
        batcher = Batcher(pool, table)
        # Held here: the loop keeps only a weak reference to a task.
        writer = asyncio.create_task(batcher.run()) if mode != "typed" else None

        class Servicer(decision_pb2_grpc.DecisionServiceServicer):
            async def Check(self, request: decision_pb2.CheckRequest,  # noqa: N802 - gRPC method name
                            context: grpc.aio.ServicerContext) -> decision_pb2.CheckResponse:
                if mode != "typed":
                    await batcher.wait(request.SerializeToString())
                return response

        decision_pb2_grpc.add_DecisionServiceServicer_to_server(Servicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()
    if writer is not None:
        writer.cancel()


async def orchestrate(args: argparse.Namespace) -> None:
    import asyncpg
    from check_grpc import run_load

    from tests.processes import free_port

    table = f"bench_floor_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(args.postgres)
    print(f"# {os.cpu_count()} cores; PostgreSQL {args.postgres}; {args.seconds:.0f}s per point; "
          f"{args.rounds} round(s), modes interleaved; load generator in its own process")
    print(f"{'mode':14} {'in flight':>9} {'calls/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'CPU us':>7} {'client':>7}"
          "   (CPU us: the server process's CPU time per call; client: the load generator's)")
    try:
        for _ in range(args.rounds):
            echo: dict[int, dict[str, float]] = {}
            for mode in args.modes:
                port = free_port()
                proc = subprocess.Popen([sys.executable, __file__, "--serve", mode, "--port", str(port),  # noqa: ASYNC220
                                         "--postgres", args.postgres, "--table", table], cwd=ROOT)
                try:
                    time.sleep(1.5)  # noqa: ASYNC251 - nothing else runs in this loop meanwhile
                    for n in (1, 64):
                        r = run_load(f"127.0.0.1:{port}", "bench", "", n, args.seconds, 1, mode == "echo", [proc.pid])
                        if mode == "echo":
                            echo[n] = r
                        versus = ""
                        if n in echo and mode != "echo":
                            versus = (f"   ({r['calls_per_s'] / echo[n]['calls_per_s']:.2f}x echo throughput, "
                                      f"{r['p50_ms'] / echo[n]['p50_ms']:.2f}x echo p50)")
                        print(f"{mode:14} {n:>9} {r['calls_per_s']:>9.0f} {r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f}"
                              f" {r['cpu_us']:>7.0f} {r['client_cpu_us']:>7.0f}{versus}", flush=True)
                finally:
                    proc.terminate()
                    proc.wait(30)
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--postgres", default=os.environ.get("ARM_TEST_POSTGRES_URL",
                                                             "postgresql://postgres@127.0.0.1:5432/test"))
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--table", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.port, args.postgres, args.table))
    else:
        asyncio.run(orchestrate(args))


if __name__ == "__main__":
    main()
