"""The admission queue: priority classes, fair share between keys, adapter-aware dispatch, bounds, deadlines."""
import asyncio

import pytest

from backends.balancer import Lease
from gateway.errors import InvalidRequestError, OverloadedError
from gateway.policies.admission import PRIORITIES, AdmissionQueue, priority_of


class Slots:
    """A backend of `slots` slots per adapter name (None = base), leased like the driver does."""

    def __init__(self, slots: dict) -> None:
        self.free = dict(slots)
        self.queue: AdmissionQueue | None = None

    def reserve(self, adapter):
        if self.free.get(adapter, 0) <= 0:
            return None
        self.free[adapter] -= 1
        return Lease(0, adapter, self._release)

    def _release(self, replica, adapter):
        self.free[adapter] += 1
        self.queue.dispatch()

    def has_room(self) -> bool:
        return any(count > 0 for count in self.free.values())


def make_queue(slots: dict, max_length: int = 100) -> tuple[AdmissionQueue, Slots]:
    backend = Slots(slots)
    backend.queue = AdmissionQueue("b", backend.reserve, backend.has_room, max_length=max_length)
    return backend.queue, backend


async def test_uncontended_requests_take_a_slot_without_queueing():
    queue, backend = make_queue({None: 2})
    assert queue.try_now(None) is not None and queue.try_now(None) is not None
    assert queue.try_now(None) is None  # full: the caller waits


async def served_order(queue: AdmissionQueue, backend: Slots, requests: list[tuple[str, int]]) -> list[str]:
    """Fill the only slot, queue `requests` (key, priority), then release one slot at a time."""
    held = queue.try_now(None)
    order: list[str] = []

    async def one(key, priority):
        lease = await queue.wait(None, key, priority)
        order.append(key)
        await asyncio.sleep(0)
        lease.release()

    tasks = [asyncio.create_task(one(key, priority)) for key, priority in requests]
    await asyncio.sleep(0)
    held.release()
    await asyncio.gather(*tasks)
    return order


async def test_keys_share_a_class_round_robin_however_many_requests_each_sends():
    queue, backend = make_queue({None: 1})
    order = await served_order(queue, backend, [("a", 1)] * 8 + [("b", 1)] * 2)
    assert order[:4] == ["a", "b", "a", "b"]  # b is not stuck behind a's eight


async def test_a_higher_class_goes_first_even_when_it_came_last():
    queue, backend = make_queue({None: 1})
    order = await served_order(queue, backend, [("low", 2)] * 5 + [("high", 0)])
    assert order[0] == "high"


async def test_a_waiter_whose_adapter_has_no_room_does_not_block_others():
    queue, backend = make_queue({"x": 1, "y": 1})
    hold_x, hold_y = queue.try_now("x"), queue.try_now("y")
    waiting_x = asyncio.create_task(queue.wait("x", "k1", 1))
    waiting_y = asyncio.create_task(queue.wait("y", "k2", 1))
    await asyncio.sleep(0)
    hold_y.release()  # a y slot frees: the y waiter gets it though the x waiter came first
    lease = await asyncio.wait_for(waiting_y, 1)
    assert lease.adapter == "y" and not waiting_x.done()
    hold_x.release()
    assert (await asyncio.wait_for(waiting_x, 1)).adapter == "x"


async def test_a_full_queue_answers_429_with_retry_after():
    queue, backend = make_queue({None: 0}, max_length=1)
    first = asyncio.create_task(queue.wait(None, "k", 1))
    await asyncio.sleep(0)
    with pytest.raises(OverloadedError) as refused:
        await queue.wait(None, "k", 1)
    assert refused.value.status_code == 429 and refused.value.headers["retry-after"] == "1"
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    assert queue.length == 0


async def test_a_deadline_that_passes_in_the_queue_is_a_429_and_frees_its_place():
    queue, backend = make_queue({None: 0})
    loop = asyncio.get_running_loop()
    with pytest.raises(OverloadedError) as expired:
        await queue.wait(None, "k", 1, deadline=loop.time() + 0.05)
    assert "deadline" in expired.value.message and queue.length == 0


async def test_a_queued_stream_gets_keepalives_until_its_slot_comes():
    queue, backend = make_queue({None: 1})
    held = queue.try_now(None)
    pings = []

    async def keepalive():
        pings.append(1)

    waiting = asyncio.create_task(queue.wait(None, "k", 1, keepalive=keepalive, keepalive_s=0.02))
    await asyncio.sleep(0.11)
    held.release()
    await asyncio.wait_for(waiting, 1)
    assert len(pings) >= 3


async def test_a_slot_that_comes_as_the_waiter_gives_up_goes_back():
    queue, backend = make_queue({None: 1})
    held = queue.try_now(None)
    waiting = asyncio.create_task(queue.wait(None, "k", 1))
    await asyncio.sleep(0)
    held.release()       # the waiter's future gets the slot...
    waiting.cancel()     # ...and the client hangs up before it runs
    await asyncio.gather(waiting, return_exceptions=True)
    assert backend.free[None] == 1 and queue.length == 0


@pytest.mark.parametrize(("key", "header", "expected"), [
    ("normal", None, "normal"), ("high", None, "high"), ("high", b"low", "low"),
    ("low", b"high", "low"),   # a header may lower the class, never raise it
    ("normal", b" LOW ", "low"),
])
def test_priority_from_key_and_header(key, header, expected):
    assert priority_of(key, header) == PRIORITIES[expected]


@pytest.mark.parametrize("header", [b"bogus", b"", b"lo", b"1", b"-1", b"high,low", b"\xff"])
def test_an_unknown_priority_is_a_400_naming_the_header(header):
    with pytest.raises(InvalidRequestError) as error:
        priority_of("normal", header)
    assert error.value.status_code == 400 and error.value.param == "x-kimi-priority"
    assert "high, normal, low" in error.value.message
