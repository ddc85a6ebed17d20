"""Human approvals: the servicer, the lifecycle rules and the store."""
