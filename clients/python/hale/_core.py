"""An agent's session with hale, as it runs on the client's own loop (see ``_runtime``).

:class:`hale.Agent` and :class:`hale.sync.Agent` hand every call to the
:class:`AgentCore` here; nothing in it runs on the application's threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import uuid
from typing import (
    Any,
    Tuple,
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

from . import _json, _transport
from ._session import Frame, Session
from .admin import TaskInfo
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


def env_settings(role: Optional[str], env: Optional[Mapping[str, str]]) -> Dict[str, Any]:
    """The arguments of ``connect`` for the agent hale started, from its environment:
    ``HALE_URL`` (default ``ws://127.0.0.1:7700``; a cluster's nodes separated by
    commas), ``HALE_AGENT`` (required), ``HALE_INCARNATION``, ``HALE_TOKEN``,
    ``HALE_REFRESH_TOKEN``, ``HALE_CA_FILE``; the role is ``role``, else ``HALE_ROLE``,
    else the agent's name."""
    environ = os.environ if env is None else env
    name = environ.get("HALE_AGENT")
    if not name:
        raise HaleError("no_agent", "HALE_AGENT is not set: is this process run by hale?")
    incarnation_text = environ.get("HALE_INCARNATION")
    return {
        "url": environ.get("HALE_URL") or DEFAULT_URL,
        "name": name,
        "role": role or environ.get("HALE_ROLE") or name,
        "incarnation": int(incarnation_text) if incarnation_text else None,
        "token": environ.get("HALE_TOKEN") or None,
        "refresh_token": environ.get("HALE_REFRESH_TOKEN") or None,
        "ca_file": environ.get("HALE_CA_FILE") or None,
    }


async def _first_socket(
    given: Sequence[str],
    name: str,
    credentials: _transport.Credentials,
    ca_file: Optional[str],
    reconnect: Optional[Reconnect],
) -> Tuple[Any, int]:
    """The first connection, and the index of the address that took it. Each address is
    tried in turn; with a ``reconnect`` policy, a round in which none could be reached is
    followed by the policy's backoff and another round (an agent started before hale, or
    while its node restarts, waits for it). A refusal (the tokens) is final."""
    rounds = 0
    while True:
        failure: Optional[HaleError] = None
        for at, candidate in enumerate(given):
            try:
                return await _transport.open_socket(candidate, name, credentials, ca_file), at
            except ConnectError as error:
                if failure is None or isinstance(failure, ConnectError):
                    failure = error
            except HaleError as error:
                if error.code != Code.NOT_LEADER:
                    raise
                # A token refresh found no leader: the cluster is electing one.
                failure = error
        assert failure is not None
        if reconnect is None or (reconnect.attempts is not None and rounds + 1 >= reconnect.attempts):
            raise failure
        delay = reconnect.delay(rounds)
        logging.getLogger("hale").info("hale is not reachable yet (%s); trying again in %.2f s", failure.message, delay)
        rounds += 1
        await asyncio.sleep(delay)


class AgentCore:
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
        #: Seconds between the client's own heartbeats (None: the application beats).
        self.beat_interval: Optional[float] = None
        #: What the next heartbeat reports, if it changed since the last one sent.
        self.progress: ProgressLike = None
        self.progress_source: Optional[Callable[[], ProgressLike]] = None
        self._progress_sent: Optional[Dict[str, JSON]] = None
        self._beats: Optional["asyncio.Task[None]"] = None
        self._beat_now = asyncio.Event()
        #: Heartbeats the client has sent from its own loop.
        self.beats_sent = 0
        #: Outcomes of tasks this agent submitted, pushed and not handed out yet.
        self._outcomes: Dict[int, TaskInfo] = {}
        self._handed_outcomes: Set[int] = set()
        self._outcome_arrived = asyncio.Event()

    # ---- opening ---------------------------------------------------------------------

    @classmethod
    async def open(
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
        heartbeat: Optional[float] = 0.5,
    ) -> "AgentCore":
        """Opens the session (see :meth:`hale.Agent.connect` for the arguments). With a
        ``reconnect`` policy, a hale that cannot be reached yet is tried again with the
        policy's backoff, as after a lost connection."""
        given = _transport.addresses(url)
        if not given:
            raise ConnectError(f"no address given: {url!r}")
        if heartbeat is not None and not heartbeat > 0:
            raise ValueError(f"heartbeat is the seconds between beats, above 0 (or None): {heartbeat!r}")
        credentials = _transport.Credentials(token, refresh_token, refresh_ahead)
        credentials.nodes = list(given)
        socket, at = await _first_socket(given, name, credentials, ca_file, reconnect)
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
        if heartbeat is not None:
            agent.start_beating(heartbeat)
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
        elif kind == "task_outcome":
            outcome = TaskInfo.from_json(frame)
            # Pushed again to each new connection until taken: handed out once.
            if outcome.task not in self._handed_outcomes and outcome.task not in self._outcomes:
                self._outcomes[outcome.task] = outcome
                self._outcome_arrived.set()

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
        # Checked here, before anything is sent: a value json cannot encode (a datetime,
        # a set, NaN) is refused at the call and the session goes on.
        _json.check(frame, str(frame.get("type", "request")))
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

    async def heartbeat(self, progress: ProgressLike = None, busy_ms: Optional[int] = None) -> None:
        """Says this run is alive and how far it got (and, with ``busy_ms``, that it is in
        a call that may take that long; 0: the call is over)."""
        frame: Frame = {"type": "heartbeat"}
        body = _progress_json(progress)
        if body is not None:
            frame["progress"] = body
        if busy_ms is not None:
            frame["busy_ms"] = busy_ms
        self._challenge.clear()
        await self._request(frame, "heartbeat_ack")
        if body is not None:
            self._progress_sent = body

    @property
    def challenge_pending(self) -> bool:
        """Whether hale challenged this agent and no heartbeat has answered yet."""
        return self._challenge.is_set()

    async def challenged(self) -> None:
        """Returns when hale challenges this agent (its detector suspects it is dead)."""
        await self._challenge.wait()

    def start_beating(self, interval: float) -> None:
        """Heartbeats every ``interval`` seconds from the client's own loop, with the
        progress set on the agent, until the session ends or hale refuses a beat (the run
        is over). A challenge is answered at once."""
        self.beat_interval = interval
        if self._beats is None or self._beats.done():
            self._beats = asyncio.ensure_future(self._beat_loop())
        self._beat_now.set()

    def stop_beating(self) -> None:
        """Stops the client's own heartbeats (the application beats from now on)."""
        self.beat_interval = None
        if self._beats is not None:
            self._beats.cancel()
            self._beats = None

    def _progress_due(self) -> Optional[Dict[str, JSON]]:
        """The progress to send with the next beat: what the application set, if it
        differs from what was last sent (a beat without progress leaves it standing)."""
        source = self.progress_source
        progress = source() if source is not None else self.progress
        body = _progress_json(progress)
        if body is None or body == self._progress_sent:
            return None
        _json.check(body, "progress")
        return body

    async def _beat_loop(self) -> None:
        log = logging.getLogger("hale")
        while not self._session.ended.is_set() and self.beat_interval is not None:
            try:
                progress = self._progress_due()
            except Exception as error:  # a progress callback's bug must not stop the beats
                log.warning("the progress for the heartbeat could not be read: %r", error)
                progress = None
            try:
                await self.heartbeat(progress)
                self.beats_sent += 1
            except SessionClosed:
                return
            except HaleError as error:
                if error.code != Code.PROTOCOL:
                    # Refused (fenced, declared down): the run is over.
                    log.warning("hale refused a heartbeat; the run is over: %s", error)
                    return
            self._beat_now.clear()
            wait = {asyncio.ensure_future(self._session.ended.wait()), asyncio.ensure_future(self._beat_now.wait())}
            wait.add(asyncio.ensure_future(self._challenge.wait()))
            try:
                await asyncio.wait(wait, timeout=self.beat_interval, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in wait:
                    waiter.cancel()

    async def busy(self, seconds: float) -> None:
        """Says this run is entering a call that may take up to ``seconds``: hale's stall
        detectors do not count until then (0: the call is over)."""
        if seconds < 0 or seconds != seconds:
            raise ValueError(f"seconds must be 0 or more: {seconds!r}")
        await self.heartbeat(None, busy_ms=int(min(seconds, 86_400.0) * 1000))

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
        reservation: Optional[int] = None,
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
        if reservation is not None:
            frame["reservation"] = reservation
        await self._request(frame, "ok")

    # ---- outcomes of submitted tasks ----------------------------------------------------

    async def _wait_outcome(self, pick: Callable[[], Optional[int]], timeout: Optional[float]) -> Optional[TaskInfo]:
        """Waits until ``pick()`` names an outcome that has arrived; hands it out (once) and
        takes it at hale. None if ``timeout`` passed or the session ended first."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            chosen = pick()
            if chosen is not None and chosen in self._outcomes:
                outcome = self._outcomes.pop(chosen)
                self._handed_outcomes.add(chosen)
                break
            left = None if deadline is None else deadline - loop.time()
            if self._session.ended.is_set() or (left is not None and left <= 0):
                return None
            # Every waiter looks again after each arrival (set wakes all that wait).
            self._outcome_arrived.clear()
            ended = asyncio.ensure_future(self._session.ended.wait())
            arrived = asyncio.ensure_future(self._outcome_arrived.wait())
            try:
                await asyncio.wait({ended, arrived}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ended.cancel()
                arrived.cancel()
        try:
            await self._request({"type": "take_outcome", "task": outcome.task}, "ok")
        except SessionClosed:
            # Handed out; pushed again to the next run, which can take it then.
            pass
        return outcome

    async def outcome(self, task: int, timeout: Optional[float] = None) -> Optional[TaskInfo]:
        """The outcome of ``task`` (submitted by this agent) once hale pushes it, taken
        at hale; None if ``timeout`` passed or the session ended first."""
        return await self._wait_outcome(lambda: task, timeout)

    async def next_outcome(self, timeout: Optional[float] = None) -> Optional[TaskInfo]:
        """The oldest outcome pushed and not handed out yet, taken at hale; None if
        ``timeout`` passed or the session ended first."""
        return await self._wait_outcome(lambda: next(iter(self._outcomes), None), timeout)

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
