"""An agent's session with hale."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import signal
import uuid
from typing import (
    Any,
    AsyncIterator,
    Awaitable,
    Callable,
    Dict,
    List,
    Mapping,
    Optional,
    Sequence,
    Set,
    TypeVar,
    Union,
)

from . import _transport
from ._session import Frame, Session
from .errors import Code, ConnectError, HaleError, ProtocolError, SessionClosed, error_from_frame
from .types import (
    JSON,
    Conversation,
    LlmCall,
    LlmLike,
    Message,
    PendingReply,
    Progress,
    ProgressLike,
    Reconnect,
    RecoveryPoint,
    RolledBack,
    SentMessage,
    Submitted,
    Task,
    Welcome,
)

DEFAULT_URL = "ws://127.0.0.1:7700"
_T = TypeVar("_T")


def merge_patch(target: JSON, patch: JSON) -> JSON:
    """RFC 7396: ``patch`` merged into ``target`` (a new value; neither is changed)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result: Dict[str, JSON] = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _progress_json(progress: ProgressLike) -> Optional[Dict[str, JSON]]:
    if progress is None:
        return None
    if isinstance(progress, Progress):
        return progress.to_json()
    return dict(progress)


def _llm_json(llm: LlmLike) -> Optional[Dict[str, JSON]]:
    if llm is None:
        return None
    if isinstance(llm, LlmCall):
        return llm.to_json()
    return dict(llm)


class StepContext:
    """What :meth:`Agent.step` yields: set ``result`` (and optionally ``llm`` and
    ``compensation``) before the block ends; the step is committed with them."""

    def __init__(self, task: int, name: str, prior: Optional[str]) -> None:
        self.task = task
        self.name = name
        #: The state an earlier attempt left the step in: ``None`` (never begun),
        #: ``"uncertain"`` (begun by a lost attempt: check before repeating the side effect).
        self.prior = prior
        self.result: JSON = None
        self.llm: LlmLike = None
        self.compensation: JSON = None

    @property
    def uncertain(self) -> bool:
        return self.prior == "uncertain"


class Agent:
    """A session of one agent with hale, shared by every coroutine of the process.

    Open it with :meth:`connect` (or :meth:`from_env` for an agent hale runs): it says
    hello, so the agent's run has started or resumed when it returns, and
    :attr:`welcome` holds the state to carry on from. Requests from many coroutines are
    pipelined over the one socket; each returns once hale has answered (for writes: once
    they are durable).
    """

    def __init__(
        self,
        urls: Sequence[str],
        name: str,
        role: str,
        labels: Mapping[str, str],
        incarnation: Optional[int],
        credentials: _transport.Credentials,
        ca_file: Optional[str],
        reconnect: Optional[Reconnect],
    ) -> None:
        #: The address connected to first.
        self.url = urls[0]
        self.name = name
        self.role = role
        self.labels = dict(labels)
        self.ca_file = ca_file
        self._credentials = credentials
        self._next_id = 1
        self._welcome: Optional[Welcome] = None
        self._state: Dict[str, JSON] = {}
        self._session_id: Optional[str] = None
        self._tasks: "asyncio.Queue[Task]" = asyncio.Queue()
        self._messages: "asyncio.Queue[Message]" = asyncio.Queue()
        self._cancelled: Set[int] = set()
        self._cancel_event = asyncio.Event()
        self._challenge = asyncio.Event()
        self.challenges = 0
        self.conversations: List[Conversation] = []
        self.pending_replies: List[PendingReply] = []
        # The address that answered first, the others given, then the policy's extra ones.
        every = list(urls)
        if reconnect is not None:
            every += [more for more in _transport.addresses(list(reconnect.more_urls)) if more not in every]
        credentials.nodes = list(every)
        self._session = Session(
            every,
            name,
            self._hello_frame,
            credentials,
            ca_file,
            reconnect,
            self._on_welcome,
            self._on_unasked,
        )
        self._session.incarnation = None
        self._wanted_incarnation = incarnation
        self._renewal: Optional["asyncio.Task[None]"] = None

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
    ) -> Agent:
        """Opens a session to the hale at ``url`` (``ws://host:port`` or ``wss://…``;
        ``http://`` and ``https://`` are taken for them) and says hello as ``name`` in
        ``role``.

        The nodes of a cluster are given as a list or separated by commas (as in
        ``HALE_URL``): the first that accepts a connection is used, the others are kept
        for reconnects. With ``reconnect`` the session follows the leader: a node that
        does not lead names the leader and the session resumes the same run there,
        settling what was in flight as after a lost connection (a checkpoint is applied
        once). Without it, a node that does not lead raises :class:`NotLeader`.

        ``incarnation`` resumes that run (an agent hale runs is told its own in
        ``HALE_INCARNATION``); left out, a new run starts. ``token`` is the agent's access
        token (or the admin token); with ``refresh_token`` it is refreshed when it is
        within ``refresh_ahead`` seconds of expiry, and when hale says it expired.
        ``reconnect`` makes the session survive lost connections (backoff with full
        jitter, the same run resumed, nothing in flight lost or applied twice); without
        it the session ends with the connection.

        Raises :class:`ConnectError` if hale cannot be reached and :class:`HaleError` if
        it refuses the tokens or the hello.
        """
        given = _transport.addresses(url)
        if not given:
            raise ConnectError(f"no address given: {url!r}")
        credentials = _transport.Credentials(token, refresh_token, refresh_ahead)
        credentials.nodes = list(given)
        socket = None
        failure: Optional[HaleError] = None
        at = 0
        for at, candidate in enumerate(given):
            try:
                socket = await _transport.open_socket(candidate, name, credentials, ca_file)
                break
            except ConnectError as error:
                if failure is None or isinstance(failure, ConnectError):
                    failure = error
            except HaleError as error:
                # Refused (e.g. the tokens): reported rather than an unreachable node.
                failure = error
        if socket is None:
            assert failure is not None
            raise failure
        # The one that answered first, then the others in turn.
        urls = given[at:] + given[:at]
        agent = cls(urls, name, role, labels or {}, incarnation, credentials, ca_file, reconnect)
        agent._session.start(socket)
        try:
            await agent._say_hello()
        except BaseException:
            await agent._session.close()
            raise
        if credentials.renew_in() is not None:
            agent._renewal = asyncio.ensure_future(agent._renew_tokens())
        return agent

    async def _renew_tokens(self) -> None:
        """Renews the access token before it expires, for as long as the session lasts:
        hale ends a session whose token expired. The new token is sent in band (an
        ``auth`` frame) and used by the next connection."""
        retry = 0.0
        while not self._session.ended.is_set():
            wait = self._credentials.renew_in()
            if wait is None:
                return
            try:
                await asyncio.wait_for(self._session.ended.wait(), timeout=max(wait, retry))
                return
            except asyncio.TimeoutError:
                pass
            try:
                await self._credentials.refresh(self._session.url, self.name, self.ca_file)
                await self._request({"type": "auth", "token": self._credentials.access}, "ok")
                retry = 0.0
            except (HaleError, OSError) as error:
                if self._session.ended.is_set():
                    return
                logging.getLogger("hale").warning("could not renew the access token, trying again: %s", error)
                retry = min(max(retry * 2, 0.25), 5.0)

    @classmethod
    async def from_env(
        cls,
        role: Optional[str] = None,
        *,
        reconnect: Optional[Reconnect] = Reconnect(),
        labels: Optional[Mapping[str, str]] = None,
        env: Optional[Mapping[str, str]] = None,
    ) -> Agent:
        """Connects as the agent hale started: ``HALE_URL`` (default
        ``ws://127.0.0.1:7700``; a cluster's nodes separated by commas), ``HALE_AGENT``
        (required), ``HALE_INCARNATION`` (the run to resume), ``HALE_TOKEN`` and
        ``HALE_REFRESH_TOKEN``, ``HALE_CA_FILE``. The role
        is ``role``, else ``HALE_ROLE``, else the agent's name (hale keeps hale.toml's
        role for an agent it runs whatever the hello says). Reconnects by default: an
        agent hale runs outlives a restart of hale."""
        environ = os.environ if env is None else env
        name = environ.get("HALE_AGENT")
        if not name:
            raise HaleError("no_agent", "HALE_AGENT is not set: is this process run by hale?")
        incarnation_text = environ.get("HALE_INCARNATION")
        incarnation = int(incarnation_text) if incarnation_text else None
        return await cls.connect(
            environ.get("HALE_URL") or DEFAULT_URL,
            name,
            role or environ.get("HALE_ROLE") or name,
            labels=labels,
            incarnation=incarnation,
            token=environ.get("HALE_TOKEN") or None,
            refresh_token=environ.get("HALE_REFRESH_TOKEN") or None,
            ca_file=environ.get("HALE_CA_FILE") or None,
            reconnect=reconnect,
        )

    def _hello_frame(self) -> Frame:
        return {"type": "hello", "agent": self.name, "role": self.role, "labels": self.labels}

    async def _say_hello(self) -> Welcome:
        frame = self._hello_frame()
        frame["incarnation"] = self._wanted_incarnation
        answer = await self._request(frame, "welcome")
        self._session.incarnation = int(answer["incarnation"])
        self._on_welcome(answer)
        assert self._welcome is not None
        return self._welcome

    def _on_welcome(self, frame: Frame) -> None:
        welcome = Welcome.from_json(frame)
        self._welcome = welcome
        self._state = copy.deepcopy(welcome.state)
        self.conversations = welcome.conversations
        self.pending_replies = welcome.pending_replies
        if welcome.session is not None:
            self._session_id = welcome.session
        elif self._session_id is None:
            self._session_id = f"{self.name}#{welcome.incarnation}"

    def _on_unasked(self, frame: Frame) -> None:
        kind = frame.get("type")
        if kind == "challenge":
            self.challenges += 1
            self._challenge.set()
        elif kind == "task":
            self._tasks.put_nowait(Task.from_json(frame))
        elif kind == "task_cancelled":
            self._cancelled.add(int(frame.get("task", 0)))
            self._cancel_event.set()
        elif kind == "message":
            self._messages.put_nowait(Message.from_json(frame))

    # ---- who and where -----------------------------------------------------------------

    @property
    def welcome(self) -> Welcome:
        """The welcome of the latest (re)connection: state, version, recovery points…"""
        assert self._welcome is not None, "the agent has not said hello"
        return self._welcome

    @property
    def incarnation(self) -> int:
        """This run's incarnation."""
        return self.welcome.incarnation

    @property
    def session_id(self) -> str:
        """This run's session: hale's ``session`` if it sends one, else ``AGENT#INCARNATION``;
        the same across reconnects of the run."""
        assert self._session_id is not None
        return self._session_id

    @property
    def version(self) -> int:
        """The state's version as last answered by hale."""
        return self._session.version if self._session.version is not None else self.welcome.version

    @property
    def state(self) -> Dict[str, JSON]:
        """The state as this process knows it: the welcome's, with the checkpoints and
        rollbacks of this process folded in (a copy)."""
        return copy.deepcopy(self._state)

    @property
    def connected(self) -> bool:
        return self._session.connected

    @property
    def urls(self) -> List[str]:
        """Every address the session may (re)connect to, in the order it tries them."""
        return list(self._session.urls)

    @property
    def connected_to(self) -> str:
        """The address of the current connection (the last one while offline): on a
        cluster, the leader once the session has followed it."""
        return self._session.url

    @property
    def redirects(self) -> int:
        """How often a node that does not lead its cluster sent the session on."""
        return self._session.redirects

    @property
    def reconnects(self) -> int:
        """How often the connection was lost and the run resumed."""
        return self._session.reconnects

    @property
    def backoffs(self) -> List[float]:
        """The waits (seconds) before each reconnect attempt so far."""
        return [delay for _, delay in self._session.backoffs]

    @property
    def queued(self) -> int:
        """Requests waiting to be written (e.g. while offline)."""
        return self._session.queued()

    @property
    def token(self) -> Optional[str]:
        """The access token in use (it changes when refreshed)."""
        return self._credentials.access

    @property
    def token_refreshes(self) -> int:
        return self._credentials.refreshes

    # ---- requests --------------------------------------------------------------------

    def _id(self) -> int:
        ident = self._next_id
        self._next_id += 1
        return ident

    async def _request(self, frame: Frame, expect: str) -> Frame:
        frame["id"] = self._id()
        answer = await self._session.request(frame)
        kind = answer.get("type")
        if kind == expect:
            return answer
        raise error_from_frame(answer, f"expected {expect}, hale answered {answer!r}")

    # ---- state -----------------------------------------------------------------------

    async def checkpoint(self, patch: Mapping[str, JSON], expected_version: Optional[int] = None) -> int:
        """Folds ``patch`` (an RFC 7396 merge patch: ``None`` deletes a member) into the
        state; returns the new version once it is durable. With ``expected_version`` it
        is refused (:class:`VersionConflict`) unless the state is at that version."""
        frame: Frame = {"type": "checkpoint", "patch": dict(patch)}
        if expected_version is not None:
            frame["expected_version"] = expected_version
        answer = await self._request(frame, "checkpointed")
        self._state = merge_patch(self._state, dict(patch))
        return int(answer["version"])

    async def recovery_point(self, name: str) -> RecoveryPoint:
        """Names the current version, so it can be rolled back to later."""
        answer = await self._request({"type": "recovery_point", "name": name}, "recovery_point_marked")
        return RecoveryPoint.from_json(answer)

    async def rollback(self, to: Union[int, str]) -> RolledBack:
        """Makes a new version whose state is that of version ``to`` (an int) or of the
        recovery point ``to`` (a str)."""
        target: Dict[str, JSON] = {"version": to} if isinstance(to, int) else {"point": to}
        answer = await self._request({"type": "rollback", "to": target}, "rolled_back")
        self._state = dict(answer.get("state") or {})
        return RolledBack(int(answer["version"]), int(answer["target_version"]), dict(answer.get("state") or {}))

    # ---- liveness --------------------------------------------------------------------

    async def heartbeat(self, progress: ProgressLike = None) -> None:
        """Says this run is alive and how far it got. Also the answer to a challenge."""
        frame: Frame = {"type": "heartbeat"}
        body = _progress_json(progress)
        if body is not None:
            frame["progress"] = body
        self._challenge.clear()
        await self._request(frame, "heartbeat_ack")

    @property
    def challenge_pending(self) -> bool:
        """Whether hale challenged this agent and no heartbeat has answered yet."""
        return self._challenge.is_set()

    async def challenged(self) -> None:
        """Returns when hale challenges this agent (its detector suspects it is dead).
        Answer with :meth:`heartbeat` from the loop that does the work: the challenge asks
        whether the agent works, not whether its socket is open, so the client does not
        answer it by itself."""
        await self._challenge.wait()

    def start_heartbeats(
        self,
        interval: float = 1.0,
        progress: Optional[Callable[[], ProgressLike]] = None,
    ) -> "asyncio.Task[None]":
        """Heartbeats every ``interval`` seconds with what ``progress()`` returns, until the
        session ends or hale refuses a beat (the run is over). Report progress the work
        loop moves (a step, a counter), so the stall detector still sees a loop that
        stopped."""

        async def beat() -> None:
            while not self._session.ended.is_set():
                try:
                    await self.heartbeat(progress() if progress is not None else None)
                except SessionClosed:
                    return
                except HaleError as error:
                    if error.code not in (Code.PROTOCOL,):
                        return
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._session.ended.wait(), interval)

        return asyncio.ensure_future(beat())

    async def report_error(self, message: Optional[str] = None) -> None:
        """Tells hale about an error this agent ran into; a spike opens its breaker."""
        frame: Frame = {"type": "report_error"}
        if message is not None:
            frame["message"] = message
        await self._request(frame, "ok")

    async def report_violation(self, reason: str, *, about: Optional[str] = None, critical: bool = False) -> None:
        """Reports a policy violation by this agent (``about`` left out) or another one."""
        frame: Frame = {"type": "report_violation", "reason": reason, "critical": critical}
        if about is not None:
            frame["agent"] = about
        await self._request(frame, "ok")

    # ---- tasks -----------------------------------------------------------------------

    async def next_task(self, timeout: Optional[float] = None) -> Optional[Task]:
        """The next task hale leases to this run (with the steps earlier attempts left),
        or ``None`` once the session has ended (or ``timeout`` passed). Each (task,
        attempt) comes once, also when a resumed run is offered it again."""
        return await self._next(self._tasks, timeout)

    async def tasks(self) -> AsyncIterator[Task]:
        """The tasks leased to this run, until the session ends."""
        while True:
            task = await self.next_task()
            if task is None:
                return
            yield task

    def is_cancelled(self, task: int) -> bool:
        """Whether hale cancelled ``task`` while this run held it: stop working on it."""
        return task in self._cancelled

    async def wait_cancelled(self, task: int) -> None:
        """Returns when hale cancels ``task``."""
        while task not in self._cancelled:
            self._cancel_event.clear()
            await self._cancel_event.wait()

    async def intend_step(self, task: int, name: str) -> None:
        """Says a step with side effects is about to run; durable when it returns. If this
        run is lost before it commits the step, the next attempt gets it as ``uncertain``."""
        await self._request({"type": "intend_step", "task": task, "name": name}, "ok")

    async def commit_step(
        self,
        task: int,
        name: str,
        result: JSON = None,
        *,
        llm: LlmLike = None,
        compensation: JSON = None,
    ) -> None:
        """Commits a step; durable when it returns. A later attempt gets every committed
        step. ``llm`` records the model call behind it, ``compensation`` what undoes it
        if the task is aborted."""
        frame: Frame = {"type": "commit_step", "task": task, "name": name, "result": result}
        llm_body = _llm_json(llm)
        if llm_body is not None:
            frame["llm"] = llm_body
        if compensation is not None:
            frame["compensation"] = compensation
        await self._request(frame, "ok")

    @contextlib.asynccontextmanager
    async def step(self, task: Union[Task, int], name: str) -> AsyncIterator[StepContext]:
        """Brackets a step with side effects: ``intend_step`` on entry, ``commit_step`` with
        what the block set on :class:`StepContext` when it ends without an exception (an
        exception leaves the intent, so a later attempt sees the step as uncertain)::

            async with agent.step(task, "open-pr") as step:
                if step.uncertain: ...   # a lost attempt began it: check first
                step.result = {"pr": open_pr()}
        """
        task_id = task.task if isinstance(task, Task) else task
        prior = task.step(name) if isinstance(task, Task) else None
        context = StepContext(task_id, name, prior.state if prior is not None else None)
        await self.intend_step(task_id, name)
        yield context
        await self.commit_step(task_id, name, context.result, llm=context.llm, compensation=context.compensation)

    async def complete(self, task: int, result: JSON = None) -> None:
        """Completes a task this run holds."""
        await self._request({"type": "complete", "task": task, "result": result}, "ok")

    async def fail(self, task: int, reason: str, *, retry: bool = True) -> None:
        """Fails this attempt at a task: retried after its backoff while attempts are left
        (if ``retry``), else failed for good (through its compensations)."""
        await self._request({"type": "fail", "task": task, "reason": reason, "retry": retry}, "ok")

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
    ) -> Submitted:
        """Submits a task for ``role`` (an orchestrator handing out work); returns its
        number once durable. Give an ``idempotency_key`` to make it safe to resend after
        a lost connection."""
        body: Dict[str, JSON] = {"role": role, "payload": payload}
        optional: Dict[str, JSON] = {
            "priority": priority,
            "idempotency_key": idempotency_key,
            "max_attempts": max_attempts,
            "deadline_ms": deadline_ms,
            "retry_backoff_ms": retry_backoff_ms,
            "shadow": dict(shadow) if shadow is not None else None,
            "fallback": [dict(rung) for rung in fallback] if fallback else None,
            "budget": dict(budget) if budget is not None else None,
        }
        body.update({key: value for key, value in optional.items() if value is not None})
        answer = await self._request({"type": "submit", "task": body}, "submitted")
        return Submitted(int(answer["task"]), bool(answer.get("new", True)))

    # ---- budgets ---------------------------------------------------------------------

    async def reserve(self, tokens: int = 0, cost: int = 0, *, task: Optional[int] = None) -> int:
        """Reserves spending before an expensive call; refused (:class:`OverBudget`) if it
        would take the agent or the task over budget. Returns the reservation."""
        frame: Frame = {"type": "reserve", "tokens": tokens, "cost": cost}
        if task is not None:
            frame["task"] = task
        answer = await self._request(frame, "reserved")
        return int(answer["reservation"])

    async def report_spend(
        self,
        tokens: int = 0,
        cost: int = 0,
        *,
        task: Optional[int] = None,
        reservation: Optional[int] = None,
    ) -> None:
        """Reports what was spent, settling ``reservation``. Going over a budget is a
        breach: hale opens this agent's breaker and moves its tasks."""
        frame: Frame = {"type": "report_spend", "tokens": tokens, "cost": cost}
        if task is not None:
            frame["task"] = task
        if reservation is not None:
            frame["reservation"] = reservation
        await self._request(frame, "ok")

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
        if (to_agent is None) == (to_role is None):
            raise ValueError("give exactly one of to_agent and to_role")
        frame: Frame = {
            "type": "send",
            "to": {"agent": to_agent} if to_agent is not None else {"role": to_role},
            "body": body,
            "key": key or uuid.uuid4().hex,
        }
        if conversation is not None:
            frame["conversation"] = conversation
        if reply_to is not None:
            frame["reply_to"] = reply_to
        if expects_reply is not None:
            frame["expects_reply"] = expects_reply
        return SentMessage.from_json(await self._request(frame, "sent"))

    async def reply(self, message: Message, body: JSON, *, expects_reply: Optional[bool] = None) -> SentMessage:
        """Answers ``message`` in its conversation."""
        return await self.send(
            body,
            to_agent=message.sender,
            conversation=message.conversation,
            reply_to=message.message,
            expects_reply=expects_reply,
        )

    async def ack(self, message: Union[Message, int]) -> None:
        """Says a message is handled: hale stops delivering it. Idempotent."""
        seq = message.seq if isinstance(message, Message) else message
        await self._request({"type": "ack", "seq": seq}, "ok")
        self._session.acked(seq)

    async def end_conversation(self, conversation: str) -> None:
        await self._request({"type": "end_conversation", "conversation": conversation}, "ok")

    async def next_message(self, timeout: Optional[float] = None) -> Optional[Message]:
        """The next message in this agent's mailbox (each ``seq`` once, also across
        reconnects), or ``None`` once the session has ended (or ``timeout`` passed)."""
        return await self._next(self._messages, timeout)

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
        if last_patch is not None and not self._session.ended.is_set():
            await self.checkpoint(last_patch)
        await self._session.close()

    @property
    def closed(self) -> bool:
        return self._session.ended.is_set()

    async def ended(self) -> str:
        """Returns, with the reason, once the session has ended (closed, fenced, given up)."""
        await self._session.ended.wait()
        return self._session.end_reason or ""

    @property
    def end_reason(self) -> Optional[str]:
        return self._session.end_reason

    async def _next(self, queue: "asyncio.Queue[_T]", timeout: Optional[float]) -> Optional[_T]:
        if not queue.empty():
            return queue.get_nowait()
        if self._session.ended.is_set():
            return None
        getter = asyncio.ensure_future(queue.get())
        ended = asyncio.ensure_future(self._session.ended.wait())
        try:
            done, _ = await asyncio.wait({getter, ended}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
            if not getter.done():
                getter.cancel()
        if getter in done:
            return getter.result()
        return None

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


__all__ = ["Agent", "StepContext", "install_sigterm", "run_until_sigterm", "merge_patch", "ProtocolError"]
