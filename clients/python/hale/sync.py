"""hale for code that is not asyncio: scripts, threads, frameworks with their own loop.

:class:`Agent` here has the methods of :class:`hale.Agent`, each blocking until hale has
answered; the session, its heartbeats and its reconnects run on the client's own thread
as they do for the asyncio agent. Steps are :func:`hale.step` functions (plain ones)
called inside ``with agent.work_on(task):``::

    import hale, hale.sync

    @hale.step()
    def search(query: str) -> list:
        return web.search(query)              # may block for as long as it needs

    agent = hale.sync.Agent.from_env()
    for task in agent.tasks():
        with agent.work_on(task):
            hits = search(task.payload["query"])
        agent.complete(task, {"hits": hits})

:class:`Admin` is the blocking admin (HTTP) API, :class:`hale.SyncAdmin`.

Do not call it from the client's own thread (a progress callback, say): it would wait
for itself.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import signal
import threading
from typing import Any, Callable, Coroutine, Iterator, Mapping, Optional, Sequence, TypeVar, Union

from . import _runtime
from ._core import AgentCore, env_settings
from .admin import SyncAdmin, TaskInfo
from .agent import HEARTBEAT, StepContext, WorkScope, _Facade, _settle
from .errors import HaleError
from .steps import RETRY, Check, _Options
from .types import (
    JSON,
    LlmLike,
    Message,
    ProgressLike,
    Reconnect,
    RecoveryPoint,
    RolledBack,
    SentMessage,
    Submitted,
    Task,
)

T = TypeVar("T")

Admin = SyncAdmin
"""The blocking admin (HTTP) API: :class:`hale.SyncAdmin`."""

__all__ = ["Admin", "Agent", "StepContext", "TaskHandle", "WorkScope", "stop_on_sigterm"]


def _block(coroutine: Coroutine[Any, Any, T]) -> T:
    return _runtime.block(coroutine)


class Agent(_Facade):
    """A session of one agent with hale, for code that blocks. See :class:`hale.Agent`:
    the same session, the same meaning for every method; each returns once hale has
    answered (for writes: once they are durable)."""

    @classmethod
    def connect(
        cls,
        url: Union[str, Sequence[str]],
        name: str,
        role: str,
        *,
        labels: Optional[Mapping[str, str]] = None,
        incarnation: Optional[int] = None,
        token: Optional[str] = None,
        refresh_token: Optional[str] = None,
        ca_file: Optional[str] = None,
        reconnect: Optional[Reconnect] = None,
        refresh_ahead: float = 60.0,
        heartbeat: Optional[float] = HEARTBEAT,
    ) -> Agent:
        """Opens a session and says hello (see :meth:`hale.Agent.connect`)."""
        core = _block(
            AgentCore.open(
                url,
                name,
                role,
                labels=labels,
                incarnation=incarnation,
                token=token,
                refresh_token=refresh_token,
                ca_file=ca_file,
                reconnect=reconnect,
                refresh_ahead=refresh_ahead,
                heartbeat=heartbeat,
            )
        )
        return cls(core)

    @classmethod
    def from_env(
        cls,
        role: Optional[str] = None,
        *,
        reconnect: Optional[Reconnect] = Reconnect(),
        labels: Optional[Mapping[str, str]] = None,
        env: Optional[Mapping[str, str]] = None,
        heartbeat: Optional[float] = HEARTBEAT,
    ) -> Agent:
        """Connects as the agent hale started (see :meth:`hale.Agent.from_env`)."""
        settings = env_settings(role, env)
        return cls.connect(
            settings.pop("url"),
            settings.pop("name"),
            settings.pop("role"),
            labels=labels,
            reconnect=reconnect,
            heartbeat=heartbeat,
            **settings,
        )

    # ---- state -----------------------------------------------------------------------

    def checkpoint(self, patch: Mapping[str, JSON], expected_version: Optional[int] = None) -> int:
        """See :meth:`hale.Agent.checkpoint`."""
        return _block(self._core.checkpoint(patch, expected_version))

    def recovery_point(self, name: str) -> RecoveryPoint:
        """See :meth:`hale.Agent.recovery_point`."""
        return _block(self._core.recovery_point(name))

    def rollback(self, to: Union[int, str]) -> RolledBack:
        """See :meth:`hale.Agent.rollback`."""
        return _block(self._core.rollback(to))

    # ---- liveness --------------------------------------------------------------------

    def heartbeat(self, progress: ProgressLike = None) -> None:
        """See :meth:`hale.Agent.heartbeat`."""
        _block(self._core.heartbeat(progress))

    def challenged(self, timeout: Optional[float] = None) -> bool:
        """Waits until hale challenges this agent (True) or ``timeout`` passes (False)."""
        try:
            _runtime.block(self._core.challenged(), timeout)
            return True
        except (TimeoutError, concurrent.futures.TimeoutError):
            return False

    def start_heartbeats(
        self, interval: float = HEARTBEAT, progress: Optional[Callable[[], ProgressLike]] = None
    ) -> None:
        """See :meth:`hale.Agent.start_heartbeats` (``progress`` is called on the client's
        thread)."""
        core = self._core

        def start() -> None:
            core.progress_source = progress
            core.start_beating(interval)

        _runtime.loop().call_soon_threadsafe(start)

    def stop_heartbeats(self) -> None:
        """See :meth:`hale.Agent.stop_heartbeats`."""
        _runtime.loop().call_soon_threadsafe(self._core.stop_beating)

    def busy(self, seconds: float) -> None:
        """See :meth:`hale.Agent.busy`."""
        _block(self._core.busy(seconds))

    @contextlib.contextmanager
    def long_call(self, seconds: float) -> Iterator[None]:
        """Brackets a call that may take longer than the stall detector allows::

            with agent.long_call(600):
                report = deep_research(topic)
        """
        self.busy(seconds)
        try:
            yield
        finally:
            with contextlib.suppress(HaleError):
                self.busy(0)

    def report_error(self, message: Optional[str] = None) -> None:
        """See :meth:`hale.Agent.report_error`."""
        _block(self._core.report_error(message))

    def report_violation(self, reason: str, *, about: Optional[str] = None, critical: bool = False) -> None:
        """See :meth:`hale.Agent.report_violation`."""
        _block(self._core.report_violation(reason, about=about, critical=critical))

    # ---- tasks -----------------------------------------------------------------------

    def next_task(self, timeout: Optional[float] = None) -> Optional[Task]:
        """See :meth:`hale.Agent.next_task`."""
        return _block(self._core.next_task(timeout))

    def tasks(self) -> Iterator[Task]:
        """The tasks leased to this run, until the session ends."""
        while True:
            task = self.next_task()
            if task is None:
                return
            yield task

    def wait_cancelled(self, task: Union[Task, int], timeout: Optional[float] = None) -> bool:
        """Waits until hale cancels ``task`` (True) or ``timeout`` passes (False)."""
        task_id = task.task if isinstance(task, Task) else task
        try:
            _runtime.block(self._core.wait_cancelled(task_id), timeout)
            return True
        except (TimeoutError, concurrent.futures.TimeoutError):
            return False

    def run_step(
        self,
        task: Task,
        name: str,
        body: Callable[[], Any],
        *,
        uncertain: Union[str, Check] = RETRY,
        timeout: Optional[float] = None,
        reserve_tokens: Optional[int] = None,
    ) -> JSON:
        """See :meth:`hale.Agent.run_step`; ``body`` runs on the calling thread."""
        return self._work(task).drive_blocking(name, body, _Options(uncertain, timeout, reserve_tokens))

    def intend_step(self, task: Union[Task, int], name: str) -> None:
        """See :meth:`hale.Agent.intend_step`."""
        _block(self._core.intend_step(task.task if isinstance(task, Task) else task, name))

    def commit_step(
        self,
        task: Union[Task, int],
        name: str,
        result: JSON = None,
        *,
        llm: LlmLike = None,
        compensation: JSON = None,
        reservation: Optional[int] = None,
    ) -> None:
        """See :meth:`hale.Agent.commit_step`."""
        task_id = task.task if isinstance(task, Task) else task
        _block(self._core.commit_step(task_id, name, result, llm=llm, compensation=compensation, reservation=reservation))

    @contextlib.contextmanager
    def step(self, task: Union[Task, int], name: str) -> Iterator[StepContext]:
        """See :meth:`hale.Agent.step`."""
        task_id = task.task if isinstance(task, Task) else task
        prior = task.step(name) if isinstance(task, Task) else None
        context = StepContext(task_id, name, prior.state if prior is not None else None)
        self.intend_step(task_id, name)
        yield context
        self.commit_step(task_id, name, context.result, llm=context.llm, compensation=context.compensation)

    def complete(self, task: Union[Task, int], result: JSON = None) -> None:
        """See :meth:`hale.Agent.complete`."""
        task_id = task.task if isinstance(task, Task) else task
        _block(self._core.complete(task_id, result))
        self._forget(task_id)

    def fail(self, task: Union[Task, int], reason: str, *, retry: bool = True) -> None:
        """See :meth:`hale.Agent.fail`."""
        task_id = task.task if isinstance(task, Task) else task
        _block(self._core.fail(task_id, reason, retry=retry))
        self._forget(task_id)

    def submit(
        self,
        role: str,
        payload: JSON = None,
        *,
        priority: Optional[str] = None,
        idempotency_key: Optional[str] = None,
        max_attempts: Optional[int] = None,
        deadline_ms: Optional[int] = None,
        retry_backoff_ms: Optional[int] = None,
        shadow: Optional[Mapping[str, JSON]] = None,
        fallback: Optional[Sequence[Mapping[str, JSON]]] = None,
        budget: Optional[Mapping[str, JSON]] = None,
    ) -> "TaskHandle":
        """See :meth:`hale.Agent.submit`."""
        submitted: Submitted = _block(
            self._core.submit(
                role,
                payload,
                priority=priority,
                idempotency_key=idempotency_key,
                max_attempts=max_attempts,
                deadline_ms=deadline_ms,
                retry_backoff_ms=retry_backoff_ms,
                shadow=shadow,
                fallback=fallback,
                budget=budget,
            )
        )
        return TaskHandle(self, submitted)

    def result(self, task: Union["TaskHandle", int], timeout: Optional[float] = None) -> TaskInfo:
        """See :meth:`hale.Agent.result`."""
        task_id = task.task if isinstance(task, TaskHandle) else task
        outcome = _block(self._core.outcome(task_id, timeout))
        return _settle(task_id, outcome, self.closed, timeout)

    def next_outcome(self, timeout: Optional[float] = None) -> Optional[TaskInfo]:
        """See :meth:`hale.Agent.next_outcome`."""
        return _block(self._core.next_outcome(timeout))

    # ---- budgets ---------------------------------------------------------------------

    def reserve(self, tokens: int = 0, cost: int = 0, *, task: Optional[int] = None) -> int:
        """See :meth:`hale.Agent.reserve`."""
        return _block(self._core.reserve(tokens, cost, task=task))

    def report_spend(
        self, tokens: int = 0, cost: int = 0, *, task: Optional[int] = None, reservation: Optional[int] = None
    ) -> None:
        """See :meth:`hale.Agent.report_spend`."""
        _block(self._core.report_spend(tokens, cost, task=task, reservation=reservation))

    # ---- messages --------------------------------------------------------------------

    def send(
        self,
        body: JSON,
        *,
        to_agent: Optional[str] = None,
        to_role: Optional[str] = None,
        conversation: Optional[str] = None,
        reply_to: Optional[int] = None,
        expects_reply: Optional[bool] = None,
        key: Optional[str] = None,
    ) -> SentMessage:
        """See :meth:`hale.Agent.send`."""
        return _block(
            self._core.send(
                body,
                to_agent=to_agent,
                to_role=to_role,
                conversation=conversation,
                reply_to=reply_to,
                expects_reply=expects_reply,
                key=key,
            )
        )

    def reply(self, message: Message, body: JSON, *, expects_reply: Optional[bool] = None) -> SentMessage:
        """See :meth:`hale.Agent.reply`."""
        return _block(self._core.reply(message, body, expects_reply=expects_reply))

    def ack(self, message: Union[Message, int]) -> None:
        """See :meth:`hale.Agent.ack`."""
        _block(self._core.ack(message))

    def end_conversation(self, conversation: str) -> None:
        """See :meth:`hale.Agent.end_conversation`."""
        _block(self._core.end_conversation(conversation))

    def next_message(self, timeout: Optional[float] = None) -> Optional[Message]:
        """See :meth:`hale.Agent.next_message`."""
        return _block(self._core.next_message(timeout))

    def messages(self) -> Iterator[Message]:
        """The messages delivered to this agent, until the session ends."""
        while True:
            message = self.next_message()
            if message is None:
                return
            yield message

    # ---- ending ----------------------------------------------------------------------

    def close(self, last_patch: Optional[Mapping[str, JSON]] = None) -> None:
        """See :meth:`hale.Agent.close`."""
        _block(self._core.close(last_patch))

    def ended(self, timeout: Optional[float] = None) -> Optional[str]:
        """Waits until the session has ended and returns the reason (None if ``timeout``
        passed first)."""
        try:
            return _runtime.block(self._core.ended(), timeout)
        except (TimeoutError, concurrent.futures.TimeoutError):
            return None

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TaskHandle:
    """A task this agent submitted (see :class:`hale.TaskHandle`); :meth:`result` blocks."""

    def __init__(self, agent: Agent, submitted: Submitted) -> None:
        self._agent = agent
        self.task = submitted.task
        self.new = submitted.new

    def result(self, timeout: Optional[float] = None) -> TaskInfo:
        """Waits for the task to end (see :meth:`hale.Agent.result`)."""
        return self._agent.result(self.task, timeout)

    def __repr__(self) -> str:
        return f"TaskHandle(task={self.task}, new={self.new})"


def stop_on_sigterm() -> threading.Event:
    """An event set when this process gets SIGTERM (or SIGINT): what hale sends to stop an
    agent it runs. Call from the main thread; check it between pieces of work, then
    ``agent.close(last_patch)``."""
    event = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: event.set())
    return event
