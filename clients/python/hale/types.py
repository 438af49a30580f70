"""What hale sends and what the client sends it, as small typed records.

Every record built from a frame keeps the frame it came from in ``raw``, so fields this
version of the client does not know yet are still reachable.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

#: A JSON value as ``json.loads`` returns it.
JSON = Any


def _opt_int(value: Any) -> Optional[int]:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _opt_str(value: Any) -> Optional[str]:
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class Reconnect:
    """How to come back after a lost connection.

    Attempt ``n`` (0-based) waits a uniformly random time in ``[0, min(cap, base * 2**n)]``
    seconds (exponential backoff with full jitter, so many agents do not come back in
    step), then tries the next address in turn: the one connected first, the others
    given to ``connect``, then ``more_urls``. A node of a cluster that does not lead and
    names the leader is taken at its word: the leader is tried at once. ``attempts``
    gives up after that many failed attempts in a row (``None``: never).
    """

    base: float = 0.1
    cap: float = 10.0
    attempts: Optional[int] = None
    more_urls: Sequence[str] = ()

    def delay(self, attempt: int) -> float:
        """The wait before reconnect attempt ``attempt`` (0-based), in seconds: drawn
        uniformly from ``[0, min(cap, base * 2**attempt)]``."""
        ceiling = min(self.cap, self.base * (2 ** min(attempt, 20)))
        return random.uniform(0.0, ceiling) if ceiling > 0 else 0.0


@dataclass(frozen=True)
class Progress:
    """How far the agent got, sent with a heartbeat. ``task`` names the work in hand, for
    people; hale judges whether a run is working from the tasks it holds, never from
    this."""

    fraction: Optional[float] = None
    message: Optional[str] = None
    task: Optional[str] = None
    fields: Optional[Mapping[str, JSON]] = None

    def to_json(self) -> Dict[str, JSON]:
        """The ``progress`` member of a heartbeat frame: the members that are set."""
        body: Dict[str, JSON] = {}
        if self.fraction is not None:
            body["fraction"] = self.fraction
        if self.message is not None:
            body["message"] = self.message
        if self.task is not None:
            body["task"] = self.task
        if self.fields:
            body["fields"] = dict(self.fields)
        return body


@dataclass(frozen=True)
class LlmCall:
    """The model call behind a committed step, so a rerun can tell whether it would match."""

    model: str
    model_version: Optional[str] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    max_tokens: Optional[int] = None
    prompt_hash: Optional[str] = None
    tokens_in: Optional[int] = None
    tokens_out: Optional[int] = None

    def to_json(self) -> Dict[str, JSON]:
        """The ``llm`` member of a ``commit_step`` frame: the members that are set."""
        return {key: value for key, value in self.__dict__.items() if value is not None}

    @staticmethod
    def from_response(response: Any, **settings: Any) -> LlmCall:
        """The call behind a model SDK's ``response``: its ``model`` and token use, read
        from ``usage`` as the Anthropic (``input_tokens``, ``output_tokens``) and OpenAI
        (``prompt_tokens``, ``completion_tokens``) SDKs give it, as attributes or dict
        members. ``settings`` adds what the response does not say (``temperature``,
        ``seed``, ``max_tokens``, ``prompt_hash``…) and overrides what it does."""

        def read(source: Any, *names: str) -> Any:
            for name in names:
                value = source.get(name) if isinstance(source, Mapping) else getattr(source, name, None)
                if value is not None:
                    return value
            return None

        usage = read(response, "usage")
        fields: Dict[str, Any] = {
            "model": read(response, "model") or "unknown",
            "tokens_in": read(usage, "input_tokens", "prompt_tokens") if usage is not None else None,
            "tokens_out": read(usage, "output_tokens", "completion_tokens") if usage is not None else None,
        }
        fields.update(settings)
        return LlmCall(**fields)

    @staticmethod
    def from_json(raw: Mapping[str, JSON]) -> LlmCall:
        """The call as a task's step reports it (its ``llm`` member)."""
        return LlmCall(
            model=str(raw.get("model", "")),
            model_version=_opt_str(raw.get("model_version")),
            temperature=raw.get("temperature"),
            top_p=raw.get("top_p"),
            seed=_opt_int(raw.get("seed")),
            max_tokens=_opt_int(raw.get("max_tokens")),
            prompt_hash=_opt_str(raw.get("prompt_hash")),
            tokens_in=_opt_int(raw.get("tokens_in")),
            tokens_out=_opt_int(raw.get("tokens_out")),
        )


@dataclass(frozen=True)
class RecoveryPoint:
    """A named version of the agent's state, to roll back to (:meth:`hale.Agent.rollback`
    with its name): the ``version`` it names and when it was marked (ms since the Unix
    epoch)."""

    name: str
    version: int
    marked_at_ms: int

    @staticmethod
    def from_json(raw: Mapping[str, JSON]) -> RecoveryPoint:
        """The point as a ``welcome`` or a ``recovery_point_marked`` frame gives it."""
        return RecoveryPoint(str(raw["name"]), int(raw["version"]), int(raw.get("marked_at_ms", 0)))


@dataclass(frozen=True)
class RolledBack:
    """A rollback's result: the new version, the version restored, and the new state."""

    version: int
    target_version: int
    state: Dict[str, JSON]


@dataclass(frozen=True)
class Conversation:
    """A conversation the run takes part in, as a ``welcome`` lists it: its ``id``, who
    takes part, when it started and last had a message (ms since the Unix epoch), and how
    many messages it holds."""

    id: str
    participants: List[str]
    last_at_ms: Optional[int]
    started_at_ms: Optional[int]
    messages: Optional[int]
    raw: Mapping[str, JSON] = field(repr=False, compare=False)

    @staticmethod
    def from_json(raw: Mapping[str, JSON]) -> Conversation:
        """The conversation as a ``welcome`` frame lists it."""
        return Conversation(
            str(raw.get("id", "")),
            [str(p) for p in raw.get("participants") or []],
            _opt_int(raw.get("last_at_ms")),
            _opt_int(raw.get("started_at_ms")),
            _opt_int(raw.get("messages")),
            raw,
        )


@dataclass(frozen=True)
class PendingReply:
    """A message sent to this agent that expects a reply it has not given yet."""

    message: int
    seq: Optional[int]
    sender: str
    conversation: Optional[str]
    raw: Mapping[str, JSON] = field(repr=False, compare=False)

    @staticmethod
    def from_json(raw: Mapping[str, JSON]) -> PendingReply:
        """The pending reply as a ``welcome`` frame lists it."""
        return PendingReply(
            int(raw.get("message", 0)),
            _opt_int(raw.get("seq")),
            str(raw.get("from", "")),
            _opt_str(raw.get("conversation")),
            raw,
        )


@dataclass(frozen=True)
class Welcome:
    """Everything a run needs to carry on, from hale's ``welcome``: the ``incarnation``
    this run is (``resumed`` when it is one that said hello before, after a lost
    connection), the agent's ``state`` at ``version`` as its last checkpoint left it, its
    recovery points and retained versions (``history``), how many messages wait in its
    mailbox, and its conversations and the replies it owes. ``raw`` is the frame."""

    protocol: int
    agent: str
    role: str
    labels: Dict[str, str]
    incarnation: int
    resumed: bool
    version: int
    state: Dict[str, JSON]
    recovery_points: List[RecoveryPoint]
    history: List[int]
    session: Optional[str]
    #: How many messages wait in the mailbox; they follow the welcome as messages.
    unacked: int
    conversations: List[Conversation]
    pending_replies: List[PendingReply]
    raw: Mapping[str, JSON] = field(repr=False, compare=False)

    @staticmethod
    def from_json(raw: Mapping[str, JSON]) -> Welcome:
        """The ``welcome`` frame hale answers a ``hello`` with."""
        return Welcome(
            protocol=int(raw.get("protocol", 0)),
            agent=str(raw["agent"]),
            role=str(raw.get("role", "")),
            labels=dict(raw.get("labels") or {}),
            incarnation=int(raw["incarnation"]),
            resumed=bool(raw.get("resumed", False)),
            version=int(raw.get("version", 0)),
            state=dict(raw.get("state") or {}),
            recovery_points=[RecoveryPoint.from_json(p) for p in raw.get("recovery_points") or []],
            history=[int(v) for v in raw.get("history") or []],
            session=_opt_str(raw.get("session")) or None,
            unacked=int(raw.get("unacked", 0)),
            conversations=[Conversation.from_json(c) for c in raw.get("conversations") or []],
            pending_replies=[PendingReply.from_json(p) for p in raw.get("pending_replies") or []],
            raw=raw,
        )


@dataclass(frozen=True)
class Step:
    """A step of a task. ``state`` is ``done``, ``intent`` (begun by the attempt holding
    the lease) or ``uncertain`` (begun by a lost attempt: find out whether its side
    effect happened before doing it again). ``result`` is what was committed (JSON),
    ``attempt`` the attempt that committed or began it, ``at_ms`` when (ms since the Unix
    epoch), ``llm`` the model call behind it and ``compensation`` what would undo it."""

    name: str
    state: str
    result: JSON
    attempt: int
    at_ms: int
    llm: Optional[LlmCall]
    compensation: JSON

    @staticmethod
    def from_json(raw: Mapping[str, JSON]) -> Step:
        """The step as a ``task`` frame (or ``GET /v1/tasks/{task}``) lists it."""
        llm = raw.get("llm")
        return Step(
            name=str(raw["name"]),
            state=str(raw.get("state", "done")),
            result=raw.get("result"),
            attempt=int(raw.get("attempt", 0)),
            at_ms=int(raw.get("at_ms", 0)),
            llm=LlmCall.from_json(llm) if isinstance(llm, dict) else None,
            compensation=raw.get("compensation"),
        )


@dataclass(frozen=True)
class Task:
    """A task hale leased to this run, with the steps earlier attempts left.

    ``attempts`` is the number of the attempt this run holds (1 for the first; each
    retry and each move to another run after the holder was lost adds one), out of
    ``max_attempts``. ``payload`` is as submitted. ``steps`` are those earlier attempts
    committed (``done``) or began (``uncertain``): :meth:`done` and :meth:`step` look one
    up, and :func:`hale.step` functions return a done step's result without running.
    ``kind`` is ``shadow`` for one of the runs of a shadowed ``parent_task`` and
    ``compensation`` for a task that undoes step ``compensates``; ``raw`` is the frame."""

    task: int
    role: str
    priority: str
    status: str
    attempts: int
    max_attempts: int
    payload: JSON
    steps: List[Step]
    kind: Optional[str]
    parent_task: Optional[int]
    compensates: Optional[str]
    raw: Mapping[str, JSON] = field(repr=False, compare=False)

    @property
    def id(self) -> int:
        """The task's number (``task``)."""
        return self.task

    def step(self, name: str) -> Optional[Step]:
        """The step called ``name``, if an attempt began or committed it."""
        for step in self.steps:
            if step.name == name:
                return step
        return None

    def done(self, name: str) -> bool:
        """Whether step ``name`` was committed (skip it on a retry)."""
        step = self.step(name)
        return step is not None and step.state == "done"

    @staticmethod
    def from_json(raw: Mapping[str, JSON]) -> Task:
        """The task as the ``task`` frame that leases it to the run gives it."""
        return Task(
            task=int(raw["task"]),
            role=str(raw.get("role", "")),
            priority=str(raw.get("priority", "normal")),
            status=str(raw.get("status", "")),
            attempts=int(raw.get("attempts", 0)),
            max_attempts=int(raw.get("max_attempts", 0)),
            payload=raw.get("payload"),
            steps=[Step.from_json(s) for s in raw.get("steps") or []],
            kind=_opt_str(raw.get("kind")),
            parent_task=_opt_int(raw.get("parent_task")),
            compensates=_opt_str(raw.get("compensates")),
            raw=raw,
        )


@dataclass(frozen=True)
class Submitted:
    """A submitted task's number; ``new`` is false when an idempotency key named an
    earlier one."""

    task: int
    new: bool


@dataclass(frozen=True)
class Message:
    """A message delivered to this agent's mailbox. Acknowledge it (``Agent.ack``) once
    handled; until then hale delivers it again after every reconnect (the client hands
    each ``seq`` to the application once)."""

    seq: int
    message: int
    sender: str
    conversation: str
    body: JSON
    reply_to: Optional[int]
    expects_reply: bool
    sent_at_ms: Optional[int]
    raw: Mapping[str, JSON] = field(repr=False, compare=False)

    @staticmethod
    def from_json(raw: Mapping[str, JSON]) -> Message:
        """The message as the ``message`` frame that delivers it gives it."""
        return Message(
            seq=int(raw["seq"]),
            message=int(raw.get("message", 0)),
            sender=str(raw.get("from", "")),
            conversation=str(raw.get("conversation", "")),
            body=raw.get("body"),
            reply_to=_opt_int(raw.get("reply_to")),
            expects_reply=bool(raw.get("expects_reply", False)),
            sent_at_ms=_opt_int(raw.get("sent_at_ms")),
            raw=raw,
        )


@dataclass(frozen=True)
class SentMessage:
    """A message hale took into the recipient's mailbox. ``new`` is false when its
    idempotency key named a message sent before (a resend after a reconnect)."""

    message: int
    to: str
    seq: int
    conversation: str
    new: bool

    @staticmethod
    def from_json(raw: Mapping[str, JSON]) -> SentMessage:
        """The ``sent`` frame hale answers a ``send`` with."""
        return SentMessage(
            message=int(raw.get("message", 0)),
            to=str(raw.get("to", "")),
            seq=int(raw.get("seq", 0)),
            conversation=str(raw.get("conversation", "")),
            new=bool(raw.get("new", True)),
        )


ProgressLike = Union[Progress, Mapping[str, JSON], None]
LlmLike = Union[LlmCall, Mapping[str, JSON], None]
