"""The hash-chained audit trail, its servicer and its signed checkpoints."""
