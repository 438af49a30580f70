"""An agent's session with hale, for asyncio code (:class:`Agent`); :mod:`hale.sync` has
the same for code that is not.

The session itself (its socket, heartbeats, reconnects) runs on the client's own thread,
so the application's code may block (a synchronous model SDK, a long tool call) without
hale losing sight of the agent: every method here hands its work to that thread and
awaits the answer on the caller's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from . import _runtime
from ._core import DEFAULT_URL, AgentCore, env_settings, merge_patch
from .admin import TaskInfo
from .errors import HaleError, ProtocolError, SessionClosed, TaskFailed
from .steps import RETRY, Check, Work, _Options
from .types import (
    JSON,
    Conversation,
    LlmLike,
    Message,
    PendingReply,
    ProgressLike,
    Reconnect,
    RecoveryPoint,
    RolledBack,
    SentMessage,
    Submitted,
    Task,
    Welcome,
)

#: Seconds between the client's own heartbeats unless told otherwise: twice a second, so
#: an agent of any criticality (the most demanding, ``critical``, is expected every
#: 500 ms) is seen as alive.
HEARTBEAT = 0.5


class StepContext:
    """What :meth:`Agent.step` yields: set ``result`` (and optionally ``llm`` and
    ``compensation``) before the block ends; the step is committed with them."""

    def __init__(self, task: int, name: str, prior: Optional[str]) -> None:
        self.task = task
        self.name = name
        #: The state an earlier attempt left the step in: ``None`` (never begun),
        #: ``"uncertain"`` (begun by a lost attempt: check before repeating the side effect).
        self.prior = prior
        #: The idempotency key of this step, the same in every attempt of the task.
        self.key = f"hale-{task}-{name}"
        self.result: JSON = None
        self.llm: LlmLike = None
        self.compensation: JSON = None

    @property
    def uncertain(self) -> bool:
        """Whether a lost attempt began this step (its side effect may have happened)."""
        return self.prior == "uncertain"


class TaskHandle:
    """A task this agent submitted: ``task`` is its number, ``new`` false when an
    idempotency key named an earlier one. :meth:`result` waits for its outcome."""

    def __init__(self, agent: "Agent", submitted: Submitted) -> None:
        self._agent = agent
        self.task = submitted.task
        self.new = submitted.new

    async def result(self, timeout: Optional[float] = None) -> TaskInfo:
        """Waits for the task to end (see :meth:`Agent.result`)."""
        return await self._agent.result(self.task, timeout)

    def __repr__(self) -> str:
        return f"TaskHandle(task={self.task}, new={self.new})"


def _settle(task: int, outcome: Optional[TaskInfo], closed: bool, timeout: Optional[float]) -> TaskInfo:
    if outcome is None:
        if closed:
            raise SessionClosed(f"the session ended before task {task} did; read it with Admin.task({task})")
        raise TimeoutError(f"task {task} has not ended within {timeout} s")
    if not outcome.ok:
        raise TaskFailed(outcome)
    return outcome


class WorkScope:
    """What :meth:`Agent.work_on` returns: while it is entered (``with`` or
    ``async with``), the :func:`hale.step` functions called are steps of its task."""

    def __init__(self, work: Work) -> None:
        self.work = work
        self._tokens: List[Any] = []

    def __enter__(self) -> Task:
        from .steps import _working

        self._tokens.append(_working.set(self.work))
        return self.work.task

    def __exit__(self, *exc: object) -> None:
        from .steps import _working

        _working.reset(self._tokens.pop())

    async def __aenter__(self) -> Task:
        return self.__enter__()

    async def __aexit__(self, *exc: object) -> None:
        self.__exit__(*exc)


class _Facade:
    """What the asyncio and blocking agents share: the session on the client's thread,
    and everything about it that is read without asking hale."""

    def __init__(self, core: AgentCore) -> None:
        self._core = core
        self._works: Dict[Tuple[int, int], Work] = {}

    # ---- who and where -----------------------------------------------------------------

    @property
    def name(self) -> str:
        """The agent's name."""
        return self._core.name

    @property
    def role(self) -> str:
        """The role the hello gave (hale keeps hale.toml's for an agent it runs)."""
        return self._core.role

    @property
    def labels(self) -> Dict[str, str]:
        """The labels the hello gave."""
        return dict(self._core.labels)

    @property
    def url(self) -> str:
        """The address connected to first."""
        return self._core.url

    @property
    def welcome(self) -> Welcome:
        """The welcome of the latest (re)connection: state, version, recovery points…"""
        return self._core.welcome

    @property
    def incarnation(self) -> int:
        """This run's incarnation."""
        return self._core.incarnation

    @property
    def session_id(self) -> str:
        """This run's session: hale's ``session`` if it sends one, else
        ``AGENT#INCARNATION``; the same across reconnects of the run."""
        return self._core.session_id

    @property
    def version(self) -> int:
        """The state's version as last answered by hale."""
        return self._core.version

    @property
    def state(self) -> Dict[str, JSON]:
        """The state as this process knows it: the welcome's, with the checkpoints and
        rollbacks of this process folded in (a copy)."""
        return self._core.state

    @property
    def conversations(self) -> List[Conversation]:
        """The conversations the run takes part in, as of the latest welcome."""
        return list(self._core.conversations)

    @property
    def pending_replies(self) -> List[PendingReply]:
        """The replies the run owes, as of the latest welcome."""
        return list(self._core.pending_replies)

    @property
    def connected(self) -> bool:
        """Whether the socket is open now (False while reconnecting, and once ended)."""
        return self._core.connected

    @property
    def urls(self) -> List[str]:
        """Every address the session may (re)connect to, in the order it tries them."""
        return self._core.urls

    @property
    def connected_to(self) -> str:
        """The address of the current connection (the last one while offline): on a
        cluster, the leader once the session has followed it."""
        return self._core.connected_to

    @property
    def redirects(self) -> int:
        """How often a node that does not lead its cluster sent the session on."""
        return self._core.redirects

    @property
    def reconnects(self) -> int:
        """How often the connection was lost and the run resumed."""
        return self._core.reconnects

    @property
    def backoffs(self) -> List[float]:
        """The waits (seconds) before each reconnect attempt so far."""
        return self._core.backoffs

    @property
    def queued(self) -> int:
        """Requests waiting to be written (e.g. while offline)."""
        return self._core.queued

    @property
    def token(self) -> Optional[str]:
        """The access token in use (it changes when refreshed)."""
        return self._core.token

    @property
    def token_refreshes(self) -> int:
        """How often the access token was refreshed."""
        return self._core.token_refreshes

    @property
    def challenges(self) -> int:
        """How often hale challenged this run (its detector suspected it was dead)."""
        return self._core.challenges

    @property
    def challenge_pending(self) -> bool:
        """Whether hale challenged this run and no heartbeat has answered yet."""
        return self._core.challenge_pending

    @property
    def heartbeats(self) -> int:
        """Heartbeats the client's own thread has sent so far."""
        return self._core.beats_sent

    @property
    def progress(self) -> ProgressLike:
        """What the next heartbeat reports (sent with it when it changed). Set it as the
        work moves on: a :class:`Progress` or a dict of its members; changed progress
        counts as a sign of work for hale's stall detector."""
        return self._core.progress

    @progress.setter
    def progress(self, progress: ProgressLike) -> None:
        core = self._core
        core.progress = progress
        core.progress_source = None
        _runtime.loop().call_soon_threadsafe(core._beat_now.set)

    def is_cancelled(self, task: Union[Task, int]) -> bool:
        """Whether hale cancelled ``task`` while this run held it: stop working on it."""
        return self._core.is_cancelled(task.task if isinstance(task, Task) else task)

    @property
    def closed(self) -> bool:
        """Whether the session has ended (closed, fenced, given up)."""
        return self._core.closed

    @property
    def end_reason(self) -> Optional[str]:
        """Why the session ended, once it has."""
        return self._core.end_reason

    def work_on(self, task: Task) -> WorkScope:
        """Makes ``task`` the one that :func:`hale.step` functions work on, while the
        returned scope is entered (``with agent.work_on(task):``, or ``async with``)."""
        return WorkScope(self._work(task))

    def _work(self, task: Task) -> Work:
        key = (task.task, task.attempts)
        work = self._works.get(key)
        if work is None:
            # Only the attempts still held are kept.
            self._works = {held: kept for held, kept in self._works.items() if held[0] != task.task}
            work = self._works[key] = Work(self._core, task)
        return work

    def _forget(self, task: int) -> None:
        self._works = {held: kept for held, kept in self._works.items() if held[0] != task}


class Agent(_Facade):
    """A session of one agent with hale, for asyncio code.

    Open it with :meth:`connect` (or :meth:`from_env` for an agent hale runs): it says
    hello, so the agent's run has started or resumed when it returns, and
    :attr:`welcome` holds the state to carry on from. Requests from many coroutines are
    pipelined over the one socket; each returns once hale has answered (for writes: once
    they are durable).

    The session and its heartbeats run on the client's own thread, so a call that
    blocks the application's loop (a synchronous model SDK, ``time.sleep``) does not stop
    them. Set :attr:`progress` as the work moves on. A run that holds a task and shows no
    sign of work (no step, checkpoint or change of progress) for ten minutes is
    declared stalled; say how long a longer call may take with :meth:`long_call` or a
    step's ``timeout``.
    """

    # ---- opening ---------------------------------------------------------------------

    @classmethod
    async def connect(
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
        """Opens a session to the hale at ``url`` and says hello as ``name`` in ``role``.

        ``url`` is ``ws://host:port`` or ``wss://…``; ``http://`` and ``https://`` are
        taken for them and a bare ``host:port`` is ``ws://``. The nodes of a cluster are
        given as a list or separated by commas (as in ``HALE_URL``): the first that
        accepts a connection is used, the others are kept for reconnects.

        ``reconnect`` makes the session survive lost connections (backoff with full
        jitter, the same run resumed, nothing in flight lost or applied twice) and follow
        a cluster's leader; with it, a hale that is not up yet is waited for with the
        same backoff. Without it the session ends with the connection, and a node that
        does not lead raises :class:`NotLeader`.

        ``incarnation`` resumes that run (an agent hale runs is told its own in
        ``HALE_INCARNATION``); left out, a new run starts. ``token`` is the agent's access
        token (or the admin token); with ``refresh_token`` it is refreshed when it is
        within ``refresh_ahead`` seconds of expiry, and when hale says it expired.

        ``heartbeat`` is the seconds between the heartbeats the client sends from its own
        thread (``None``: none; the application then calls :meth:`heartbeat` itself and
        answers challenges).

        Raises :class:`ConnectError` if hale cannot be reached and :class:`HaleError` if
        it refuses the tokens or the hello.
        """
        core = await _runtime.call(
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
    async def from_env(
        cls,
        role: Optional[str] = None,
        *,
        reconnect: Optional[Reconnect] = Reconnect(),
        labels: Optional[Mapping[str, str]] = None,
        env: Optional[Mapping[str, str]] = None,
        heartbeat: Optional[float] = HEARTBEAT,
    ) -> Agent:
        """Connects as the agent hale started: ``HALE_URL`` (default
        ``ws://127.0.0.1:7700``; a cluster's nodes separated by commas), ``HALE_AGENT``
        (required), ``HALE_INCARNATION`` (the run to resume), ``HALE_TOKEN`` and
        ``HALE_REFRESH_TOKEN``, ``HALE_CA_FILE``. The role is ``role``, else
        ``HALE_ROLE``, else the agent's name (hale keeps hale.toml's role for an agent it
        runs whatever the hello says). Reconnects by default: an agent hale runs
        outlives a restart of hale, and waits for a hale that is not up yet."""
        settings = env_settings(role, env)
        return await cls.connect(
            settings.pop("url"),
            settings.pop("name"),
            settings.pop("role"),
            labels=labels,
            reconnect=reconnect,
            heartbeat=heartbeat,
            **settings,
        )

    async def _call(self, coroutine: Awaitable[Any]) -> Any:
        return await _runtime.call(coroutine)  # type: ignore[arg-type]

    # ---- state -----------------------------------------------------------------------

    async def checkpoint(self, patch: Mapping[str, JSON], expected_version: Optional[int] = None) -> int:
        """Folds ``patch`` (an RFC 7396 merge patch: ``None`` deletes a member) into the
        state; returns the new version once it is durable. With ``expected_version`` it
        is refused (:class:`VersionConflict`) unless the state is at that version. A
        value that is not JSON is refused (:class:`NotJson`) before anything is sent."""
        version: int = await self._call(self._core.checkpoint(patch, expected_version))
        return version

    async def recovery_point(self, name: str) -> RecoveryPoint:
        """Names the current version, so it can be rolled back to later."""
        point: RecoveryPoint = await self._call(self._core.recovery_point(name))
        return point

    async def rollback(self, to: Union[int, str]) -> RolledBack:
        """Makes a new version whose state is that of version ``to`` (an int) or of the
        recovery point ``to`` (a str)."""
        rolled: RolledBack = await self._call(self._core.rollback(to))
        return rolled

    # ---- liveness --------------------------------------------------------------------

    async def heartbeat(self, progress: ProgressLike = None) -> None:
        """Sends a heartbeat now, with ``progress`` if given. The client's own thread
        beats by itself (see ``heartbeat`` in :meth:`connect`); this is for agents that
        beat themselves, and answers a challenge."""
        await self._call(self._core.heartbeat(progress))

    async def challenged(self) -> None:
        """Returns when hale challenges this agent (its detector suspects it is dead). The
        client's own heartbeats answer at once; an agent that beats itself answers with
        :meth:`heartbeat`."""
        await self._call(self._core.challenged())

    def start_heartbeats(
        self,
        interval: float = HEARTBEAT,
        progress: Optional[Callable[[], ProgressLike]] = None,
    ) -> "asyncio.Future[None]":
        """Heartbeats every ``interval`` seconds from the client's own thread, with what
        ``progress()`` returns (called on that thread: keep it quick, and read only).
        Replaces the interval given to :meth:`connect`. Returns a future that is done
        when the session ends; cancelling it does not stop the beats
        (:meth:`stop_heartbeats` does)."""
        core = self._core

        def start() -> None:
            core.progress_source = progress
            core.start_beating(interval)

        _runtime.loop().call_soon_threadsafe(start)
        return asyncio.ensure_future(self._call(core._session.ended.wait()))

    def stop_heartbeats(self) -> None:
        """Stops the client's own heartbeats: the application beats from now on, or hale
        declares the run down when they stop."""
        _runtime.loop().call_soon_threadsafe(self._core.stop_beating)

    async def busy(self, seconds: float) -> None:
        """Says the run is entering a call that may take up to ``seconds`` (at most a day):
        hale's stall detector does not count until then. ``busy(0)`` says it is over.
        :meth:`long_call` does both."""
        await self._call(self._core.busy(seconds))

    @contextlib.asynccontextmanager
    async def long_call(self, seconds: float) -> AsyncIterator[None]:
        """Brackets a call that may take longer than the stall detector allows (ten minutes
        by default)::

            async with agent.long_call(600):
                report = await deep_research(topic)
        """
        await self.busy(seconds)
        try:
            yield
        finally:
            with contextlib.suppress(HaleError):
                await self.busy(0)

    async def report_error(self, message: Optional[str] = None) -> None:
        """Tells hale about an error this agent ran into; a spike opens its breaker."""
        await self._call(self._core.report_error(message))

    async def report_violation(self, reason: str, *, about: Optional[str] = None, critical: bool = False) -> None:
        """Reports a policy violation by this agent (``about`` left out) or another one."""
        await self._call(self._core.report_violation(reason, about=about, critical=critical))

    # ---- tasks -----------------------------------------------------------------------

    async def next_task(self, timeout: Optional[float] = None) -> Optional[Task]:
        """The next task hale leases to this run (with the steps earlier attempts left),
        or ``None`` once the session has ended (or ``timeout`` passed). Each (task,
        attempt) comes once, also when a resumed run is offered it again."""
        task: Optional[Task] = await self._call(self._core.next_task(timeout))
        return task

    async def tasks(self) -> AsyncIterator[Task]:
        """The tasks leased to this run, until the session ends."""
        while True:
            task = await self.next_task()
            if task is None:
                return
            yield task

    async def wait_cancelled(self, task: Union[Task, int]) -> None:
        """Returns when hale cancels ``task``."""
        await self._call(self._core.wait_cancelled(task.task if isinstance(task, Task) else task))

    async def run_step(
        self,
        task: Task,
        name: str,
        body: Callable[[], Any],
        *,
        uncertain: Union[str, Check] = RETRY,
        timeout: Optional[float] = None,
        reserve_tokens: Optional[int] = None,
    ) -> JSON:
        """Runs ``body()`` (a plain function or a coroutine function) as durable step
        ``name`` of ``task``, as Restate's ``ctx.run`` does: if an attempt committed the
        step, returns its result without running ``body``; else records the intent, runs
        it, commits what it returned and returns that. The options are those of
        :func:`hale.step`."""
        return await self._work(task).drive(name, body, _Options(uncertain, timeout, reserve_tokens))

    async def intend_step(self, task: Union[Task, int], name: str) -> None:
        """Says a step with side effects is about to run; durable when it returns. If this
        run is lost before it commits the step, the next attempt gets it as ``uncertain``."""
        await self._call(self._core.intend_step(task.task if isinstance(task, Task) else task, name))

    async def commit_step(
        self,
        task: Union[Task, int],
        name: str,
        result: JSON = None,
        *,
        llm: LlmLike = None,
        compensation: JSON = None,
        reservation: Optional[int] = None,
    ) -> None:
        """Commits a step; durable when it returns. A later attempt gets every committed
        step. ``llm`` records the model call behind it (its tokens count against the
        task's and the agent's budgets, settling ``reservation`` if given),
        ``compensation`` what undoes it if the task is aborted. A done step is
        immutable: committing it again with another result is refused (``step_done``)."""
        task_id = task.task if isinstance(task, Task) else task
        await self._call(
            self._core.commit_step(task_id, name, result, llm=llm, compensation=compensation, reservation=reservation)
        )

    @contextlib.asynccontextmanager
    async def step(self, task: Union[Task, int], name: str) -> AsyncIterator[StepContext]:
        """Brackets a step with side effects: ``intend_step`` on entry, ``commit_step`` with
        what the block set on :class:`StepContext` when it ends without an exception (an
        exception leaves the intent, so a later attempt sees the step as uncertain)::

            async with agent.step(task, "open-pr") as step:
                if step.uncertain: ...   # a lost attempt began it: check first
                step.result = {"pr": open_pr()}

        The block always runs: skip a step that is done yourself (``task.done(name)``),
        or let :func:`hale.step` and :meth:`run_step` do it.
        """
        task_id = task.task if isinstance(task, Task) else task
        prior = task.step(name) if isinstance(task, Task) else None
        context = StepContext(task_id, name, prior.state if prior is not None else None)
        await self.intend_step(task_id, name)
        yield context
        await self.commit_step(task_id, name, context.result, llm=context.llm, compensation=context.compensation)

    async def complete(self, task: Union[Task, int], result: JSON = None) -> None:
        """Completes a task this run holds."""
        task_id = task.task if isinstance(task, Task) else task
        await self._call(self._core.complete(task_id, result))
        self._forget(task_id)

    async def fail(self, task: Union[Task, int], reason: str, *, retry: bool = True) -> None:
        """Fails this attempt at a task: retried after its backoff while attempts are left
        (if ``retry``), else failed for good (through its compensations)."""
        task_id = task.task if isinstance(task, Task) else task
        await self._call(self._core.fail(task_id, reason, retry=retry))
        self._forget(task_id)

    async def submit(
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
    ) -> TaskHandle:
        """Submits a task for ``role`` (an orchestrator handing out work); returns its
        handle once durable: ``await handle.result()`` waits for its outcome. Give an
        ``idempotency_key`` to make it safe to resend after a lost connection."""
        submitted: Submitted = await self._call(
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

    async def result(self, task: Union[TaskHandle, int], timeout: Optional[float] = None) -> TaskInfo:
        """Waits for a task this agent submitted to end. Returns its :class:`TaskInfo`
        if it completed (``result``, the ``level`` it was produced at and the role it
        ``ran_as``); raises :class:`TaskFailed` if it failed or was cancelled,
        ``TimeoutError`` after ``timeout`` seconds, :class:`SessionClosed` if the session
        ends first.

        hale pushes the outcome of every task an agent submitted to its sessions until the
        agent takes it, also to a later run of the agent (one that was down when the task
        ended gets it when it comes back): this takes it. Each outcome is handed out once,
        here or by :meth:`next_outcome`."""
        task_id = task.task if isinstance(task, TaskHandle) else task
        outcome: Optional[TaskInfo] = await self._call(self._core.outcome(task_id, timeout))
        return _settle(task_id, outcome, self.closed, timeout)

    async def next_outcome(self, timeout: Optional[float] = None) -> Optional[TaskInfo]:
        """The next outcome of a task this agent submitted that no :meth:`result` is
        waiting for (completed, failed or cancelled alike), taken at hale; None once the
        session has ended or ``timeout`` passed. After a restart, this is how a run learns
        how the tasks an earlier run submitted ended."""
        outcome: Optional[TaskInfo] = await self._call(self._core.next_outcome(timeout))
        return outcome

    # ---- budgets ---------------------------------------------------------------------

    async def reserve(self, tokens: int = 0, cost: int = 0, *, task: Optional[int] = None) -> int:
        """Reserves spending before an expensive call; refused (:class:`OverBudget`) if it
        would take the agent or the task over budget. Returns the reservation."""
        reservation: int = await self._call(self._core.reserve(tokens, cost, task=task))
        return reservation

    async def report_spend(
        self,
        tokens: int = 0,
        cost: int = 0,
        *,
        task: Optional[int] = None,
        reservation: Optional[int] = None,
    ) -> None:
        """Reports what was spent outside a step, settling ``reservation``. (A step's model
        call is counted with the step: do not report it again.) Going over a budget is a
        breach: hale opens this agent's breaker and moves its tasks."""
        await self._call(self._core.report_spend(tokens, cost, task=task, reservation=reservation))

    # ---- messages --------------------------------------------------------------------

    async def send(
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
        """Sends ``body`` to an agent (``to_agent``) or to one agent of a role
        (``to_role``); durable in the recipient's mailbox when it returns. Every message
        carries an idempotency ``key`` (a random one unless given), so a resend after a
        reconnect delivers it once."""
        sent: SentMessage = await self._call(
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
        return sent

    async def reply(self, message: Message, body: JSON, *, expects_reply: Optional[bool] = None) -> SentMessage:
        """Answers ``message`` in its conversation."""
        sent: SentMessage = await self._call(self._core.reply(message, body, expects_reply=expects_reply))
        return sent

    async def ack(self, message: Union[Message, int]) -> None:
        """Says a message is handled: hale stops delivering it. Idempotent."""
        await self._call(self._core.ack(message))

    async def end_conversation(self, conversation: str) -> None:
        """Ends a conversation this agent takes part in."""
        await self._call(self._core.end_conversation(conversation))

    async def next_message(self, timeout: Optional[float] = None) -> Optional[Message]:
        """The next message in this agent's mailbox (each ``seq`` once, also across
        reconnects), or ``None`` once the session has ended (or ``timeout`` passed)."""
        message: Optional[Message] = await self._call(self._core.next_message(timeout))
        return message

    async def messages(self) -> AsyncIterator[Message]:
        """The messages delivered to this agent, until the session ends."""
        while True:
            message = await self.next_message()
            if message is None:
                return
            yield message

    # ---- ending ----------------------------------------------------------------------

    async def close(self, last_patch: Optional[Mapping[str, JSON]] = None) -> None:
        """Checkpoints ``last_patch`` (if given), then ends the session cleanly once what
        was asked before has been answered."""
        await self._call(self._core.close(last_patch))

    async def ended(self) -> str:
        """Returns, with the reason, once the session has ended (closed, fenced, given up)."""
        reason: str = await self._call(self._core.ended())
        return reason

    async def __aenter__(self) -> Agent:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def install_sigterm(loop: Optional[asyncio.AbstractEventLoop] = None) -> asyncio.Event:
    """An event set when this process gets SIGTERM (or SIGINT): what hale sends to stop an
    agent it runs. Wait on it next to the work, then ``await agent.close(last_patch)``."""
    loop = loop or asyncio.get_running_loop()
    event = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, event.set)
    return event


async def run_until_sigterm(
    agent: Agent,
    work: Awaitable[Any],
    last_patch: Optional[Callable[[], Optional[Mapping[str, JSON]]]] = None,
) -> bool:
    """Runs ``work`` until it ends or SIGTERM arrives; on SIGTERM cancels it, checkpoints
    ``last_patch()`` and closes the session. True if stopped by the signal."""
    stop = install_sigterm()
    job = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({job, stopper}, return_when=asyncio.FIRST_COMPLETED)
    if job.done():
        stopper.cancel()
        job.result()
        return False
    job.cancel()
    with contextlib.suppress(BaseException):
        await job
    try:
        await agent.close(last_patch() if last_patch is not None else None)
    except SessionClosed as error:
        # The run is already over (e.g. hale fenced it as it stopped the agent): nothing
        # more can be written for it.
        logging.getLogger("hale").warning("could not checkpoint on SIGTERM: %s", error.message)
        await agent.close()
    return True


__all__ = [
    "Agent",
    "DEFAULT_URL",
    "HEARTBEAT",
    "StepContext",
    "TaskHandle",
    "WorkScope",
    "install_sigterm",
    "run_until_sigterm",
    "merge_patch",
    "ProtocolError",
]
