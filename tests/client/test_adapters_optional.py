"""The framework adapters stay optional: the core SDK imports neither framework."""

from __future__ import annotations

import subprocess
import sys


def test_the_core_sdk_imports_no_framework() -> None:
    code = ("import sys, arm_client, arm_client.adapters; "
            "loaded = sorted(m for m in ('agents', 'openai', 'langgraph', 'langchain_core') if m in sys.modules); "
            "print(','.join(loaded))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    assert out == "", f"importing the core SDK loaded {out}"
    # The adapters themselves do load their framework.
    code = "import sys, arm_client.adapters.langgraph; print('langgraph' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip() == "True"
