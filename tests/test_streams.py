"""Tests of overlap.streams on CPU: ordered workers, events, current stream, errors, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
import traceback

import pytest

from overlap import streams
from overlap.errors import CommTimeoutError
from overlap.streams import Event, Stream, current_stream


@pytest.fixture
def pair():
    a, b = Stream("cpu", name="a"), Stream("cpu", name="b")
    yield a, b
    a.close()
    b.close()


def test_worker_runs_in_submission_order_and_returns_at_once(pair):
    a, _ = pair
    gate = threading.Event()
    seen: list[int] = []
    a.submit(gate.wait)
    futures = [a.submit(seen.append, i) for i in range(50)]
    assert not futures[-1].done()  # submit returned while the worker is still blocked
    gate.set()
    a.synchronize(timeout=10)
    assert seen == list(range(50))
    assert a.query()


def test_event_orders_work_across_streams(pair):
    a, b = pair
    seen: list[str] = []
    gate = threading.Event()
    a.submit(gate.wait, 30)
    a.submit(seen.append, "a")
    event = a.record_event()
    b.wait_event(event)
    after = b.submit(seen.append, "b")
    b_ran_first = after.done() or seen != []
    gate.set()
    after.result(timeout=30)
    assert not b_ran_first
    assert seen == ["a", "b"]
    assert event.query()


def test_wait_captures_latest_record_and_unrecorded_event_is_noop(pair):
    a, b = pair
    event = Event("cpu")
    b.wait_event(event)  # never recorded: no-op
    assert b.submit(lambda: 1).result(timeout=10) == 1
    gate = threading.Event()
    a.submit(gate.wait)
    event.record(a)
    assert not event.query()
    gate.set()
    event.synchronize(timeout=10)
    assert event.query()


def test_worker_exception_surfaces_on_waiter_with_traceback(pair):
    a, b = pair

    def explode():
        raise ValueError("boom on worker")

    failed = a.submit(explode)
    skipped = a.submit(lambda: "never")
    event = a.record_event()
    b.wait_event(event)
    downstream = b.submit(lambda: "never either")
    with pytest.raises(ValueError, match="boom on worker") as info:
        failed.result(timeout=10)
    frames = "".join(traceback.format_tb(info.value.__traceback__))
    assert "explode" in frames  # the worker's frame is kept
    assert any("stream 'a'" in n for n in info.value.__notes__)
    with pytest.raises(ValueError, match="boom"):
        skipped.result(timeout=10)
    with pytest.raises(ValueError, match="boom"):
        downstream.result(timeout=10)
    with pytest.raises(ValueError, match="boom"):
        event.synchronize(timeout=10)
    with pytest.raises(ValueError, match="boom"):
        a.synchronize(timeout=10)
    a.synchronize(timeout=10)  # reported once: clean again
    assert a.submit(lambda: 7).result(timeout=10) == 7


def test_synchronize_timeout_raises_comm_timeout(pair):
    a, _ = pair
    gate = threading.Event()
    a.submit(gate.wait)
    with pytest.raises(CommTimeoutError, match="stream 'a' not reached"):
        a.synchronize(timeout=0.01)
    gate.set()
    with pytest.raises(ValueError, match="timeout must be"):
        a.synchronize(timeout=-1)


def test_current_stream_defaults_to_host_and_none_never_creates(pair):
    a, _ = pair
    host = current_stream("cpu")
    assert host.is_host and current_stream() is host
    assert host.submit(lambda: threading.current_thread()).result() is threading.current_thread()
    with streams.stream(a):
        assert current_stream("cpu") is a
        with streams.stream(None):
            assert current_stream("cpu") is a
    assert current_stream("cpu") is host
    assert a.submit(lambda: current_stream("cpu")).result(timeout=10) is a


def test_host_stream_waits_synchronously(pair):
    a, _ = pair
    host = current_stream("cpu")
    seen: list[str] = []
    a.submit(time.sleep, 0.03)
    a.submit(seen.append, "worker")
    host.wait_event(a.record_event())  # blocks the caller until the worker reached the record
    assert seen == ["worker"]


def test_module_synchronize_and_close_are_idempotent():
    s = Stream("cpu", name="tmp")
    s.submit(time.sleep, 0.01)
    streams.synchronize("cpu", timeout=10)
    assert s.query()
    s.close()
    s.close()
    with pytest.raises(RuntimeError, match="closed"):
        s.submit(lambda: None)


def test_bad_arguments_are_named(pair):
    a, _ = pair
    with pytest.raises(ValueError, match="device type must be one of"):
        streams.resolve_device("meta")
    with pytest.raises(TypeError, match="device must be"):
        streams.resolve_device(3)
    with pytest.raises(TypeError, match="event must be"):
        a.wait_event("e0")
    with pytest.raises(TypeError, match="s must be"):
        with streams.stream("compute"):
            pass


@pytest.mark.asyncio
async def test_futures_are_awaitable_without_blocking_the_loop(pair):
    a, _ = pair
    gate = threading.Event()
    future = a.submit(lambda: 42 if gate.wait(30) else "the loop never opened the gate")

    async def opener():
        await asyncio.sleep(0)
        gate.set()  # only possible if awaiting the future left the loop free to run this task

    result, _ = await asyncio.gather(asyncio.wrap_future(future), opener())
    assert result == 42


# ---- pooled streams, host stream, many waiters (appended) ---------------------------------------
def test_pooled_gives_one_stream_per_device_and_name_and_replaces_a_closed_one():
    a = streams.pooled("t_pool", "cpu")
    assert streams.pooled("t_pool", "cpu") is a and streams.pooled("t_pool") is a
    b = streams.pooled("t_pool_other", "cpu")
    assert b is not a and not a.is_host
    a.close()
    c = streams.pooled("t_pool", "cpu")
    assert c is not a and c.submit(lambda: 5).result(timeout=10) == 5
    c.close()
    b.close()


def test_host_stream_is_the_callers_thread():
    host = streams.host_stream()
    assert host.is_host and host is current_stream("cpu")
    assert host.submit(threading.get_ident).result() == threading.get_ident()


def test_one_record_releases_every_waiter(pair):
    a, _ = pair
    gate = threading.Event()
    a.submit(gate.wait)
    event = a.record_event()
    released: list[int] = []
    waiters = [
        threading.Thread(target=lambda i=i: (event.synchronize(timeout=10), released.append(i))) for i in range(5)
    ]
    for t in waiters:
        t.start()
    assert not event.query()
    gate.set()
    for t in waiters:
        t.join(10)
    assert sorted(released) == list(range(5)) and event.query()
