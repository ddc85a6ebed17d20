"""The `Check` path: the decider, the group-committed decision log and its reads."""
