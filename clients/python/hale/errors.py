"""Errors: every failure is a :class:`HaleError` with a stable ``code``.

Codes hale sends are documented in docs/errors.md; the client adds a few of its own
(``closed``, ``fenced``, ``connect``, ``protocol``, ``not_resumed``). A session that ended
because its node stopped leading a cluster (without a :class:`Reconnect` policy to follow
the leader) fails with a :class:`SessionClosed` whose code is ``not_leader`` and whose
``leader`` names the leader if known. Match on
``error.code`` (or on the subclasses below for the common ones).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Type


class Code:
    """The error codes an application is most likely to handle."""

    # Client side.
    CLOSED = "closed"
    FENCED = "fenced"
    CONNECT = "connect"
    PROTOCOL = "protocol"
    #: A value given to a call is not JSON (a datetime, a set, bytes, NaN…); nothing was sent.
    NOT_JSON = "not_json"
    #: A step that a lost attempt began and the step asked to be told about.
    STEP_UNCERTAIN = "step_uncertain"
    #: A submitted task failed, or was cancelled (raised by waiting for its result).
    TASK_FAILED = "task_failed"
    TASK_CANCELLED = "task_cancelled"
    # State.
    VERSION_CONFLICT = "version_conflict"
    VERSION_NOT_RETAINED = "version_not_retained"
    UNKNOWN_RECOVERY_POINT = "unknown_recovery_point"
    PATCH_NOT_OBJECT = "patch_not_object"
    PATCH_TOO_LARGE = "patch_too_large"
    STATE_TOO_LARGE = "state_too_large"
    # Runs.
    STALE_INCARNATION = "stale_incarnation"
    INCARNATION_DOWN = "incarnation_down"
    UNKNOWN_INCARNATION = "unknown_incarnation"
    MANAGED_BY_HALE = "managed_by_hale"
    HELLO_REQUIRED = "hello_required"
    # Tasks and budgets.
    LEASE_LOST = "lease_lost"
    UNKNOWN_TASK = "unknown_task"
    TASK_ENDED = "task_ended"
    STEP_DONE = "step_done"
    OVER_BUDGET = "over_budget"
    OVERLOADED = "overloaded"
    # Messaging.
    MAILBOX_FULL = "mailbox_full"
    NO_RECIPIENT = "no_recipient"
    UNKNOWN_MESSAGE = "unknown_message"
    # Auth.
    UNAUTHENTICATED = "unauthenticated"
    FORBIDDEN = "forbidden"
    TOKEN_INVALID = "token_invalid"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_REVOKED = "token_revoked"
    REFRESH_REFUSED = "refresh_refused"
    # Health.
    QUARANTINED = "quarantined"
    # Clusters.
    NOT_LEADER = "not_leader"


class HaleError(Exception):
    """Something went wrong talking to hale. ``code`` says what (see :class:`Code`)."""

    def __init__(self, code: str, message: str, retryable: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable
        #: False when the code is the client's guess (hale's answer could not be read).
        self.known = True
        #: With ``not_leader``: the leader's address (``host:port``) if the node knew it.
        self.leader: Optional[str] = None

    @staticmethod
    def from_body(body: Mapping[str, Any]) -> HaleError:
        """The error for an ``error`` frame or an HTTP error body's ``error`` member."""
        code = str(body.get("code", "unknown"))
        cls = _BY_CODE.get(code, ServerError)
        error = cls(code, str(body.get("message", "")), bool(body.get("retryable", False)))
        leader = body.get("leader")
        if isinstance(leader, str) and leader:
            error.leader = leader
        return error


class ServerError(HaleError):
    """hale refused the request; nothing was written (see docs/errors.md for ``code``)."""


class SessionClosed(HaleError):
    """The session ended before hale answered. Whether the request took effect is unknown
    (for a request the client could not safely send again after a reconnect)."""

    def __init__(self, message: str, code: str = Code.CLOSED, leader: Optional[str] = None) -> None:
        super().__init__(code, message, False)
        self.leader = leader


class Fenced(SessionClosed):
    """This run is over: a newer incarnation started or this one was declared down. The
    process should stop (a managed agent is replaced by hale)."""

    def __init__(self, message: str) -> None:
        prefix = "fenced: "
        super().__init__(message[len(prefix) :] if message.startswith(prefix) else message, Code.FENCED)


class ConnectError(HaleError):
    """hale could not be reached (or refused the connection)."""

    def __init__(self, message: str, code: str = Code.CONNECT) -> None:
        super().__init__(code, message, True)


class ProtocolError(HaleError):
    """hale answered with something this client does not understand."""

    def __init__(self, message: str) -> None:
        super().__init__(Code.PROTOCOL, message, False)


class NotJson(HaleError):
    """A value given to a call is not JSON. Raised by the client before anything is sent:
    the session is unaffected. The message says where in the value and what to send."""

    def __init__(self, message: str) -> None:
        super().__init__(Code.NOT_JSON, message, False)


class StepUncertain(HaleError):
    """A step that a lost attempt began (its side effect may or may not have happened),
    raised by a step declared with ``uncertain="raise"``. ``step`` is its name and ``key``
    the idempotency key the lost attempt used."""

    def __init__(self, task: int, step: str, key: str) -> None:
        super().__init__(
            Code.STEP_UNCERTAIN,
            f"step {step!r} of task {task} was begun by a lost attempt; find out whether it happened "
            f"(its idempotency key was {key!r}), then commit it or run it again",
        )
        self.task = task
        self.step = step
        self.key = key


class TaskFailed(HaleError):
    """A task this agent submitted ended without a result: ``outcome.status`` is
    ``failed`` (``outcome.reason`` says why) or ``cancelled``. Code ``task_failed`` or
    ``task_cancelled``."""

    def __init__(self, outcome: Any) -> None:
        status = str(getattr(outcome, "status", "failed"))
        reason = getattr(outcome, "reason", None)
        task = getattr(outcome, "task", "?")
        code = Code.TASK_CANCELLED if status == "cancelled" else Code.TASK_FAILED
        super().__init__(code, f"task {task} {status}" + (f": {reason}" if reason else ""))
        #: The task as it ended (a :class:`~hale.TaskInfo`).
        self.outcome = outcome


class VersionConflict(ServerError):
    """The state is not at the expected version."""


class StaleIncarnation(ServerError):
    """A newer run of the agent has started."""


class IncarnationDown(ServerError):
    """This run was declared down."""


class LeaseLost(ServerError):
    """This run no longer holds the task."""


class OverBudget(ServerError):
    """A reservation would take the agent or the task over its budget."""


class AuthError(ServerError):
    """A token was missing, invalid, expired, revoked, or not this agent's."""


class MailboxFull(ServerError):
    """The recipient's mailbox is full."""


class NoRecipient(ServerError):
    """No agent matches the message's recipient."""


class UnknownMessage(ServerError):
    """No such message (``reply_to`` or ``ack``)."""


class Quarantined(ServerError):
    """This agent is quarantined: it may checkpoint, but not submit tasks or send
    messages (ask and reply are sends) until the operator releases it."""


class NotLeader(ServerError):
    """The node of a cluster that got the request does not lead it (any more), so it
    decided nothing; ``leader`` is the leader's ``host:port`` if the node knew it. A
    session with a :class:`Reconnect` policy follows the leader by itself and never
    raises this; without one, resume on the leader (a request in flight when a leader
    lost its leadership may or may not have been applied: check the version)."""


_BY_CODE: Dict[str, Type[HaleError]] = {
    Code.NOT_LEADER: NotLeader,
    Code.QUARANTINED: Quarantined,
    Code.VERSION_CONFLICT: VersionConflict,
    Code.STALE_INCARNATION: StaleIncarnation,
    Code.INCARNATION_DOWN: IncarnationDown,
    Code.LEASE_LOST: LeaseLost,
    Code.OVER_BUDGET: OverBudget,
    Code.MAILBOX_FULL: MailboxFull,
    Code.NO_RECIPIENT: NoRecipient,
    Code.UNKNOWN_MESSAGE: UnknownMessage,
    Code.UNAUTHENTICATED: AuthError,
    Code.FORBIDDEN: AuthError,
    Code.TOKEN_INVALID: AuthError,
    Code.TOKEN_EXPIRED: AuthError,
    Code.TOKEN_REVOKED: AuthError,
    Code.REFRESH_REFUSED: AuthError,
}


def error_from_frame(frame: Mapping[str, Any], fallback: Optional[str] = None) -> HaleError:
    """The error an ``error`` frame reports."""
    if frame.get("type") != "error":
        return ProtocolError(fallback or f"unexpected answer from hale: {dict(frame)!r}")
    return HaleError.from_body(frame)
