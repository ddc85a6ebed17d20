"""Policy envelopes, kill switches and risk overrides: the servicer, the store, the in-memory cache and the limits."""
