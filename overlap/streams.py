"""Streams and events, one abstraction over ``torch.npu``, ``torch.cuda`` and the CPU.

Owns: `Stream`, `Event`, `current_stream`, `host_stream`, the per-device stream pool (`pooled`),
the `stream` context and `synchronize`.

* **npu / cuda**: a `Stream` wraps a ``torch.<dev>.Stream`` and an `Event` a ``torch.<dev>.Event``.
  `Stream.submit` runs the callable at once on the calling thread under the torch stream context,
  so the kernels it launches are queued on that stream; the device runs them later.
  ``torch_npu`` is imported lazily, only when an ``npu`` device is asked for.
* **cpu**: torch has no CPU events, so a `Stream` is an *ordered worker*: a daemon thread that runs
  the submitted callables one after another, asynchronously to the caller. An `Event` marks a
  point on a stream (everything submitted before the record); another stream, or the host, can
  wait for that point. The default current stream on CPU is the *host stream*: the calling thread
  itself, which runs submitted work synchronously.

Semantics shared by every backend (as in ``torch.cuda``):

* ``stream=None`` always means the current stream, never a new one.
* ``stream.wait_event(event)`` makes later work on ``stream`` wait for the most recent
  ``record`` of ``event`` made *before* the call; waiting for a never-recorded event is a no-op.
  Because a wait captures an already-queued record, CPU workers that only talk through events
  cannot deadlock each other.
* On CPU an exception raised by a job fails that job's future and poisons the stream: later jobs
  on it are skipped (their futures fail with the same exception), events recorded after it carry
  it, and streams that wait on such an event are poisoned in turn. The exception object (with its
  original worker traceback, and a note naming the stream) is raised on the *waiter*: the host
  thread calling ``future.result()``, ``Event.synchronize()`` or ``Stream.synchronize()``. A
  stream's ``synchronize()`` reports the poison once and leaves the stream clean again.

Pool: `pooled(name, device)` hands out one stream per (device, name) for the life of the process,
so that runners (`overlap.graph.Plan.run`) reuse their streams instead of making new ones per run.

Shutdown: workers are daemon threads, `Stream.close` stops one (after the work already queued),
and an ``atexit`` hook empties the pool and closes every live worker without blocking the
interpreter's exit.

This module must never import ``torch_npu`` unless an ``npu`` device is used, never create a
stream when given ``None``, and never run a CPU job on a thread other than its stream's worker
(the host stream's worker is the thread that submits).
"""

from __future__ import annotations

import _thread
import atexit
import concurrent.futures as cf
import contextlib
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .errors import CommTimeoutError, add_note

__all__ = [
    "Stream",
    "Event",
    "current_stream",
    "stream",
    "synchronize",
    "resolve_device",
    "host_stream",
    "pooled",
    "defer_record",
]

_DEVICE_TYPES = ("cpu", "cuda", "npu")
_local = threading.local()  # .stack: list[Stream] (the `stream` contexts of this thread)
_names = itertools.count()


def _import_torch_npu() -> None:
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
    except ImportError as exc:  # pragma: no cover - only on machines asking for npu without CANN
        raise ImportError(
            "device 'npu' needs torch_npu and Ascend CANN: pip install moe-overlap[npu] on an Ascend machine"
        ) from exc


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """Resolve ``device`` to a `torch.device` of type cpu, cuda or npu.

    Args:
        device: a device, a string such as ``"cuda:1"``, or None for the device in use
            (``torch.get_default_device()``, cpu unless the caller changed it).

    Returns:
        torch.device: the resolved device.

    Raises:
        TypeError: ``device`` is not a device, a string or None.
        ValueError: the device type is not one of cpu, cuda, npu.
    """
    if device is None:
        device = torch.get_default_device()
    if isinstance(device, str):
        if device.startswith("npu"):
            _import_torch_npu()
        device = torch.device(device)
    if not isinstance(device, torch.device):
        raise TypeError(f"device must be a torch.device, a str or None, got {type(device).__name__}")
    if device.type not in _DEVICE_TYPES:
        raise ValueError(f"device type must be one of {_DEVICE_TYPES}, got {device.type!r}")
    if device.type == "npu":
        _import_torch_npu()
    return device


def _torch_module(device: torch.device) -> Any:
    return torch.cuda if device.type == "cuda" else torch.npu  # type: ignore[attr-defined]  # torch_npu adds it


class _Marker:
    """One record of a CPU event: set when the stream reaches it; carries the stream's poison.

    A bare ``_thread`` lock held until `set` (not a ``threading.Event``, whose Condition costs
    several µs of Python per wait): a waiter blocks in C on the lock and passes it on.
    """

    __slots__ = ("_lock", "is_set", "error")

    def __init__(self, done: bool = False) -> None:
        self._lock = _thread.allocate_lock()
        self.is_set = done
        self.error: BaseException | None = None
        if not done:
            self._lock.acquire()

    def set(self) -> None:
        self.is_set = True
        self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until `set` (or ``timeout`` seconds); return whether it was set."""
        if self.is_set:
            return True
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            return False
        self._lock.release()  # let the next waiter through
        return True


_DONE = _Marker(done=True)  # the record of a host event: reached at once, never poisoned
_RUN, _RECORD, _WAIT, _CLEAR = 0, 1, 2, 3


class Stream:
    """An ordered queue of work on one device.

    ``Stream(device=None, name=None)`` creates a *new* stream: a torch stream on npu/cuda, a
    worker thread on cpu. Use `current_stream` for the current one.

    Args:
        device: the device (None: ``torch.get_default_device()``).
        name: a label for traces and error notes (default ``"stream<N>"``).
    """

    device: torch.device
    name: str
    is_host: bool = False

    def __new__(cls, device: torch.device | str | None = None, **kwargs: Any) -> Stream:
        if cls is Stream:
            cls = _CpuStream if resolve_device(device).type == "cpu" else _TorchStream
        return super().__new__(cls)

    def __init__(self, device: torch.device | str | None = None, *, name: str | None = None) -> None:
        self.device = resolve_device(device)
        self.name = name if name is not None else f"stream{next(_names)}"

    # The interface; each backend implements it.
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        """Queue ``fn(*args, **kwargs)`` on this stream.

        Returns at once with a `concurrent.futures.Future` of the result (on cpu workers the call
        runs later, after all earlier work of this stream; on npu/cuda and the host stream it has
        already run on the calling thread, and the kernels it launched are queued on the stream).
        ``await asyncio.wrap_future(f)`` waits without blocking an event loop.
        """
        raise NotImplementedError

    def record_event(self, event: Event | None = None) -> Event:
        """Record ``event`` (a new one if None) at the current end of this stream.

        Returns the event at once; it completes when all work submitted before this call has
        completed.
        """
        raise NotImplementedError

    def wait_event(self, event: Event) -> None:
        """Make all work submitted to this stream *later* wait for ``event``'s latest record.

        Returns at once (the host stream, being synchronous, waits here and raises the
        recorded stream's error if it failed).
        """
        raise NotImplementedError

    def wait_stream(self, other: Stream) -> None:
        """Make later work on this stream wait for all work submitted to ``other`` so far.

        Returns at once; only affects later work on this stream.
        """
        self.wait_event(other.record_event())

    def synchronize(self, timeout: float | None = None) -> None:
        """Block the calling thread until all work submitted so far has completed.

        Raises:
            BaseException: the first exception a job of this stream raised (cpu), once.
            CommTimeoutError: ``timeout`` seconds passed first.
        """
        raise NotImplementedError

    def query(self) -> bool:
        """Return at once whether all work submitted so far has completed."""
        raise NotImplementedError

    def close(self, timeout: float | None = 1.0) -> None:
        """Stop accepting work; the work already queued still runs (cpu workers). Idempotent."""

    def clear_after(self) -> None:
        """Let work submitted from now on run even if earlier work failed (cpu workers; elsewhere
        nothing to do). Returns at once."""

    def __enter__(self) -> Stream:
        _stack().append(self)
        return self

    def __exit__(self, *exc_info: object) -> None:
        _stack().pop()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={str(self.device)!r}, name={self.name!r})"


class _CpuStream(Stream):
    """A worker thread running its jobs in submission order."""

    def __init__(self, device: torch.device | str | None = None, *, name: str | None = None) -> None:
        super().__init__(device, name=name)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._num_submitted = 0  # written by submitters under the lock
        self._num_finished = 0  # written by the worker only
        self._thread = threading.Thread(target=self._loop, name=f"overlap-{self.name}", daemon=True)
        self._thread.start()
        _workers.add(self)

    def _loop(self) -> None:
        _local.stack = [self]
        get = self._queue.get
        while True:
            item = get()
            if item is None:
                return
            tag, a, b = item
            if tag == _RUN:  # a: () -> result, b: Future
                if self._error is not None:
                    b.set_exception(self._error)
                elif b.set_running_or_notify_cancel():
                    try:
                        b.set_result(a())
                    except BaseException as exc:  # noqa: BLE001 - surfaced on the waiter
                        add_note(exc, f"(raised on stream {self.name!r})")
                        self._error = exc
                        b.set_exception(exc)
                self._num_finished += 1
            elif tag == _RECORD:  # a: _Marker
                a.error = self._error
                a.set()
            elif tag == _WAIT:  # a: _Marker
                a.wait()
                if a.error is not None and self._error is None:
                    self._error = a.error
            else:  # _CLEAR: later work runs again, whatever poisoned the earlier work
                self._error = None

    def _put(self, item: tuple) -> None:
        if self._closed:
            raise RuntimeError(f"stream {self.name!r} is closed")
        self._queue.put(item)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        future: cf.Future = cf.Future()
        job = (lambda: fn(*args, **kwargs)) if (args or kwargs) else fn
        with self._lock:
            self._put((_RUN, job, future))
            self._num_submitted += 1
        return future

    def record_event(self, event: Event | None = None) -> Event:
        event = Event(self.device) if event is None else event
        marker = _Marker()
        self._put((_RECORD, marker, None))
        event._marker = marker
        return event

    def wait_event(self, event: Event) -> None:
        marker = _check_cpu_event(event)
        if marker is not None and not (marker.is_set and marker.error is None):  # else: no-op
            self._put((_WAIT, marker, None))

    def synchronize(self, timeout: float | None = None) -> None:
        marker = _Marker()
        self._put((_RECORD, marker, None))
        _wait_marker(marker, timeout, f"stream {self.name!r}")
        if marker.error is not None:
            error, self._error = marker.error, None
            raise error

    def query(self) -> bool:
        return self._num_finished == self._num_submitted

    def clear_after(self) -> None:
        """Let work submitted from now on run even if work queued before was poisoned (that work
        is still skipped, its futures still fail). Returns at once."""
        self._put((_CLEAR, None, None))

    def close(self, timeout: float | None = 1.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        _workers.discard(self)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)


class _HostStream(Stream):
    """The calling thread itself: work runs synchronously inside `submit`."""

    is_host = True

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        future: cf.Future = cf.Future()
        future.set_running_or_notify_cancel()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - the future carries it, as on a worker
            future.set_exception(exc)
        return future

    def record_event(self, event: Event | None = None) -> Event:
        event = Event(self.device) if event is None else event
        event._marker = _DONE
        return event

    def wait_event(self, event: Event) -> None:
        event.synchronize()

    def synchronize(self, timeout: float | None = None) -> None:
        return None

    def query(self) -> bool:
        return True


class _TorchStream(Stream):
    """A ``torch.cuda.Stream`` / ``torch.npu.Stream``."""

    def __init__(
        self,
        device: torch.device | str | None = None,
        *,
        name: str | None = None,
        torch_stream: Any = None,
    ) -> None:
        super().__init__(device, name=name)
        self._module = _torch_module(self.device)
        self._torch = torch_stream if torch_stream is not None else self._module.Stream(self.device)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        future: cf.Future = cf.Future()
        future.set_running_or_notify_cancel()
        with self._module.stream(self._torch):
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001
                future.set_exception(exc)
        return future

    def record_event(self, event: Event | None = None) -> Event:
        event = Event(self.device) if event is None else event
        event._torch_event().record(self._torch)
        return event

    def wait_event(self, event: Event) -> None:
        if event._torch is not None:
            self._torch.wait_event(event._torch)

    def synchronize(self, timeout: float | None = None) -> None:
        self._torch.synchronize()

    def query(self) -> bool:
        return bool(self._torch.query())


class Event:
    """A point on a stream that other streams, or the host, can wait for.

    Args:
        device: the device (None: ``torch.get_default_device()``).
        name: a label for error messages.
    """

    def __init__(self, device: torch.device | str | None = None, *, name: str | None = None) -> None:
        self.device = resolve_device(device)
        self.name = name if name is not None else f"event{next(_names)}"
        self._marker: _Marker | None = None  # cpu: the latest record
        self._torch: Any = None  # npu/cuda: created on first record

    def _torch_event(self) -> Any:
        if self._torch is None:
            self._torch = _torch_module(self.device).Event()
        return self._torch

    def record(self, stream: Stream | None = None) -> None:
        """Record on ``stream`` (None: the current stream). Returns at once."""
        (stream if stream is not None else current_stream(self.device)).record_event(self)

    def wait(self, stream: Stream | None = None) -> None:
        """Make later work on ``stream`` (None: the current stream) wait for this event.

        Returns at once, except on the host stream, which waits here.
        """
        (stream if stream is not None else current_stream(self.device)).wait_event(self)

    def synchronize(self, timeout: float | None = None) -> None:
        """Block the calling thread until the latest record is reached.

        Raises:
            BaseException: the exception that poisoned the recording stream (cpu).
            CommTimeoutError: ``timeout`` seconds passed first.
        """
        if self.device.type != "cpu":
            if self._torch is not None:
                self._torch.synchronize()
            return
        if self._marker is None:
            return
        _wait_marker(self._marker, timeout, f"event {self.name!r}")
        if self._marker.error is not None:
            raise self._marker.error

    def query(self) -> bool:
        """Return at once whether the latest record has been reached (True if never recorded)."""
        if self.device.type != "cpu":
            return self._torch is None or bool(self._torch.query())
        return self._marker is None or self._marker.is_set

    def __repr__(self) -> str:
        return f"Event(device={str(self.device)!r}, name={self.name!r})"


def defer_record(event: Event) -> Callable[[BaseException | None], None]:
    """Record a cpu ``event`` at a point the caller will reach later, and return how to reach it.

    The host stream runs its work inside `submit`, so it can only record what it has already run;
    a runner that queues worker work ahead of the host's (`overlap.graph.Plan.run`) records the
    host's events this way first: waits made from now on wait for this record. Call the returned
    function exactly once: with None when the host reached the point, or with the exception that
    stopped it (waiting streams are then poisoned with it, as by a failed worker job).

    Raises:
        TypeError: ``event`` is not a cpu `Event`.
    """
    _check_cpu_event(event)
    marker = _Marker()
    event._marker = marker

    def reach(error: BaseException | None = None) -> None:
        marker.error = error
        marker.set()

    return reach


def _check_cpu_event(event: Event) -> _Marker | None:
    if not isinstance(event, Event):
        raise TypeError(f"event must be an overlap.streams.Event, got {type(event).__name__}")
    if event.device.type != "cpu":
        raise TypeError(f"a cpu stream cannot wait for a {event.device.type} event ({event.name!r})")
    return event._marker


def _wait_marker(marker: _Marker, timeout: float | None, what: str) -> None:
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout must be None or >= 0 seconds, got {timeout}")
    if not marker.wait(timeout):
        raise CommTimeoutError(f"{what} not reached within {timeout} s")


_workers: set[_CpuStream] = set()
_host = _HostStream("cpu", name="host")


def _stack() -> list[Stream]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def host_stream() -> Stream:
    """The cpu host stream: the calling thread itself (work submitted to it runs inside `submit`)."""
    return _host


_pool: dict[tuple[torch.device, str], Stream] = {}
_pool_lock = threading.Lock()


def pooled(name: str, device: torch.device | str | None = None) -> Stream:
    """The process-wide stream called ``name`` on ``device``: made on first use, then reused.

    One per (device, name) for the life of the process (a cpu worker thread, or a torch stream on
    npu/cuda, where a device without an index means the current one); closed at interpreter exit.
    A pooled cpu worker that was closed is replaced by a new one.

    Args:
        name: the stream's label (``"comm_setup"``).
        device: the device (None: ``torch.get_default_device()``).
    """
    dev = resolve_device(device)
    if dev.type != "cpu" and dev.index is None:
        dev = torch.device(dev.type, _torch_module(dev).current_device())
    key = (dev, name)
    with _pool_lock:
        s = _pool.get(key)
        if s is None or getattr(s, "_closed", False):
            s = _pool[key] = Stream(dev, name=name)
        return s


def current_stream(device: torch.device | str | None = None) -> Stream:
    """Return the current stream of ``device`` for the calling thread (never a new queue).

    On cpu that is the innermost `stream` context, the worker's own stream inside a job, or else
    the host stream (the calling thread, synchronous). On npu/cuda it is the innermost `stream`
    context or torch's current stream, wrapped.
    """
    dev = resolve_device(device)
    for s in reversed(_stack()):
        if s.device == dev or (s.device.type == dev.type and dev.index is None):
            return s
    if dev.type == "cpu":
        return _host
    module = _torch_module(dev)
    return _TorchStream(dev, name="default", torch_stream=module.current_stream(dev))


@contextlib.contextmanager
def stream(s: Stream | None) -> Iterator[Stream | None]:
    """Make ``s`` the current stream inside the block (None: leave the current one unchanged).

    On npu/cuda this also enters ``torch.<dev>.stream`` so kernels launched inside are queued on it.
    """
    if s is None:
        yield None
        return
    if not isinstance(s, Stream):
        raise TypeError(f"s must be an overlap.streams.Stream or None, got {type(s).__name__}")
    with contextlib.ExitStack() as stack:
        if isinstance(s, _TorchStream):
            stack.enter_context(s._module.stream(s._torch))
        stack.enter_context(s)
        yield s


def synchronize(device: torch.device | str | None = None, timeout: float | None = None) -> None:
    """Block until all work on ``device`` has completed (cpu: every live worker stream).

    Raises:
        BaseException: the first error of a cpu worker (after all of them were synchronized).
    """
    dev = resolve_device(device)
    if dev.type != "cpu":
        _torch_module(dev).synchronize(dev)
        return
    first: BaseException | None = None
    for worker in sorted(_workers, key=lambda w: w.name):
        try:
            worker.synchronize(timeout)
        except CommTimeoutError:
            raise
        except BaseException as exc:  # noqa: BLE001
            first = first or exc
    if first is not None:
        raise first


@atexit.register
def _close_all() -> None:
    deadline = time.monotonic() + 1.0
    _pool.clear()
    for worker in list(_workers):
        worker.close(timeout=max(0.0, deadline - time.monotonic()))
