"""TLS benchmark: what TLS and mTLS cost a unary gRPC call and a new connection, next to
plaintext measured in the same run as the reference.

A bare grpc.aio echo server (its own process) is served three ways: plaintext, TLS and mTLS,
with ARM's own credentials (arm_common.tls: the reloading certificate fetcher runs at every
handshake). The load generator, in this process, measures calls/s and p50/p99 at 1 and 16 calls
in flight on one channel opened by arm_common.tls.open_channel, and the time to open a new
channel and complete its first call (connection setup with the handshake). Certificates come
from trustme (a development dependency).

  .venv/bin/python bench/tls.py [--seconds 3]

Prints figures; asserts nothing."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from arm_common import tls  # noqa: E402

METHOD = "/bench.Echo/Echo"
PAYLOAD = b"x" * 200


async def serve(mode: str, folder: Path, port_file: Path) -> None:
    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),))
    if mode == "plaintext":
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        settings = tls.TlsSettings(cert_file=str(folder / "server.crt"), key_file=str(folder / "server.key"),
                                   client_ca_file=str(folder / "ca.pem") if mode == "mtls" else None)
        port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(settings))
    await server.start()
    port_file.write_text(str(port))
    await server.wait_for_termination()


def client_settings(mode: str, folder: Path) -> tls.TlsSettings | None:
    if mode == "plaintext":
        return None
    cert = (str(folder / "client.crt"), str(folder / "client.key")) if mode == "mtls" else (None, None)
    return tls.TlsSettings(ca_file=str(folder / "ca.pem"), cert_file=cert[0], key_file=cert[1])


async def calls(address: str, settings: tls.TlsSettings | None, in_flight: int, seconds: float) -> dict[str, float]:
    async with tls.open_channel(address, settings) as channel:
        call = channel.unary_unary(METHOD)
        await call(PAYLOAD)
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                t0 = time.perf_counter()
                await call(PAYLOAD)
                latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {"calls_per_s": len(latencies) / elapsed, "p50_ms": statistics.median(latencies) * 1000,
            "p99_ms": latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000}


async def connects(address: str, settings: tls.TlsSettings | None, count: int) -> float:
    """Median ms to open a new channel and complete its first call."""
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        async with tls.open_channel(address, settings) as channel:
            await channel.unary_unary(METHOD)(PAYLOAD)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


async def main(seconds: float) -> None:
    import trustme

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(folder / "ca.pem"))
        for name, host in (("server", "127.0.0.1"), ("client", "bench-client")):
            leaf = ca.issue_cert(host)
            (folder / f"{name}.crt").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
            leaf.private_key_pem.write_to_path(str(folder / f"{name}.key"))
        print(f"{'mode':<10} {'in flight':>9} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'new connection ms':>18}")
        for mode in ("plaintext", "tls", "mtls"):
            port_file = folder / f"{mode}.port"
            proc = await asyncio.create_subprocess_exec(sys.executable, __file__, "--serve", mode, str(folder),
                                                        str(port_file))
            try:
                while not port_file.exists() or not port_file.read_text():
                    await asyncio.sleep(0.05)
                address = f"127.0.0.1:{port_file.read_text()}"
                settings = client_settings(mode, folder)
                setup = await connects(address, settings, 50)
                for in_flight in (1, 16):
                    r = await calls(address, settings, in_flight, seconds)
                    print(f"{mode:<10} {in_flight:>9} {r['calls_per_s']:>9.0f} {r['p50_ms']:>8.3f} "
                          f"{r['p99_ms']:>8.3f} {setup:>18.2f}")
            finally:
                proc.terminate()
                await proc.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--serve", nargs=3, metavar=("MODE", "FOLDER", "PORT_FILE"))
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve[0], Path(args.serve[1]), Path(args.serve[2])))
    else:
        asyncio.run(main(args.seconds))
