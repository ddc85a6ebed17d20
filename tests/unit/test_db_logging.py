"""A cancelled task returning its pooled connection is a cancellation, not an error: SQLAlchemy's
"Exception during reset or similar" with a CancelledError is logged at DEBUG (arm_common.db),
while the same message with a real exception stays an ERROR."""

from __future__ import annotations

import asyncio
import logging

import pytest

import arm_common.db  # noqa: F401 - installs the pool log filter

POOL_LOG = "sqlalchemy.pool.impl.AsyncAdaptedQueuePool"


def _log_reset_failure(exc: BaseException) -> None:
    try:
        raise exc
    except BaseException:
        logging.getLogger(POOL_LOG).error("Exception during reset or similar", exc_info=True)


def test_a_cancelled_reset_is_not_an_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    _log_reset_failure(asyncio.CancelledError())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    _log_reset_failure(OSError("connection reset"))
    assert [r.levelno for r in caplog.records if r.name == POOL_LOG][-1] == logging.ERROR
