"""Shared runtime of the ARM services: config, database, gRPC bootstrap, errors, outbox, hashing."""
