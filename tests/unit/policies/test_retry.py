"""retry_after(): the retry decision once a caller's own first attempt failed (the data plane's fast path)."""
from __future__ import annotations

import asyncio

import pytest

from backends.config import RetryConfig
from backends.errors import BackendRejectedError, BackendUnavailableError
from gateway.policies.retry import retry_after


def run(coro):
    return asyncio.run(coro)


def test_a_retryable_first_failure_is_counted_and_tried_again():
    calls, retried = [], []

    async def attempt():
        calls.append(1)
        return "second"

    first = BackendUnavailableError("connect refused", backend="up")
    assert run(retry_after(first, attempt, RetryConfig(attempts=2), retried.append)) == "second"
    assert calls == [1] and retried == [first]


@pytest.mark.parametrize("failure, policy, allow", [
    (BackendRejectedError("bad", status=400, backend="up"), RetryConfig(attempts=3), None),   # not retryable
    (BackendUnavailableError("down", backend="up"), RetryConfig(attempts=1), None),          # no attempts left
    (BackendUnavailableError("down", backend="up"), RetryConfig(attempts=3), lambda: False),  # budget spent
])
def test_a_failure_not_worth_a_retry_is_raised_again_untouched(failure, policy, allow):
    calls, retried = [], []

    async def attempt():
        calls.append(1)

    with pytest.raises(type(failure)) as raised:
        run(retry_after(failure, attempt, policy, retried.append, allow))
    assert raised.value is failure and calls == [] and retried == []
