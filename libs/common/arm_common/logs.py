"""Process-wide logging set-up (level from ARM_LOG_LEVEL, default INFO)."""

from __future__ import annotations

import logging
import os


def configure() -> None:
    logging.basicConfig(
        level=os.environ.get("ARM_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
