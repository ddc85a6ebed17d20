"""`python -m arm_gateway --config gateway.yaml`: serves one MCP client over stdio, or any
number over streamable HTTP when the config has `http: {port: …}`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from arm_gateway.config import ConfigError, load_config
from arm_gateway.gateway import UpstreamStartError, serve_http, serve_stdio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="arm_gateway", description="ARM's MCP gateway (stdio)")
    parser.add_argument("--config", required=True, help="the gateway's YAML configuration")
    args = parser.parse_args(argv)
    # stdout is the MCP wire: logs go to stderr only.
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"arm_gateway: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve_stdio(config) if config.http_port is None else serve_http(config))
    except (UpstreamStartError, BaseExceptionGroup) as exc:
        failed = _start_errors(exc)
        if not failed:
            raise
        for error in failed:  # one line each, not the task groups' tracebacks
            print(f"arm_gateway: {error}", file=sys.stderr)
        return 1
    return 0


def _start_errors(exc: BaseException) -> list[UpstreamStartError]:
    """The upstreams that did not start, however deep the task groups nested them."""
    if isinstance(exc, UpstreamStartError):
        return [exc]
    if isinstance(exc, BaseExceptionGroup):
        return [e for inner in exc.exceptions for e in _start_errors(inner)]
    return []


if __name__ == "__main__":
    sys.exit(main())
