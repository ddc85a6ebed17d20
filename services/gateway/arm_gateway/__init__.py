"""The MCP gateway: an MCP server in front of MCP servers, turning every `tools/call` into a
`Check` (SPEC §6). See `arm_gateway.gateway`."""
