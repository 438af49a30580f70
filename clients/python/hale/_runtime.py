"""The client's own thread: an asyncio loop that owns every session's socket, heartbeats
and reconnects, whatever the application's code does.

An agent's work often blocks: a model SDK called synchronously, a tool that shells out, a
CPU-bound parse. Were the session on the application's loop, a call that blocks for two
seconds would stop its heartbeats and hale would declare the agent down. So the session
runs here, on a daemon thread started the first time a session opens, and the
application's calls (from any thread, from any event loop, or from no loop at all) are
handed to it.

One loop serves every session of the process. A child made by ``fork`` gets a loop of its
own the first time it opens a session.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import os
import threading
import weakref
from typing import Any, Callable, Coroutine, List, Optional, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_loop: Optional[asyncio.AbstractEventLoop] = None
_pid: Optional[int] = None


def _serve(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
    asyncio.set_event_loop(loop)
    loop.call_soon(ready.set)
    loop.run_forever()


def loop() -> asyncio.AbstractEventLoop:
    """The client's loop, started on its thread if it is not running yet."""
    global _loop, _pid
    with _lock:
        if _loop is None or _pid != os.getpid() or _loop.is_closed():
            fresh = asyncio.new_event_loop()
            ready = threading.Event()
            thread = threading.Thread(target=_serve, args=(fresh, ready), name="hale-client", daemon=True)
            thread.start()
            ready.wait()
            _loop, _pid = fresh, os.getpid()
        return _loop


def on_client_thread() -> bool:
    """Whether the caller runs on the client's own loop."""
    try:
        return asyncio.get_running_loop() is _loop
    except RuntimeError:
        return False


def submit(coroutine: Coroutine[Any, Any, T]) -> "concurrent.futures.Future[T]":
    """Runs ``coroutine`` on the client's loop; its future, for any thread."""
    return asyncio.run_coroutine_threadsafe(coroutine, loop())


class _Inbox:
    """Callbacks handed to one event loop from other threads, run in batches: however many
    arrive while the loop is busy, it is woken once (one write to its self-pipe), not once
    each. Pipelined calls cross between the threads in groups this way."""

    def __init__(self, target: asyncio.AbstractEventLoop) -> None:
        self.loop = target
        self._lock = threading.Lock()
        self._items: "collections.deque[Callable[[], None]]" = collections.deque()
        self._woken = False

    def put(self, item: Callable[[], None]) -> None:
        with self._lock:
            self._items.append(item)
            if self._woken:
                return
            self._woken = True
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, collections.deque()
            self._woken = False
        for item in items:
            item()


_inboxes: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Inbox]" = weakref.WeakKeyDictionary()


def _inbox(target: asyncio.AbstractEventLoop) -> _Inbox:
    with _lock:
        found = _inboxes.get(target)
        if found is None:
            found = _inboxes[target] = _Inbox(target)
        return found


async def call(coroutine: Coroutine[Any, Any, T]) -> T:
    """Awaits ``coroutine`` run on the client's loop, from the caller's own loop.
    Cancelling the caller cancels it there too."""
    if on_client_thread():
        return await coroutine
    caller = asyncio.get_running_loop()
    answer: "asyncio.Future[T]" = caller.create_future()
    back = _inbox(caller)
    client = _inbox(loop())
    started: List["asyncio.Task[T]"] = []

    def settle(task: "asyncio.Task[T]") -> None:
        def deliver() -> None:
            if answer.done():
                return
            if task.cancelled():
                answer.cancel()
            elif task.exception() is not None:
                answer.set_exception(task.exception())  # type: ignore[arg-type]
            else:
                answer.set_result(task.result())

        back.put(deliver)

    def start() -> None:
        task = client.loop.create_task(coroutine)
        started.append(task)
        task.add_done_callback(settle)

    client.put(start)
    try:
        return await answer
    except asyncio.CancelledError:
        # The caller gave up: so does the call (once it has started on the client's loop).
        def cancel() -> None:
            for task in started:
                task.cancel()

        client.put(cancel)
        raise


def block(coroutine: Coroutine[Any, Any, T], timeout: Optional[float] = None) -> T:
    """Runs ``coroutine`` on the client's loop and waits for it, blocking the calling
    thread (which must not be the client's own)."""
    if on_client_thread():
        coroutine.close()
        raise RuntimeError("a blocking hale call was made on the hale client's own thread")
    future = submit(coroutine)
    try:
        return future.result(timeout)
    except BaseException:
        future.cancel()
        raise
