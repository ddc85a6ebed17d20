"""ARM's pure policy engine: the compiled-policy evaluation (`engine`), the risk classifier
(`risk`) and the policy limits' numbers (`limits`). No database, no gRPC, no protobuf, no service
imports (an import-linter contract in pyproject.toml and tests/engine/test_contract.py keep it so):
governance decides with it, and the CLI runs policy tests offline with the very same code.
"""
