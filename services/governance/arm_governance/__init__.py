"""ARM governance: policy envelopes, kill switches, the `Check` decision path and budgets,
approvals, the hash-chained audit trail, and deployments with rollback."""
