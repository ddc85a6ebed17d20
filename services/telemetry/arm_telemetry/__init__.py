"""ARM telemetry service. Its contracts are in proto/arm/telemetry/v1; the service itself is built in its own
issue, and until then its RPCs answer UNIMPLEMENTED."""
