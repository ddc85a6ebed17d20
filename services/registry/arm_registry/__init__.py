"""ARM registry: tenants, environments, projects, operators and RBAC, API keys, agent templates,
versions, instances, identities, and the legacy compatibility resolver."""
