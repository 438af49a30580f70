"""The task that owns a session's socket: writes requests, matches answers by id, hands on
what hale says unasked and, with a :class:`Reconnect` policy, survives a lost connection.

This follows the Rust client (crates/hale-client/src/session.rs). On a drop it reconnects
with exponential backoff and full jitter, trying the addresses in turn, says hello with
the run's incarnation (so the run resumes: same incarnation, same leases), and settles
what was sent but not answered:

* a checkpoint: the welcome's version says whether it was applied. If it was, its answer
  is made from that; if not, it is sent again expecting the version it was meant to
  follow, so a state that moved in between is a ``version_conflict`` reported to the
  caller, never silently overwritten;
* step intents and commits, completions and failures, heartbeats, error reports,
  messages (they carry an idempotency key), acks and conversation ends are sent again;
* a rollback, recovery point, submit without an idempotency key, reservation, spend
  report or violation report fails with ``closed``: hale may or may not have applied it,
  and sending it again could do it twice.

Requests made while offline wait in the session's queue (1,024 at most; then callers
wait) and go out in order once the run has resumed.

On a cluster the session follows the leader. A node that does not lead answers a request
``not_leader`` (naming the leader if it knows it), and a node that stops leading sends a
bound session an id-less ``not_leader`` error and closes it with code 4004. With a
policy, such an answer is not handed to the caller: the request stays in flight, the
session reconnects at once to the leader named (else to the next address, with the
usual backoff), resumes the run there and settles what was in flight as above. A first
hello (no run resumed yet) refused so is sent again as it is. Without a policy the
caller gets :class:`~hale.NotLeader` (and a session closed by its node ends with a
:class:`SessionClosed` whose code is ``not_leader``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import OrderedDict, deque
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Set, Tuple

from . import _transport
from .errors import Code, ConnectError, Fenced, HaleError, NotJson, SessionClosed
from .types import Reconnect

log = logging.getLogger("hale")

Frame = Dict[str, Any]
QUEUE_MAX = 1024
#: Close code of a bound session whose node stopped leading its cluster.
CLOSE_NOT_LEADER = 4004
#: A leader named by a node is tried at once this many times in a row; then with backoff
#: (two nodes that each name the other, briefly, during an election must not spin).
HINTS_AT_ONCE = 3

#: Frames that are safe to send again after a reconnect.
_RESENT = frozenset(
    {
        "commit_step",
        "intend_step",
        "complete",
        "fail",
        "heartbeat",
        "report_error",
        "send",
        "ack",
        "end_conversation",
        "take_outcome",
        "auth",
    }
)
_RUN_OVER = frozenset({Code.STALE_INCARNATION, Code.INCARNATION_DOWN, "unknown_incarnation"})


class _Outgoing:
    __slots__ = ("frame", "future")

    def __init__(self, frame: Optional[Frame], future: Optional["asyncio.Future[Frame]"]) -> None:
        self.frame = frame  # None: the close marker
        self.future = future


class _Pending:
    __slots__ = ("frame", "future", "makes")

    def __init__(self, frame: Frame, future: "asyncio.Future[Frame]", makes: Optional[int]) -> None:
        self.frame = frame
        self.future = future
        #: For a checkpoint: the version it makes, if that could be told when it was sent.
        self.makes = makes


class _Lost:
    __slots__ = ("final", "reason", "not_leader", "leader")

    def __init__(self, final: bool, reason: str, not_leader: bool = False, leader: Optional[str] = None) -> None:
        self.final = final
        self.reason = reason
        #: The node does not lead its cluster (any more); ``leader`` is who does, if known.
        self.not_leader = not_leader
        self.leader = leader


class _GiveUp(Exception):
    pass


class _Elsewhere(Exception):
    """The node refused to resume the run: it does not lead (``leader`` does, if known)."""

    def __init__(self, leader: Optional[str]) -> None:
        super().__init__(leader)
        self.leader = leader


def _not_leader(frame: Frame) -> Optional[_Lost]:
    """A lost connection, if ``frame`` is a ``not_leader`` error."""
    if frame.get("type") != "error" or frame.get("code") != Code.NOT_LEADER:
        return None
    leader = frame.get("leader")
    leader = leader if isinstance(leader, str) and leader else None
    reason = f"the node does not lead its cluster (leader: {leader or 'unknown'})"
    return _Lost(False, reason, not_leader=True, leader=leader)


def _resolve(future: Optional["asyncio.Future[Frame]"], frame: Frame) -> None:
    if future is not None and not future.done():
        future.set_result(frame)


def _reject(future: Optional["asyncio.Future[Frame]"], error: BaseException) -> None:
    if future is not None and not future.done():
        future.set_exception(error)
        # Retrieved here so a caller that gave up does not make asyncio warn.
        future.exception()


def closed_error(reason: str, leader: Optional[str] = None, not_leader: bool = False) -> SessionClosed:
    if reason.startswith("fenced"):
        return Fenced(reason)
    if not_leader:
        return SessionClosed(reason, Code.NOT_LEADER, leader)
    return SessionClosed(reason)


class Session:
    def __init__(
        self,
        urls: Sequence[str],
        agent: str,
        hello: Callable[[], Frame],
        credentials: _transport.Credentials,
        ca_file: Optional[str],
        policy: Optional[Reconnect],
        on_welcome: Callable[[Frame], None],
        on_unasked: Callable[[Frame], None],
    ) -> None:
        self.urls = list(urls)
        #: The address of the current (or last) connection.
        self.url = self.urls[0]
        self.agent = agent
        self._hello = hello
        self.credentials = credentials
        self.ca_file = ca_file
        self.policy = policy
        self._on_welcome = on_welcome
        self._on_unasked = on_unasked
        self.incarnation: Optional[int] = None
        # Outgoing requests not yet written (the offline queue).
        self._queue: Deque[_Outgoing] = deque()
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        # Sent and not yet answered, in send order.
        self._pending: "OrderedDict[int, _Pending]" = OrderedDict()
        self._by_id: Dict[int, int] = {}
        self._order = 0
        self._drained = asyncio.Event()
        self._drained.set()
        #: The agent's version as last answered.
        self.version: Optional[int] = None
        self._rollback_in_flight = False
        #: Tasks offered so far, by (task, attempt): a resumed run is offered again the tasks
        #: it holds, and the application sees each attempt once.
        self.offered: Set[Tuple[int, int]] = set()
        #: Mailbox sequence numbers handed to the application and not yet acknowledged.
        self.delivered: Set[int] = set()
        #: Sequence numbers acknowledged on this connection that its delivery has not
        #: reached yet: a resumed session's first mailbox read can run before a resent ack
        #: is applied, so the message may still arrive once after the ack is answered (on
        #: this connection only, in ``seq`` order).
        self._acked_here: Set[int] = set()
        self.ended = asyncio.Event()
        self.end_reason: Optional[str] = None
        #: Set when the session ended because its node does not lead (no policy to follow).
        self._end_not_leader: Optional[_Lost] = None
        self.connected = False
        self._close_requested = asyncio.Event()
        self._closing = False
        self._task: Optional["asyncio.Task[None]"] = None
        #: How often the connection was lost and the run resumed.
        self.reconnects = 0
        #: (attempt, delay in seconds) of every reconnect wait, for diagnostics.
        self.backoffs: List[Tuple[int, float]] = []
        #: How often a node that does not lead sent the session on (to the leader it
        #: named or the next address).
        self.redirects = 0

    # ---- the application side ----------------------------------------------------------

    def start(self, socket: Any) -> None:
        self.connected = True
        self._task = asyncio.ensure_future(self._run(socket))

    async def request(self, frame: Frame) -> Frame:
        """Sends ``frame`` (in order, pipelined) and returns its answer frame (which may be
        an ``error``). Raises :class:`SessionClosed` if the session ends first."""
        while len(self._queue) >= QUEUE_MAX and not self.ended.is_set():
            self._space.clear()
            await self._space.wait()
        if self.ended.is_set():
            raise self._closed_error(self.end_reason or "the session has ended")
        future: "asyncio.Future[Frame]" = asyncio.get_running_loop().create_future()
        self._queue.append(_Outgoing(frame, future))
        self._wake.set()
        return await future

    async def close(self) -> None:
        """Ends the session cleanly once what was sent before is answered."""
        if self.ended.is_set():
            return
        self._close_requested.set()
        self._queue.append(_Outgoing(None, None))
        self._wake.set()
        await self.ended.wait()

    def queued(self) -> int:
        """Requests waiting to be written (e.g. while offline)."""
        return len(self._queue)

    # ---- the session task ----------------------------------------------------------------

    def _closed_error(self, reason: str) -> SessionClosed:
        lost = self._end_not_leader
        if lost is not None:
            return closed_error(reason, lost.leader, not_leader=True)
        return closed_error(reason)

    async def _run(self, socket: Any) -> None:
        reason = "the session task ended"
        try:
            while True:
                lost = await self._pump(socket)
                self.connected = False
                if lost.final or self.policy is None:
                    reason = lost.reason
                    if lost.not_leader and not lost.final:
                        self._end_not_leader = lost
                    break
                log.info("lost hale (%s); reconnecting", lost.reason)
                if lost.not_leader:
                    self.redirects += 1
                try:
                    socket = await self._reconnect(lost.leader)
                except _GiveUp as error:
                    reason = str(error)
                    if not reason.startswith(("fenced", "closed by the agent")):
                        reason = f"{lost.reason}; then could not come back: {reason}"
                    break
                self.connected = True
        except Exception as error:  # a bug here must not leave callers waiting forever
            log.exception("the hale session task failed")
            reason = f"the session task failed: {error!r}"
        finally:
            self._end(reason)

    def _end(self, reason: str) -> None:
        self.connected = False
        self.end_reason = reason
        self.ended.set()
        self._space.set()
        for pending in self._pending.values():
            _reject(pending.future, self._closed_error(reason))
        self._pending.clear()
        self._by_id.clear()
        self._drained.set()
        while self._queue:
            _reject(self._queue.popleft().future, self._closed_error(reason))

    async def _pump(self, socket: Any) -> _Lost:
        reader = asyncio.ensure_future(self._read(socket))
        writer = asyncio.ensure_future(self._write(socket))
        done, waiting = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        for task in waiting:
            task.cancel()
        for task in waiting:
            with contextlib.suppress(BaseException):
                await task
        if self._closing:
            return _Lost(True, "closed by the agent")
        results = [task.result() for task in (reader, writer) if task in done]
        lost = next((result for result in results if result.final), results[0])
        if not lost.final:
            _abort(socket)
        return lost

    async def _write(self, socket: Any) -> _Lost:
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            item = self._queue.popleft()
            self._space.set()
            if item.frame is None:
                # Close: let what was sent be answered first, then say goodbye.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._drained.wait(), 5.0)
                self._closing = True
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(socket.close(), 2.0)
                return _Lost(True, "closed by the agent")
            future = item.future
            assert future is not None
            try:
                text = json.dumps(item.frame, allow_nan=False)
            except (TypeError, ValueError) as error:
                # The callers check their values first; this keeps one that slipped through
                # from ending the session.
                _reject(future, NotJson(f"{item.frame.get('type')} is not JSON: {error}; nothing was sent"))
                continue
            # Kept before it is written: if the write fails, a reconnect settles it.
            self._push(item.frame, future)
            try:
                await socket.send(text)
            except _transport.ConnectionClosed as error:
                return _Lost(False, _describe(error))
            except OSError as error:
                return _Lost(False, str(error))

    async def _read(self, socket: Any) -> _Lost:
        while True:
            try:
                text = await socket.recv()
            except _transport.ConnectionClosed as error:
                code = error.rcvd.code if error.rcvd is not None else None
                if code == 4001:
                    return _Lost(True, f"fenced: {_describe(error)}")
                if code == 4003:
                    return _Lost(True, f"ended by hale: {_describe(error)}")
                if code == CLOSE_NOT_LEADER:
                    # Normally after an id-less not_leader error, which ends the pump first.
                    return _Lost(False, _describe(error), not_leader=True)
                return _Lost(False, _describe(error))
            except OSError as error:
                return _Lost(False, str(error))
            try:
                frame = json.loads(text)
            except ValueError as error:
                return _Lost(True, f"undecodable frame from hale: {error}")
            if not isinstance(frame, dict):
                return _Lost(True, f"unexpected frame from hale: {text!r}")
            lost = self._deliver(frame)
            if lost is not None:
                return lost

    def _deliver(self, frame: Frame) -> Optional[_Lost]:
        kind = frame.get("type")
        if kind == "fenced":
            return _Lost(True, f"fenced: incarnation {frame.get('incarnation')}: {frame.get('reason')}")
        if kind == "session_ended":
            return _Lost(True, f"ended by hale: {frame.get('reason')}")
        if kind == "error" and (self.policy is not None or frame.get("id") is None):
            # Not handed to the caller: the request stays in flight and goes to the leader
            # (without a policy, an answer to a request is; an id-less one ends the session).
            lost = _not_leader(frame)
            if lost is not None:
                return lost
        if kind == "task":
            key = (int(frame.get("task", 0)), int(frame.get("attempts", 0)))
            if key in self.offered:
                return None
            self.offered.add(key)
        elif kind == "message":
            seq = frame.get("seq")
            if not isinstance(seq, int) or not self._take_message(seq):
                return None
        ident = frame.get("id")
        if isinstance(ident, int) and not isinstance(ident, bool) and kind not in ("task", "message", "task_outcome"):
            self._answer(ident, frame)
        elif kind in ("challenge", "task", "task_cancelled", "message", "task_outcome"):
            self._on_unasked(frame)
        elif kind == "error":
            log.warning("hale refused a frame it could not read an id from: %s", frame.get("message"))
        return None

    # ---- in-flight bookkeeping -------------------------------------------------------------

    def _push(self, frame: Frame, future: "asyncio.Future[Frame]") -> None:
        makes: Optional[int] = None
        kind = frame.get("type")
        if kind == "checkpoint":
            expected = frame.get("expected_version")
            if expected is not None:
                # A checkpoint that expects a version can only make the next one.
                makes = int(expected) + 1
            elif not self._rollback_in_flight and self.version is not None:
                before = sum(1 for p in self._pending.values() if p.frame.get("type") == "checkpoint")
                makes = self.version + 1 + before
        elif kind == "rollback":
            self._rollback_in_flight = True
        self._order += 1
        self._by_id[int(frame["id"])] = self._order
        self._pending[self._order] = _Pending(frame, future, makes)
        self._drained.clear()

    def _answer(self, ident: int, frame: Frame) -> None:
        kind = frame.get("type")
        if kind in ("welcome", "checkpointed") and isinstance(frame.get("version"), int):
            self.version = int(frame["version"])
        elif kind == "rolled_back" and isinstance(frame.get("version"), int):
            self.version = int(frame["version"])
            self._rollback_in_flight = False
        order = self._by_id.pop(ident, None)
        if order is None or order not in self._pending:
            return
        pending = self._pending.pop(order)
        if kind == "error" and pending.makes is not None:
            # A refused checkpoint made no version: the ones sent after it make one less.
            refused = pending.makes
            for later_order, later in self._pending.items():
                if later_order < order:
                    continue
                unpinned = later.frame.get("type") == "checkpoint" and later.frame.get("expected_version") is None
                if unpinned and later.makes is not None and later.makes > refused:
                    later.makes -= 1
        if not self._pending:
            self._drained.set()
        _resolve(pending.future, frame)

    # ---- coming back -----------------------------------------------------------------------

    async def _reconnect(self, leader: Optional[str] = None) -> Any:
        policy = self.policy
        assert policy is not None
        attempt = 0
        # The backoff grows with each full round of addresses that none answered. A node
        # that answers but does not lead shows the cluster is alive, electing a leader
        # within a second or so: the backoff starts again from its base, so the session
        # finds the new leader soon after it is elected.
        unanswered = 0
        # A node that named the leader is taken at its word, at once (a few times in a row).
        hint = _transport.with_authority(self.url, leader) if leader else None
        hints_in_a_row = 0
        while True:
            if self._close_requested.is_set():
                raise _GiveUp("closed by the agent")
            if policy.attempts is not None and attempt >= policy.attempts:
                raise _GiveUp(f"gave up after {attempt} attempts")
            if hint is not None and hints_in_a_row < HINTS_AT_ONCE:
                url, hint = hint, None
                hints_in_a_row += 1
            else:
                hints_in_a_row = 0
                delay = policy.delay(unanswered // max(len(self.urls), 1))
                self.backoffs.append((attempt, delay))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._close_requested.wait(), delay)
                if self._close_requested.is_set():
                    raise _GiveUp("closed by the agent")
                if hint is not None:
                    url, hint = hint, None
                else:
                    url = self.urls[attempt % len(self.urls)]
            attempt += 1
            try:
                socket = await _transport.open_socket(url, self.agent, self.credentials, self.ca_file)
            except ConnectError as error:
                log.debug("reconnect attempt %d to %s failed: %s", attempt, url, error)
                unanswered += 1
                continue
            except HaleError as error:
                if error.code == Code.NOT_LEADER:
                    # A token refresh found no leader for long: try again later.
                    log.debug("reconnect attempt %d to %s: %s", attempt, url, error)
                    unanswered += 1
                    continue
                raise _GiveUp(f"hale refused the agent's tokens: {error}") from error
            self.url = url
            if self.incarnation is None:
                # Never resumed: nothing to come back to. A first hello that a node which
                # does not lead refused goes again as it is, and so does what followed it.
                try:
                    await self._resend_as_they_are(socket)
                except (_transport.ConnectionClosed, OSError):
                    _abort(socket)
                    continue
                return socket
            try:
                welcome = await self._resume(socket)
            except _Elsewhere as elsewhere:
                self.redirects += 1
                unanswered = 0
                log.info("%s does not lead its cluster (leader: %s)", url, elsewhere.leader or "unknown")
                if elsewhere.leader:
                    hint = _transport.with_authority(url, elsewhere.leader)
                continue
            except _transport.ConnectionClosed:
                unanswered += 1
                continue
            except (OSError, asyncio.TimeoutError):
                _abort(socket)
                unanswered += 1
                continue
            log.info(
                "resumed run %s at version %s on %s after %d attempts", self.incarnation, welcome.get("version"), url, attempt
            )
            self._on_welcome(welcome)
            try:
                await self._settle(socket, int(welcome.get("version", 0)))
            except (_transport.ConnectionClosed, OSError):
                # What was resent is pending again; the next connection settles it.
                _abort(socket)
                continue
            self.reconnects += 1
            return socket

    async def _resume(self, socket: Any) -> Frame:
        hello = self._hello()
        hello["id"] = 0
        hello["incarnation"] = self.incarnation
        await socket.send(json.dumps(hello))
        while True:
            text = await asyncio.wait_for(socket.recv(), 10.0)
            try:
                frame = json.loads(text)
            except ValueError as error:
                raise _GiveUp(f"undecodable frame from hale: {error}") from error
            if not isinstance(frame, dict):
                continue
            if frame.get("type") == "welcome":
                return frame
            if frame.get("type") == "error":
                _abort(socket)
                lost = _not_leader(frame)
                if lost is not None:
                    raise _Elsewhere(lost.leader)
                code = str(frame.get("code"))
                prefix = "fenced: " if code in _RUN_OVER else ""
                raise _GiveUp(f"{prefix}hale refused to resume run {self.incarnation} ({code}): {frame.get('message')}")

    async def _resend_as_they_are(self, socket: Any) -> None:
        """Sends every request in flight again, unchanged, on a new connection of a
        session that has not resumed a run yet."""
        pending = list(self._pending.values())
        self._pending.clear()
        self._by_id.clear()
        self._drained.set()
        for item in pending:
            self._push(item.frame, item.future)
        for item in pending:
            await socket.send(json.dumps(item.frame))

    def _take_message(self, seq: int) -> bool:
        """Whether message ``seq`` is new to the application (and from now on handed to it)."""
        acked = seq in self._acked_here
        # Delivery on one connection is in seq order: nothing at or below seq comes again.
        self._acked_here = {later for later in self._acked_here if later > seq}
        if acked or seq in self.delivered:
            return False
        self.delivered.add(seq)
        return True

    def acked(self, seq: int) -> None:
        """Message ``seq`` was acknowledged: hale will not deliver it on a later connection."""
        self.delivered.discard(seq)
        self._acked_here.add(seq)

    async def _settle(self, socket: Any, version: int) -> None:
        # This connection's delivery reads the mailbox after the acks answered so far.
        self._acked_here.clear()
        self.version = version
        self._rollback_in_flight = False
        pending = list(self._pending.values())
        self._pending.clear()
        self._by_id.clear()
        self._drained.set()
        again: List[Tuple[Frame, "asyncio.Future[Frame]"]] = []
        for item in pending:
            frame, future, made = item.frame, item.future, item.makes
            kind = frame.get("type")
            if kind == "checkpoint":
                if made is not None and made <= version:
                    _resolve(future, {"type": "checkpointed", "id": frame["id"], "version": made})
                    continue
                if made is not None:
                    frame = dict(frame, expected_version=made - 1)
                elif frame.get("expected_version") is None:
                    _reject(
                        future,
                        SessionClosed(
                            "the connection was lost before hale answered a checkpoint sent after a rollback; "
                            "it may or may not be applied: read the state"
                        ),
                    )
                    continue
            elif kind in _RESENT or (kind == "submit" and (frame.get("task") or {}).get("idempotency_key")):
                pass
            else:
                _reject(
                    future,
                    SessionClosed(
                        f"the connection was lost before hale answered this {kind}; it may or may not "
                        "have been applied, so it is not sent again"
                    ),
                )
                continue
            again.append((frame, future))
        for frame, future in again:
            self._push(frame, future)
        for frame, _ in again:
            await socket.send(json.dumps(frame))


def _describe(error: _transport.ConnectionClosed) -> str:
    if error.rcvd is not None:
        return f"closed by hale ({error.rcvd.code}): {error.rcvd.reason}"
    return "connection lost"


def _abort(socket: Any) -> None:
    transport = getattr(socket, "transport", None)
    if transport is not None:
        with contextlib.suppress(Exception):
            transport.abort()
