"""Retries before the first byte: which backend errors are worth another try, and how long to wait.

The first attempt runs without tenacity (the common case stays cheap); only a retryable failure
enters the tenacity loop for the remaining attempts.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, TypeVar

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from backends.errors import BackendError, BackendRateLimitedError
from backends.config import RetryConfig

T = TypeVar("T")
FIRST_BACKOFF_S = 0.05


def is_retryable(exc: BaseException, policy: RetryConfig) -> bool:
    """What the driver marked retryable (connect errors, 502/503, connect timeouts; never a first-byte timeout
    or an account error); a 429 with backoff, or after its retry-after when that is short."""
    if isinstance(exc, BackendRateLimitedError):
        return exc.retry_after_s is None or exc.retry_after_s <= policy.max_retry_after_s
    return isinstance(exc, BackendError) and exc.retryable


def _wait(policy: RetryConfig):
    backoff = wait_exponential(multiplier=0.05, max=1.0)

    def wait(state) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, BackendRateLimitedError) and exc.retry_after_s is not None:
            return exc.retry_after_s
        return backoff(state)
    return wait


async def with_retries(attempt: Callable[[], Awaitable[T]], policy: RetryConfig,
                       on_retry: Callable[[BaseException], None], allow: Callable[[], bool] | None = None) -> T:
    """`allow()` is asked before each retry: the backend's retry budget (backends/retry_budget.py)."""
    try:
        return await attempt()
    except BaseException as exc:
        failure = exc
    return await retry_after(failure, attempt, policy, on_retry, allow)


async def retry_after(failure: BaseException, attempt: Callable[[], Awaitable[T]], policy: RetryConfig,
                      on_retry: Callable[[BaseException], None], allow: Callable[[], bool] | None = None) -> T:
    """with_retries() once its first attempt failed with `failure`: the failure raised again when it is not
    worth a retry, else the remaining attempts. A caller that makes the first attempt itself builds nothing
    for a request that succeeds (the data plane's common case)."""
    if policy.attempts <= 1 or not is_retryable(failure, policy) or (allow is not None and not allow()):
        raise failure
    on_retry(failure)
    delay = failure.retry_after_s if isinstance(failure, BackendRateLimitedError) else FIRST_BACKOFF_S
    await asyncio.sleep(delay or FIRST_BACKOFF_S)
    retrying = AsyncRetrying(
        stop=stop_after_attempt(policy.attempts - 1),
        retry=retry_if_exception(lambda exc: is_retryable(exc, policy) and (allow is None or allow())),
        wait=_wait(policy),
        before_sleep=lambda state: on_retry(state.outcome.exception()),
        reraise=True,
    )
    return await retrying(attempt)
