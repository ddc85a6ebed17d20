"""`python -m arm_console`: the web console as its own process."""

from __future__ import annotations

import asyncio
import sys

from arm_common import logs
from arm_common.config import ConfigError
from arm_common.server import stop_on_signal
from arm_console.config import ConsoleConfig
from arm_console.server import ConsoleServer


async def main() -> int:
    config = ConsoleConfig.from_env()
    server = ConsoleServer(config)
    await server.start()
    stop = stop_on_signal()  # before the line a supervisor waits for
    print(f"ARM console: {server.url}", flush=True)
    await stop.wait()
    await server.stop()
    return 0


def run() -> None:
    logs.configure()
    try:
        sys.exit(asyncio.run(main()))
    except ConfigError as exc:
        print(f"arm_console: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
