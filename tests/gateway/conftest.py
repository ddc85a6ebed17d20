"""The gateway's tests reuse the SDK's fixtures: real registry, governance and telemetry on
port 0 and an ACTIVE agent instance with its key and two approvers."""

from tests.client.conftest import agent  # noqa: F401  (the fixture)
from tests.telemetry.conftest import telemetry  # noqa: F401  (the fixture)
