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
import concurrent.futures
import os
import threading
from typing import Any, Coroutine, Optional, TypeVar

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


async def call(coroutine: Coroutine[Any, Any, T]) -> T:
    """Awaits ``coroutine`` run on the client's loop, from the caller's own loop.
    Cancelling the caller cancels it there too."""
    if on_client_thread():
        return await coroutine
    return await asyncio.wrap_future(submit(coroutine))


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
