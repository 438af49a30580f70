"""hale's HTTP API for operators and tools: what the ``hale`` CLI does (tokens, agents,
restarts, quarantine, tasks, status, the cluster, backups, the event log).

::

    import hale

    admin = hale.SyncAdmin.from_env()                 # HALE_URL, HALE_TOKEN, HALE_CA_FILE
    submitted = admin.submit("writer", {"topic": "tides"}, priority="high")
    print(admin.task(submitted.task).status)

    async def main() -> None:
        admin = hale.Admin("http://127.0.0.1:7700", token=admin_token)
        for agent in await admin.agents():
            print(agent.agent, agent.incarnation, agent.health)

:class:`SyncAdmin` blocks the calling thread (scripts, code without asyncio);
:class:`Admin` has the same methods as coroutines, each running the blocking call in a
worker thread. Most of the API needs the admin token (``HALE_ADMIN_TOKEN``, or
``admin.token`` in hale's data directory); an agent's token may read its own state and
submit tasks.

Given the addresses of several nodes of a cluster, both follow the leader: a request a
node answers ``not_leader`` goes to the leader it names (or, during an election, after
50 ms to the next address) for up to 5 s, and a node that cannot be reached is passed
over for the next; later requests start at the node that answered last. Whether a write
was applied is never in doubt when a follower refuses it; a leader that loses its
leadership while a write is in flight answers ``not_leader`` too and the write is sent
again to the new leader, so :meth:`SyncAdmin.submit` gives every task an idempotency key.

Errors: every answer hale refuses raises the :class:`~hale.HaleError` subclass of its code
(:class:`~hale.AuthError` for a missing, invalid or insufficient token,
:class:`~hale.ServerError` with ``code`` for the others, see docs/errors.md); a node that
cannot be reached raises :class:`~hale.ConnectError`; an answer this client cannot read
raises :class:`~hale.ProtocolError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import secrets
import threading
import urllib.parse
from dataclasses import dataclass, field
from typing import (
    Any,
    AsyncGenerator,
    Callable,
    Dict,
    Generator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

from ._transport import HttpStream, addresses, follow_blocking, http_base, http_follow_blocking
from .errors import ConnectError, HaleError, ProtocolError, SessionClosed
from .types import JSON, Progress, RecoveryPoint, Step, Submitted, _opt_int, _opt_str

DEFAULT_URL = "http://127.0.0.1:7700"
#: How long the event stream may go without a byte before it is given up for dead: hale
#: sends a keep-alive every 15 s.
EVENTS_IDLE = 45.0
#: How long a backup's answer may go without a line (a backup waits for one already
#: running, and a large log copies for a while between progress lines).
BACKUP_IDLE = 600.0

_T = TypeVar("_T")

__all__ = [
    "Admin",
    "AgentState",
    "AgentSummary",
    "BackupDone",
    "ClusterInfo",
    "ClusterMember",
    "DownSummary",
    "EventInfo",
    "ManagedSummary",
    "NodeSummary",
    "QuarantineSummary",
    "RoleStatus",
    "SyncAdmin",
    "SystemStatus",
    "TaskInfo",
    "TokenPair",
]


# ---- records ----------------------------------------------------------------------------


def _opt_float(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _opt_dict(value: Any) -> Optional[Dict[str, JSON]]:
    return dict(value) if isinstance(value, dict) else None


@dataclass(frozen=True)
class TokenPair:
    """An agent's tokens, as :meth:`SyncAdmin.issue_tokens` answers: the access token (a
    JWT sent as ``Authorization: Bearer``, short-lived) and the refresh token (traded for
    a new pair; each works once). Times are milliseconds since the Unix epoch."""

    agent: str
    access_token: str
    access_expires_at_ms: int
    refresh_token: str
    refresh_expires_at_ms: int

    @staticmethod
    def from_json(raw: Mapping[str, JSON]) -> TokenPair:
        """The pair from hale's answer to ``POST /v1/agents/{agent}/tokens``."""
        return TokenPair(
            agent=str(raw["agent"]),
            access_token=str(raw["access_token"]),
            access_expires_at_ms=int(raw.get("access_expires_at_ms", 0)),
            refresh_token=str(raw["refresh_token"]),
            refresh_expires_at_ms=int(raw.get("refresh_expires_at_ms", 0)),
        )


@dataclass(frozen=True)
class ManagedSummary:
    """How hale runs an agent that hale.toml declares. ``status`` is ``declared``,
    ``starting``, ``running``, ``backoff``, ``failed``, ``stopped`` or (on a cluster, when
    no node may run it) ``pending``, with why in ``pending``; ``node`` is the node of a
    cluster its run is placed on; ``restarts`` counts the restarts of its whole life;
    ``restart_due_ms`` is when a backing-off agent restarts."""

    status: str
    node: Optional[str]
    pending: Optional[str]
    pid: Optional[int]
    restarts: int
    restart_due_ms: Optional[int]

    @staticmethod
    def from_json(raw: Mapping[str, JSON]) -> ManagedSummary:
        """The ``managed`` member of an agent in ``GET /v1/agents``."""
        return ManagedSummary(
            status=str(raw.get("status", "")),
            node=_opt_str(raw.get("node")),
            pending=_opt_str(raw.get("pending")),
            pid=_opt_int(raw.get("pid")),
            restarts=int(raw.get("restarts", 0)),
            restart_due_ms=_opt_int(raw.get("restart_due_ms")),
        )


@dataclass(frozen=True)
class DownSummary:
    """Why and when an incarnation was declared down: ``detector`` is ``process_exit``,
    ``heartbeat``, ``stall``, ``group``, ``operator``, ``resource`` or ``health_probe``;
    ``cause`` is for people (its wording may change)."""

    incarnation: int
    detector: str
    cause: str
    at_ms: int

    @staticmethod
    def from_json(raw: Mapping[str, JSON]) -> DownSummary:
        """A ``last_down`` member of an agent in ``GET /v1/agents``."""
        return DownSummary(
            incarnation=int(raw.get("incarnation", 0)),
            detector=str(raw.get("detector", "")),
            cause=str(raw.get("cause", "")),
            at_ms=int(raw.get("at_ms", 0)),
        )


@dataclass(frozen=True)
class QuarantineSummary:
    """Why an agent is quarantined: ``by`` is ``itself``, ``agent NAME`` or
    ``the operator``; ``action`` what was done to its process (``isolate``, ``pause`` or
    ``stop``)."""

    reason: str
    by: str
    at_ms: int
    action: str

    @staticmethod
    def from_json(raw: Mapping[str, JSON]) -> QuarantineSummary:
        """The ``quarantine`` member of an agent in ``GET /v1/agents``."""
        return QuarantineSummary(
            reason=str(raw.get("reason", "")),
            by=str(raw.get("by", "")),
            at_ms=int(raw.get("at_ms", 0)),
            action=str(raw.get("action", "isolate")),
        )


def _progress(raw: Any) -> Optional[Progress]:
    if not isinstance(raw, dict):
        return None
    fields = raw.get("fields")
    return Progress(
        fraction=_opt_float(raw.get("fraction")),
        message=_opt_str(raw.get("message")),
        task=_opt_str(raw.get("task")),
        fields=dict(fields) if isinstance(fields, dict) else None,
    )


@dataclass(frozen=True)
class AgentSummary:
    """One agent as :meth:`SyncAdmin.agents` lists it. ``attached`` is true while a
    session of the current incarnation is open; ``managed`` is set for an agent hale
    runs; ``health`` (``alive``, ``suspect``, ``reconnecting``) and ``last_heartbeat_ms``
    while the heartbeat detector watches the run; ``progress`` once the run has sent a
    heartbeat; ``down`` if the current incarnation was declared down, ``last_down`` for
    the last one that was; ``breaker`` is ``closed``, ``open`` or ``half_open``;
    ``quarantine`` is set while the agent is quarantined."""

    agent: str
    role: str
    labels: Dict[str, str]
    incarnation: int
    version: int
    attached: bool
    recovery_points: int
    registered_at_ms: int
    updated_at_ms: int
    managed: Optional[ManagedSummary]
    health: Optional[str]
    last_heartbeat_ms: Optional[int]
    progress: Optional[Progress]
    down: Optional[DownSummary]
    last_down: Optional[DownSummary]
    breaker: str
    quarantine: Optional[QuarantineSummary]
    raw: Mapping[str, JSON] = field(repr=False, compare=False)

    @property
    def quarantined(self) -> bool:
        """Whether the agent is quarantined now."""
        return self.quarantine is not None

    @staticmethod
    def from_json(raw: Mapping[str, JSON]) -> AgentSummary:
        """One agent of ``GET /v1/agents``."""
        managed, down, last_down, quarantine = (raw.get(key) for key in ("managed", "down", "last_down", "quarantine"))
        return AgentSummary(
            agent=str(raw["agent"]),
            role=str(raw.get("role", "")),
            labels={str(k): str(v) for k, v in (raw.get("labels") or {}).items()},
            incarnation=int(raw.get("incarnation", 0)),
            version=int(raw.get("version", 0)),
            attached=bool(raw.get("attached", False)),
            recovery_points=int(raw.get("recovery_points", 0)),
            registered_at_ms=int(raw.get("registered_at_ms", 0)),
            updated_at_ms=int(raw.get("updated_at_ms", 0)),
            managed=ManagedSummary.from_json(managed) if isinstance(managed, dict) else None,
            health=_opt_str(raw.get("health")),
            last_heartbeat_ms=_opt_int(raw.get("last_heartbeat_ms")),
            progress=_progress(raw.get("progress")),
            down=DownSummary.from_json(down) if isinstance(down, dict) else None,
            last_down=DownSummary.from_json(last_down) if isinstance(last_down, dict) else None,
            breaker=str(raw.get("breaker", "")),
            quarantine=QuarantineSummary.from_json(quarantine) if isinstance(quarantine, dict) else None,
            raw=raw,
        )


@dataclass(frozen=True)
class AgentState:
    """An agent's state as :meth:`SyncAdmin.state` reads it: ``version`` is the version
    shown, ``current_version`` the agent's current one (they differ when an older retained
    version was asked for); ``history`` lists the versions retained."""

    agent: str
    incarnation: int
    version: int
    current_version: int
    state: Dict[str, JSON]
    recovery_points: List[RecoveryPoint]
    history: List[int]
    raw: Mapping[str, JSON] = field(repr=False, compare=False)

    @staticmethod
    def from_json(raw: Mapping[str, JSON]) -> AgentState:
        """The answer of ``GET /v1/agents/{agent}/state``."""
        return AgentState(
            agent=str(raw["agent"]),
            incarnation=int(raw.get("incarnation", 0)),
            version=int(raw["version"]),
            current_version=int(raw.get("current_version", raw["version"])),
            state=dict(raw.get("state") or {}),
            recovery_points=[RecoveryPoint.from_json(p) for p in raw.get("recovery_points") or []],
            history=[int(v) for v in raw.get("history") or []],
            raw=raw,
        )


@dataclass(frozen=True)
class TaskInfo:
    """A task as :meth:`SyncAdmin.task` and :meth:`SyncAdmin.tasks` show it.

    ``status`` is ``pending``, ``running``, ``shadowed``, ``compensating``, ``completed``,
    ``failed`` or ``cancelled``. ``agent`` and ``incarnation`` name the holder while it
    runs (``agent`` the last one to run it once it ended); ``result`` and ``reason`` are
    set once it completed or failed; ``level`` and ``ran_as`` say which rung of its
    fallback ladder ran it; ``kind`` is ``shadow`` (a run of ``parent_task``) or
    ``compensation`` (undoes step ``compensates``); ``children`` are a shadowed task's
    runs or the compensation running now; ``not_before_ms`` is when a retry backing off
    may run; ``spent`` and ``reserved`` hold ``tokens`` and ``cost``; ``agreed`` and
    ``dissent`` list a quorum's runs. ``shadow``, ``fallback`` and ``budget`` are as
    submitted."""

    task: int
    role: str
    priority: str
    status: str
    agent: Optional[str]
    incarnation: Optional[int]
    attempts: int
    max_attempts: int
    payload: JSON
    result: JSON
    reason: Optional[str]
    steps: List[Step]
    submitted_at_ms: int
    updated_at_ms: int
    level: Optional[str]
    ran_as: Optional[str]
    kind: Optional[str]
    parent_task: Optional[int]
    compensates: Optional[str]
    children: List[int]
    not_before_ms: Optional[int]
    last_error: Optional[str]
    shadow: Optional[Dict[str, JSON]]
    fallback: List[Dict[str, JSON]]
    budget: Optional[Dict[str, JSON]]
    spent: Dict[str, JSON]
    reserved: Dict[str, JSON]
    agreed: Optional[List[int]]
    dissent: Optional[List[int]]
    compensation_errors: List[str]
    raw: Mapping[str, JSON] = field(repr=False, compare=False)

    @property
    def id(self) -> int:
        """The task's number (``task``)."""
        return self.task

    @property
    def ok(self) -> bool:
        """Whether the task completed."""
        return self.status == "completed"

    def step(self, name: str) -> Optional[Step]:
        """The step called ``name``, if an attempt began or committed it."""
        for step in self.steps:
            if step.name == name:
                return step
        return None

    @staticmethod
    def from_json(raw: Mapping[str, JSON]) -> TaskInfo:
        """One task as ``GET /v1/tasks/{task}`` (or the list ``GET /v1/tasks``) gives it."""
        def ids(value: Any) -> Optional[List[int]]:
            return [int(one) for one in value] if isinstance(value, list) else None

        return TaskInfo(
            task=int(raw["task"]),
            role=str(raw.get("role", "")),
            priority=str(raw.get("priority", "normal")),
            status=str(raw.get("status", "")),
            agent=_opt_str(raw.get("agent")),
            incarnation=_opt_int(raw.get("incarnation")),
            attempts=int(raw.get("attempts", 0)),
            max_attempts=int(raw.get("max_attempts", 0)),
            payload=raw.get("payload"),
            result=raw.get("result"),
            reason=_opt_str(raw.get("reason")),
            steps=[Step.from_json(s) for s in raw.get("steps") or []],
            submitted_at_ms=int(raw.get("submitted_at_ms", 0)),
            updated_at_ms=int(raw.get("updated_at_ms", 0)),
            level=_opt_str(raw.get("level")),
            ran_as=_opt_str(raw.get("ran_as")),
            kind=_opt_str(raw.get("kind")),
            parent_task=_opt_int(raw.get("parent_task")),
            compensates=_opt_str(raw.get("compensates")),
            children=ids(raw.get("children")) or [],
            not_before_ms=_opt_int(raw.get("not_before_ms")),
            last_error=_opt_str(raw.get("last_error")),
            shadow=_opt_dict(raw.get("shadow")),
            fallback=[dict(rung) for rung in raw.get("fallback") or []],
            budget=_opt_dict(raw.get("budget")),
            spent=_opt_dict(raw.get("spent")) or {},
            reserved=_opt_dict(raw.get("reserved")) or {},
            agreed=ids(raw.get("agreed")),
            dissent=ids(raw.get("dissent")),
            compensation_errors=[str(e) for e in raw.get("compensation_errors") or []],
            raw=raw,
        )


@dataclass(frozen=True)
class RoleStatus:
    """One role in :class:`SystemStatus`: its agents, the healthy ones, the leases they
    hold and the tasks waiting for it."""

    role: str
    agents: int
    healthy: int
    leases: int
    queued: int

    @staticmethod
    def from_json(raw: Mapping[str, JSON]) -> RoleStatus:
        """One role of ``GET /v1/status``."""
        return RoleStatus(
            role=str(raw["role"]),
            agents=int(raw.get("agents", 0)),
            healthy=int(raw.get("healthy", 0)),
            leases=int(raw.get("leases", 0)),
            queued=int(raw.get("queued", 0)),
        )


@dataclass(frozen=True)
class SystemStatus:
    """What the whole system can do (:meth:`SyncAdmin.status`, ``hale status``). ``mode``
    is ``optimal`` (every role has a healthy agent), ``degraded`` or ``minimal``;
    ``serving`` of ``roles`` have a healthy agent. ``queued`` tasks wait, and submissions
    are shed from ``shed_background_at``, ``shed_normal_at`` and ``shed_high_at`` queued
    tasks on. ``agents_by_state`` counts agents by supervision status or liveness;
    ``recoveries_last_hour`` and the ``mttr_*`` times (seconds) describe recoveries in the
    last hour this hale has been up."""

    mode: str
    serving: int
    roles: int
    per_role: List[RoleStatus]
    queued: int
    shed_background_at: int
    shed_normal_at: int
    shed_high_at: int
    tasks_by_status: Dict[str, int]
    agents_by_state: Dict[str, int]
    recoveries_last_hour: int
    mttr_p50_seconds: Optional[float]
    mttr_p99_seconds: Optional[float]
    raw: Mapping[str, JSON] = field(repr=False, compare=False)

    @staticmethod
    def from_json(raw: Mapping[str, JSON]) -> SystemStatus:
        """The answer of ``GET /v1/status``."""
        return SystemStatus(
            mode=str(raw["mode"]),
            serving=int(raw.get("serving", 0)),
            roles=int(raw.get("roles", 0)),
            per_role=[RoleStatus.from_json(r) for r in raw.get("per_role") or []],
            queued=int(raw.get("queued", 0)),
            shed_background_at=int(raw.get("shed_background_at", 0)),
            shed_normal_at=int(raw.get("shed_normal_at", 0)),
            shed_high_at=int(raw.get("shed_high_at", 0)),
            tasks_by_status={str(k): int(v) for k, v in (raw.get("tasks_by_status") or {}).items()},
            agents_by_state={str(k): int(v) for k, v in (raw.get("agents_by_state") or {}).items()},
            recoveries_last_hour=int(raw.get("recoveries_last_hour", 0)),
            mttr_p50_seconds=_opt_float(raw.get("mttr_p50_seconds")),
            mttr_p99_seconds=_opt_float(raw.get("mttr_p99_seconds")),
            raw=raw,
        )


@dataclass(frozen=True)
class ClusterMember:
    """A member of the cluster as a node sees it; ``matched_index`` (the last log index it
    is known to hold) and ``lag`` (how far behind the leader's log) only on the leader."""

    node_id: int
    address: str
    voter: bool
    matched_index: Optional[int]
    lag: Optional[int]

    @staticmethod
    def from_json(raw: Mapping[str, JSON]) -> ClusterMember:
        """One member of ``GET /v1/cluster``."""
        return ClusterMember(
            node_id=int(raw["node_id"]),
            address=str(raw.get("address", "")),
            voter=bool(raw.get("voter", False)),
            matched_index=_opt_int(raw.get("matched_index")),
            lag=_opt_int(raw.get("lag")),
        )


@dataclass(frozen=True)
class ClusterInfo:
    """A node's view of its cluster (:meth:`SyncAdmin.cluster`): its ``role``
    (``leader``, ``follower``, ``candidate``, ``learner`` or ``shut down``), the Raft
    ``term``, the ``leader``'s node id if known, its log's last and applied indexes, and
    the ``members``."""

    node_id: int
    role: str
    term: int
    leader: Optional[int]
    last_log_index: Optional[int]
    last_applied_index: Optional[int]
    members: List[ClusterMember]
    raw: Mapping[str, JSON] = field(repr=False, compare=False)

    @staticmethod
    def from_json(raw: Mapping[str, JSON]) -> ClusterInfo:
        """The answer of ``GET /v1/cluster``."""
        return ClusterInfo(
            node_id=int(raw["node_id"]),
            role=str(raw.get("role", "")),
            term=int(raw.get("term", 0)),
            leader=_opt_int(raw.get("leader")),
            last_log_index=_opt_int(raw.get("last_log_index")),
            last_applied_index=_opt_int(raw.get("last_applied_index")),
            members=[ClusterMember.from_json(m) for m in raw.get("members") or []],
            raw=raw,
        )


@dataclass(frozen=True)
class NodeSummary:
    """A node of a cluster as the log and the leader see it (:meth:`SyncAdmin.nodes`):
    ``status`` is ``up`` or ``lost`` (since ``since_ms``), ``raft`` is ``leader``,
    ``voter``, ``learner`` or ``none``, ``agents`` the managed agents placed on it that are
    starting or running, ``last_heard_ms_ago`` (on the leader) how long ago it last
    renewed its lease."""

    name: str
    node_id: int
    address: str
    labels: Dict[str, str]
    status: str
    since_ms: int
    raft: str
    agents: List[str]
    last_heard_ms_ago: Optional[int]
    raw: Mapping[str, JSON] = field(repr=False, compare=False)

    @staticmethod
    def from_json(raw: Mapping[str, JSON]) -> NodeSummary:
        """One node of ``GET /v1/nodes``."""
        return NodeSummary(
            name=str(raw["name"]),
            node_id=int(raw["node_id"]),
            address=str(raw.get("address", "")),
            labels={str(k): str(v) for k, v in (raw.get("labels") or {}).items()},
            status=str(raw.get("status", "")),
            since_ms=int(raw.get("since_ms", 0)),
            raft=str(raw.get("raft", "")),
            agents=[str(a) for a in raw.get("agents") or []],
            last_heard_ms_ago=_opt_int(raw.get("last_heard_ms_ago")),
            raw=raw,
        )


@dataclass(frozen=True)
class BackupDone:
    """A finished backup (:meth:`SyncAdmin.backup`): the file on the server's machine, its
    size, and the log it holds (``records`` up to ``last_seq``, as committed when the
    backup began)."""

    path: str
    bytes: int
    pages: int
    records: int
    last_seq: int
    elapsed_ms: int

    @staticmethod
    def from_json(raw: Mapping[str, JSON]) -> BackupDone:
        """The last line of ``POST /v1/backups``'s answer."""
        return BackupDone(
            path=str(raw["path"]),
            bytes=int(raw.get("bytes", 0)),
            pages=int(raw.get("pages", 0)),
            records=int(raw.get("records", 0)),
            last_seq=int(raw.get("last_seq", 0)),
            elapsed_ms=int(raw.get("elapsed_ms", 0)),
        )


@dataclass(frozen=True)
class EventInfo:
    """One event of hale's log (:meth:`SyncAdmin.events`, :meth:`SyncAdmin.follow_events`):
    its sequence number (``after=seq`` goes on after it), when it was logged, its
    ``kind`` (``agent_down``, ``checkpointed``, …; ``damaged`` for a record that cannot be
    read), the agent it concerns if any, a ``summary`` for people (its wording may
    change) and ``event``, the fields as the log holds them (``None`` when damaged)."""

    seq: int
    at_ms: int
    kind: str
    agent: Optional[str]
    summary: str
    event: JSON
    raw: Mapping[str, JSON] = field(repr=False, compare=False)

    @staticmethod
    def from_json(raw: Mapping[str, JSON]) -> EventInfo:
        """One event of ``GET /v1/events`` or of its stream."""
        return EventInfo(
            seq=int(raw["seq"]),
            at_ms=int(raw.get("at_ms", 0)),
            kind=str(raw["kind"]),
            agent=_opt_str(raw.get("agent")),
            summary=str(raw.get("summary", "")),
            event=raw.get("event"),
            raw=raw,
        )


def _parse(what: str, build: Callable[[Any], _T], answer: Any) -> _T:
    """``build(answer)``, or a :class:`ProtocolError` naming ``what`` if the answer does not
    have the shape it expects."""
    try:
        return build(answer)
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise ProtocolError(f"unexpected answer to {what}: {answer!r} ({error!r})") from error


def _list_of(build: Callable[[Mapping[str, JSON]], _T]) -> Callable[[Any], List[_T]]:
    def parse(answer: Any) -> List[_T]:
        if not isinstance(answer, list):
            raise TypeError("not a list")
        return [build(one) for one in answer]

    return parse


def _segment(name: Union[str, int]) -> str:
    """A path segment: an agent's name, percent-encoded (hale answers ``invalid_name`` for
    one it does not accept)."""
    return urllib.parse.quote(str(name), safe="")


def _event_query(
    agent: Optional[str],
    kind: Union[str, Sequence[str], None],
    since_ms: Optional[int],
    after: Optional[int],
    limit: Optional[int],
) -> Dict[str, str]:
    query: Dict[str, str] = {}
    if agent is not None:
        query["agent"] = agent
    if kind is not None:
        query["kind"] = kind if isinstance(kind, str) else ",".join(kind)
    if since_ms is not None:
        query["since"] = str(since_ms)
    if after is not None:
        query["after"] = str(after)
    if limit is not None:
        query["limit"] = str(limit)
    return query


def _with_query(path: str, query: Mapping[str, str]) -> str:
    return f"{path}?{urllib.parse.urlencode(query)}" if query else path


# ---- the blocking client ------------------------------------------------------------------


class SyncAdmin:
    """hale's HTTP API, blocking: each method sends one request (following the leader of
    a cluster, see the module's documentation) and returns once hale answered, which it
    does once what it reports is durable. Safe to share between threads.

    ``url`` is hale's address: ``http://host:port``, ``https://…``, ``ws://…``,
    ``wss://…`` or a bare ``host:port``; several nodes of a cluster separated by commas,
    or a list of them. ``token`` is sent with every request (the admin token, or an
    agent's for what an agent may do). ``ca_file`` (PEM) verifies an ``https://`` hale.
    ``timeout`` bounds each request, in seconds.

    Raises :class:`~hale.ConnectError` if ``url`` names no address, or an ``https://`` one
    without ``ca_file``."""

    def __init__(
        self,
        url: Union[str, Sequence[str]],
        token: Optional[str] = None,
        *,
        ca_file: Optional[str] = None,
        timeout: float = 10.0,
    ) -> None:
        self._bases: List[str] = [http_base(address) for address in addresses(url)]
        if not self._bases:
            raise ConnectError("no address given: pass hale's URL (or set HALE_URL)")
        for base in self._bases:
            if base.startswith("https://") and ca_file is None:
                raise ConnectError(f"{base}: a TLS hale is verified against a CA file: pass ca_file= or set HALE_CA_FILE")
        #: The address requests go to first: the one that answered last.
        self._current = self._bases[0]
        self.token = token
        self.ca_file = ca_file
        self.timeout = timeout

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None, *, timeout: float = 10.0) -> SyncAdmin:
        """A client configured from the environment (or ``env``): ``HALE_URL`` (default
        ``http://127.0.0.1:7700``; a cluster's nodes separated by commas), ``HALE_TOKEN``
        (the admin token, usually) and ``HALE_CA_FILE`` (for ``https://``). Sends nothing
        yet. Raises :class:`~hale.ConnectError` as the constructor does."""
        environ = os.environ if env is None else env
        return cls(
            environ.get("HALE_URL") or DEFAULT_URL,
            environ.get("HALE_TOKEN") or None,
            ca_file=environ.get("HALE_CA_FILE") or None,
            timeout=timeout,
        )

    @property
    def urls(self) -> List[str]:
        """The HTTP addresses given, in order."""
        return list(self._bases)

    @property
    def url(self) -> str:
        """The address requests go to first: the first given, then the one that answered
        last (the leader of a cluster, once one answered)."""
        return self._current

    def _order(self) -> List[str]:
        current = self._current
        if current in self._bases:
            at = self._bases.index(current)
            return self._bases[at:] + self._bases[:at]
        return [current] + self._bases

    def _answered(self, base: str) -> None:
        # One attribute, replaced whole: threads sharing the client see one or the other.
        self._current = base

    def _call(self, method: str, path: str, body: Optional[Mapping[str, JSON]] = None) -> Any:
        return http_follow_blocking(
            method,
            self._order(),
            path,
            body,
            token=self.token,
            ca_file=self.ca_file,
            timeout=self.timeout,
            on_answer=self._answered,
        )

    def _open_stream(self, method: str, path: str, body: Optional[Mapping[str, JSON]], idle: float, follow: bool) -> HttpStream:
        """Opens a streamed answer at the current address, following the leader there if
        ``follow`` (else at the current address only)."""

        def attempt(base: str) -> HttpStream:
            return HttpStream(
                method,
                f"{base}{path}",
                body,
                token=self.token,
                ca_file=self.ca_file,
                timeout=self.timeout,
                idle_timeout=max(self.timeout, idle),
            )

        if not follow:
            return attempt(self._current)
        answered, stream = follow_blocking(self._order(), attempt)
        self._answered(answered)
        return stream

    # ---- tokens ------------------------------------------------------------------------

    def issue_tokens(self, agent: str) -> TokenPair:
        """Issues new tokens for ``agent`` (``hale token issue``; admin token): its
        previous refresh token stops working. Returns the pair. Raises
        :class:`~hale.ServerError` ``invalid_name`` for a name hale does not accept,
        :class:`~hale.AuthError` without the admin token, :class:`~hale.ConnectError` if
        hale cannot be reached."""
        answer = self._call("POST", f"/v1/agents/{_segment(agent)}/tokens")
        return _parse("issue_tokens", TokenPair.from_json, answer)

    def revoke_tokens(self, agent: str, reason: Optional[str] = None) -> None:
        """Revokes every token of ``agent`` at once and ends its sessions
        (``hale token revoke``; admin token); ``reason`` is logged (default: revoked by
        the operator). Returns once logged. Raises :class:`~hale.ServerError` ``invalid_name``,
        :class:`~hale.AuthError` without the admin token, :class:`~hale.ConnectError`."""
        body = {"reason": reason} if reason is not None else None
        self._call("POST", f"/v1/agents/{_segment(agent)}/tokens/revoke", body)

    # ---- agents ------------------------------------------------------------------------

    def agents(self) -> List[AgentSummary]:
        """Every agent hale knows, in name order (``hale agents``; admin token). Raises
        :class:`~hale.AuthError` without the admin token, :class:`~hale.ConnectError`."""
        return _parse("agents", _list_of(AgentSummary.from_json), self._call("GET", "/v1/agents"))

    def state(self, agent: str, version: Optional[int] = None) -> AgentState:
        """``agent``'s state, at its current version or at a retained ``version``. Returns
        it with its recovery points and retained versions. Raises
        :class:`~hale.ServerError` ``unknown_agent``, ``invalid_name`` or
        ``version_not_retained``, :class:`~hale.AuthError` for another agent's token,
        :class:`~hale.ConnectError`."""
        path = f"/v1/agents/{_segment(agent)}/state"
        if version is not None:
            path += f"?version={int(version)}"
        return _parse("state", AgentState.from_json, self._call("GET", path))

    def restart(self, agent: str) -> int:
        """Restarts a managed agent now (``hale restart``; admin token): its current run is
        declared down and its process stopped, a new incarnation starts at once and
        resumes its state, and its restart window is forgotten (which revives a
        ``failed`` agent). Only a hale that runs agents (``hale up``) starts the process.
        Returns the new incarnation. Raises :class:`~hale.ServerError` ``unknown_agent``
        or ``not_managed`` (hale.toml does not declare it), :class:`~hale.AuthError`,
        :class:`~hale.ConnectError`."""
        answer = self._call("POST", f"/v1/agents/{_segment(agent)}/restart")
        return _parse("restart", lambda a: int(a["incarnation"]), answer)

    def stop(self, agent: str) -> None:
        """Stops a managed agent (``hale stop``; admin token): its current run is declared
        down, its sessions fenced and its process stopped (SIGTERM, then SIGKILL after its
        grace); it is not restarted until :meth:`restart` or the next ``hale up``.
        Stopping one that is not running changes nothing. Returns once the stop is
        logged, not once the process is gone. Raises as :meth:`restart`."""
        self._call("POST", f"/v1/agents/{_segment(agent)}/stop")

    def quarantine(self, agent: str, reason: str) -> None:
        """Quarantines ``agent`` now (``hale quarantine``; admin token): it gets no work
        and may not submit or send until released, its tasks go to other agents and its
        sessions end. One already quarantined keeps its first reason. Raises
        :class:`~hale.ServerError` ``unknown_agent``, ``invalid_name`` or
        ``reason_too_long``, :class:`~hale.AuthError`, :class:`~hale.ConnectError`."""
        self._call("POST", f"/v1/agents/{_segment(agent)}/quarantine", {"reason": reason})

    def release(self, agent: str) -> None:
        """Releases ``agent`` from quarantine and forgets its past violations
        (``hale release``; admin token); releasing one not quarantined changes nothing.
        Raises :class:`~hale.ServerError` ``unknown_agent`` or ``invalid_name``,
        :class:`~hale.AuthError`, :class:`~hale.ConnectError`."""
        self._call("POST", f"/v1/agents/{_segment(agent)}/release")

    # ---- tasks -------------------------------------------------------------------------

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
    ) -> Submitted:
        """Submits a task for ``role`` (``hale submit``; the admin token or an agent's).

        ``priority`` is ``critical``, ``high``, ``normal`` (the default) or
        ``background``; ``deadline_ms`` fails the task if it has not ended by then (ms
        since the Unix epoch); ``retry_backoff_ms`` is the wait before a retry, doubled for
        each further attempt; ``shadow`` runs it on several agents
        (``{"count": 2, "quorum": 2}``); ``fallback`` lists lower rungs for when no
        healthy agent serves ``role`` (``[{"role": "small", "level": "good_enough"}]``);
        ``budget`` limits its spending (``{"tokens": 5000, "cost": 100, "wall_ms": 600000}``).

        A task without an ``idempotency_key`` gets a random one, so that sending it again
        to a new leader cannot submit it twice. Returns the task's number once durable,
        with ``new`` false when the key named an earlier task. Raises
        :class:`~hale.ServerError` ``overloaded`` (retryable) when the queue sheds this
        priority, ``bad_request`` for a body hale does not accept,
        :class:`~hale.Quarantined` for a quarantined agent's token,
        :class:`~hale.AuthError`, :class:`~hale.ConnectError`."""
        body: Dict[str, JSON] = {
            "role": role,
            "payload": payload,
            "idempotency_key": idempotency_key if idempotency_key is not None else f"admin-{secrets.token_hex(16)}",
        }
        optional: Dict[str, JSON] = {
            "priority": priority,
            "max_attempts": max_attempts,
            "deadline_ms": deadline_ms,
            "retry_backoff_ms": retry_backoff_ms,
            "shadow": dict(shadow) if shadow is not None else None,
            "fallback": [dict(rung) for rung in fallback] if fallback else None,
            "budget": dict(budget) if budget is not None else None,
        }
        body.update({key: value for key, value in optional.items() if value is not None})
        answer = self._call("POST", "/v1/tasks", body)
        return _parse("submit", lambda a: Submitted(int(a["task"]), bool(a.get("new", True))), answer)

    def tasks(self, *, status: Optional[str] = None, role: Optional[str] = None, limit: Optional[int] = None) -> List[TaskInfo]:
        """Tasks, newest first (``hale tasks``; admin token): only those in ``status``
        (``pending``, ``running``, ``completed``, …) and of ``role`` if given, at most
        ``limit`` (1,000 by default). Raises :class:`~hale.ServerError` ``bad_request``,
        :class:`~hale.AuthError`, :class:`~hale.ConnectError`."""
        query: Dict[str, str] = {}
        if status is not None:
            query["status"] = status
        if role is not None:
            query["role"] = role
        if limit is not None:
            query["limit"] = str(limit)
        answer = self._call("GET", _with_query("/v1/tasks", query))
        return _parse("tasks", _list_of(TaskInfo.from_json), answer)

    def task(self, task: int) -> TaskInfo:
        """Task number ``task``, with its steps (``hale task N``; the admin token, or an
        agent's for a task it holds or held). Raises :class:`~hale.ServerError`
        ``unknown_task``, :class:`~hale.AuthError`, :class:`~hale.ConnectError`."""
        return _parse("task", TaskInfo.from_json, self._call("GET", f"/v1/tasks/{int(task)}"))

    def cancel(self, task: int) -> None:
        """Cancels task number ``task`` wherever it is (``hale cancel``; admin token),
        including while it backs off before a retry; its holder is told, and the
        compensations of its done steps run. Returns once logged. Raises
        :class:`~hale.ServerError` ``unknown_task``, or ``task_ended`` once it has ended,
        :class:`~hale.AuthError`, :class:`~hale.ConnectError`."""
        self._call("POST", f"/v1/tasks/{int(task)}/cancel")

    def status(self) -> SystemStatus:
        """The system's mode, capacity per role, the queue and its shedding limits, tasks
        per status and agents per state (``hale status``; admin token). Raises
        :class:`~hale.AuthError`, :class:`~hale.ConnectError`."""
        return _parse("status", SystemStatus.from_json, self._call("GET", "/v1/status"))

    # ---- the cluster -------------------------------------------------------------------

    def cluster(self) -> ClusterInfo:
        """The node's view of its cluster (``hale cluster status``; admin token): on a
        cluster the leader's, once one answered. Raises :class:`~hale.ServerError`
        ``not_clustered`` on a single node, :class:`~hale.AuthError`,
        :class:`~hale.ConnectError`."""
        return _parse("cluster", ClusterInfo.from_json, self._call("GET", "/v1/cluster"))

    def nodes(self) -> List[NodeSummary]:
        """The nodes of the cluster as the log has them: status, Raft role, the agents
        placed on each and when the leader last heard from each (``hale nodes``; admin
        token). Raises :class:`~hale.ServerError` ``not_clustered`` on a single node,
        :class:`~hale.AuthError`, :class:`~hale.ConnectError`."""
        return _parse("nodes", _list_of(NodeSummary.from_json), self._call("GET", "/v1/nodes"))

    def cluster_init(self) -> int:
        """Makes the node asked (the first address) a cluster of one, which others then
        join (``hale cluster init``; admin token); a node that held a single node's log
        starts the cluster from it. Returns how many events of that log it brought in (0
        for a new node). Raises :class:`~hale.ServerError` ``not_clustered`` for a hale
        without ``[cluster]`` in its hale.toml, ``cluster_refused``,
        :class:`~hale.AuthError`, :class:`~hale.ConnectError`."""
        answer = self._call("POST", "/v1/cluster/init")
        return _parse("cluster_init", lambda a: int(a.get("imported_events") or 0), answer)

    def cluster_leave(self, node_id: Optional[int] = None) -> List[int]:
        """Removes node ``node_id`` from the cluster (``None``: the node asked; one that is
        down can be removed through any other member) (``hale cluster leave``; admin
        token). Returns the voters left. Raises :class:`~hale.ServerError`
        ``not_clustered`` or ``cluster_refused``, :class:`~hale.AuthError`,
        :class:`~hale.ConnectError`."""
        answer = self._call("POST", "/v1/cluster/leave", {"node_id": node_id})
        return _parse("cluster_leave", lambda a: [int(v) for v in a.get("voters") or []], answer)

    def cluster_join(self, address: str) -> None:
        """Has the node asked (the first address) join the cluster a member of which
        listens at ``address`` (``host:port``): as a learner until it has caught up, then
        as a voter (``hale cluster join``; admin token). Raises
        :class:`~hale.ServerError` ``not_clustered`` or ``cluster_refused``,
        :class:`~hale.AuthError`, :class:`~hale.ConnectError`."""
        self._call("POST", "/v1/cluster/join", {"address": address})

    # ---- backups and the event log -------------------------------------------------------

    def _open_backup(self, path: str) -> HttpStream:
        # A backup is of the log of the node asked, written on its machine: not followed.
        return self._open_stream("POST", "/v1/backups", {"path": path}, BACKUP_IDLE, follow=False)

    @staticmethod
    def _read_backup(stream: HttpStream, progress: Optional[Callable[[int, int], None]]) -> BackupDone:
        while True:
            line = stream.readline()
            if not line:
                raise SessionClosed("the backup's answer ended before it said how the backup went")
            if not line.strip():
                continue
            try:
                decoded = json.loads(line)
            except ValueError as error:
                raise ProtocolError(f"a backup progress line that is not JSON: {line!r}") from error
            if isinstance(decoded, dict) and isinstance(decoded.get("progress"), dict):
                if progress is not None:
                    done = decoded["progress"]
                    progress(int(done.get("pages_done", 0)), int(done.get("pages_total", 0)))
            elif isinstance(decoded, dict) and isinstance(decoded.get("done"), dict):
                return _parse("backup", BackupDone.from_json, decoded["done"])
            elif isinstance(decoded, dict) and isinstance(decoded.get("error"), dict):
                raise HaleError.from_body(decoded["error"])
            else:
                raise ProtocolError(f"an unexpected backup line: {line!r}")

    def backup(self, path: str, progress: Optional[Callable[[int, int], None]] = None) -> BackupDone:
        """Has hale back its log up into ``path``, a new file on the server's machine (an
        absolute path whose directory exists), while it keeps running (``hale backup``;
        admin token). The node asked is the current address; it is not followed.
        ``progress(pages_done, pages_total)`` is called as the copy goes. Returns once the
        backup file is complete and fsync'd. Raises :class:`~hale.ServerError`
        ``bad_request`` (a relative path, a missing directory), ``backup_exists``,
        ``backup_failed`` (nothing is left behind), :class:`~hale.AuthError`,
        :class:`~hale.ConnectError`, :class:`~hale.SessionClosed` if the answer broke
        off (the backup is then cancelled)."""
        stream = self._open_backup(path)
        try:
            return self._read_backup(stream, progress)
        finally:
            stream.close()

    def events(
        self,
        *,
        agent: Optional[str] = None,
        kind: Union[str, Sequence[str], None] = None,
        since_ms: Optional[int] = None,
        after: Optional[int] = None,
        limit: Optional[int] = None,
    ) -> List[EventInfo]:
        """Events of the log in order, oldest first (``hale events``; admin token): about
        ``agent`` (a message: its sender or recipient), of ``kind`` (one, several
        separated by commas, or a list), logged at or after ``since_ms`` (ms since the
        Unix epoch), after sequence number ``after``, at most ``limit`` (1 to 10,000;
        1,000 by default). Page on with ``after`` set to the last one's ``seq``. Raises
        :class:`~hale.ServerError` ``bad_request`` or ``log_unavailable``,
        :class:`~hale.AuthError`, :class:`~hale.ConnectError`."""
        query = _event_query(agent, kind, since_ms, after, limit)
        answer = self._call("GET", _with_query("/v1/events", query))
        return _parse("events", _list_of(EventInfo.from_json), answer)

    def _event_reader(
        self,
        agent: Optional[str],
        kind: Union[str, Sequence[str], None],
        since_ms: Optional[int],
        after: Optional[int],
    ) -> _EventReader:
        return _EventReader(self, _event_query(agent, kind, since_ms, after, None))

    def follow_events(
        self,
        *,
        agent: Optional[str] = None,
        kind: Union[str, Sequence[str], None] = None,
        since_ms: Optional[int] = None,
        after: Optional[int] = None,
    ) -> Generator[EventInfo, None, None]:
        """Follows the log (``hale events --follow``; admin token): yields every event
        that passes the filters (as :meth:`events`) as it becomes durable, from after
        ``after`` (else from ``since_ms``, else from when iteration begins: the stream
        opens at the first ``next``), without a gap or a repeat. When hale says this
        reader fell behind, it reconnects after the last event it yielded, so nothing is
        skipped. Close the generator (``generator.close()``, or ``contextlib.closing``)
        to stop.

        Raises, from the iteration: :class:`~hale.SessionClosed` when hale ends the stream
        (it shuts down) or the connection breaks or stays silent for 45 s (hale sends a
        keep-alive every 15 s); :class:`~hale.ServerError` ``log_unavailable``,
        ``bad_request``; :class:`~hale.AuthError`; :class:`~hale.ConnectError`."""
        reader = self._event_reader(agent, kind, since_ms, after)
        try:
            while True:
                yield reader.next()
        finally:
            reader.close()


class _EventReader:
    """Reads ``GET /v1/events/stream`` (server-sent events) one event at a time,
    reconnecting after a ``lagged`` notice; :meth:`close` may be called from another
    thread to stop a read that waits."""

    def __init__(self, admin: SyncAdmin, query: Dict[str, str]) -> None:
        self._admin = admin
        self._query = query
        self._stream: Optional[HttpStream] = None
        self._lock = threading.Lock()
        self._closed = False

    def _open(self) -> HttpStream:
        path = _with_query("/v1/events/stream", self._query)
        stream = self._admin._open_stream("GET", path, None, EVENTS_IDLE, follow=True)
        with self._lock:
            if self._closed:
                stream.close()
                raise SessionClosed("the event stream was closed")
            self._stream = stream
        return stream

    def _block(self, stream: HttpStream) -> Optional[Tuple[Optional[str], str]]:
        """The next event's name and data (its ``data:`` lines joined), or None once the
        stream ended."""
        name: Optional[str] = None
        data: List[str] = []
        seen = False
        while True:
            raw = stream.readline()
            if not raw:
                return None
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if not line:
                if seen:
                    return name, "\n".join(data)
                continue
            seen = True
            if line.startswith(":"):
                continue  # a comment: the keep-alive
            key, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if key == "event":
                name = value.strip()
            elif key == "data":
                data.append(value)

    def next(self) -> EventInfo:
        while True:
            stream = self._stream if self._stream is not None else self._open()
            block = self._block(stream)
            if block is None or self._closed:
                if self._closed:
                    raise SessionClosed("the event stream was closed")
                raise SessionClosed("hale ended the event stream (is it shutting down?)")
            name, data = block
            if name in (None, "", "message"):
                if not data:
                    continue
                event = _parse("the event stream", lambda d: EventInfo.from_json(json.loads(d)), data)
                self._query["after"] = str(event.seq)
                return event
            if name == "lagged":
                lag = _parse("a lagged notice", lambda d: int(json.loads(d)["after"]), data)
                self._query["after"] = str(lag)
                with self._lock:
                    self._stream = None
                stream.close()
                continue
            if name == "error":
                try:
                    decoded = json.loads(data)
                except ValueError:
                    decoded = None
                if isinstance(decoded, dict) and isinstance(decoded.get("error"), dict):
                    raise HaleError.from_body(decoded["error"])
                raise ProtocolError(f"the event stream failed: {data}")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()


# ---- the asyncio client --------------------------------------------------------------------


def _close_opened(opening: "asyncio.Future[HttpStream]") -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


class Admin:
    """hale's HTTP API for asyncio code: the methods of :class:`SyncAdmin` as coroutines,
    each running the blocking call in a worker thread (so the event loop never waits on
    the network). Following the leader of a cluster, the arguments and the errors are
    those of :class:`SyncAdmin`; see the module's documentation.

    ``url`` is hale's address (``http://``, ``https://``, ``ws://``, ``wss://`` or a bare
    ``host:port``; several nodes of a cluster separated by commas, or a list), ``token``
    the token sent with every request, ``ca_file`` (PEM) verifies an ``https://`` hale,
    ``timeout`` bounds each request in seconds. Raises :class:`~hale.ConnectError` if
    ``url`` names no address, or an ``https://`` one without ``ca_file``."""

    def __init__(
        self,
        url: Union[str, Sequence[str]],
        token: Optional[str] = None,
        *,
        ca_file: Optional[str] = None,
        timeout: float = 10.0,
    ) -> None:
        self._sync = SyncAdmin(url, token, ca_file=ca_file, timeout=timeout)

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None, *, timeout: float = 10.0) -> Admin:
        """A client configured from the environment (or ``env``): ``HALE_URL`` (default
        ``http://127.0.0.1:7700``; a cluster's nodes separated by commas), ``HALE_TOKEN``
        and ``HALE_CA_FILE``. Sends nothing yet (so it is not a coroutine). Raises
        :class:`~hale.ConnectError` as the constructor does."""
        sync = SyncAdmin.from_env(env, timeout=timeout)
        return cls(sync.urls, sync.token, ca_file=sync.ca_file, timeout=timeout)

    @property
    def sync(self) -> SyncAdmin:
        """The blocking client behind this one (same addresses, token and leader)."""
        return self._sync

    @property
    def urls(self) -> List[str]:
        """The HTTP addresses given, in order."""
        return self._sync.urls

    @property
    def url(self) -> str:
        """The address requests go to first: the first given, then the one that answered
        last (the leader of a cluster, once one answered)."""
        return self._sync.url

    @property
    def token(self) -> Optional[str]:
        """The token sent with every request."""
        return self._sync.token

    async def issue_tokens(self, agent: str) -> TokenPair:
        """Issues new tokens for ``agent`` (admin token); its previous refresh token stops
        working. Returns the pair. Raises as :meth:`SyncAdmin.issue_tokens`
        (:class:`~hale.ServerError` ``invalid_name``, :class:`~hale.AuthError`,
        :class:`~hale.ConnectError`)."""
        return await asyncio.to_thread(self._sync.issue_tokens, agent)

    async def revoke_tokens(self, agent: str, reason: Optional[str] = None) -> None:
        """Revokes every token of ``agent`` and ends its sessions (admin token). Raises
        as :meth:`SyncAdmin.revoke_tokens`."""
        await asyncio.to_thread(self._sync.revoke_tokens, agent, reason)

    async def agents(self) -> List[AgentSummary]:
        """Every agent hale knows, in name order (admin token). Raises
        :class:`~hale.AuthError`, :class:`~hale.ConnectError`."""
        return await asyncio.to_thread(self._sync.agents)

    async def state(self, agent: str, version: Optional[int] = None) -> AgentState:
        """``agent``'s state, now or at a retained ``version``. Raises as
        :meth:`SyncAdmin.state` (``unknown_agent``, ``version_not_retained``, …)."""
        return await asyncio.to_thread(self._sync.state, agent, version)

    async def restart(self, agent: str) -> int:
        """Restarts a managed agent now and forgets its restart window; returns the new
        incarnation. Raises as :meth:`SyncAdmin.restart` (``unknown_agent``,
        ``not_managed``, …)."""
        return await asyncio.to_thread(self._sync.restart, agent)

    async def stop(self, agent: str) -> None:
        """Stops a managed agent until :meth:`restart` or the next ``hale up``; returns
        once the stop is logged. Raises as :meth:`SyncAdmin.stop`."""
        await asyncio.to_thread(self._sync.stop, agent)

    async def quarantine(self, agent: str, reason: str) -> None:
        """Quarantines ``agent``: no work until released. Raises as
        :meth:`SyncAdmin.quarantine`."""
        await asyncio.to_thread(self._sync.quarantine, agent, reason)

    async def release(self, agent: str) -> None:
        """Releases ``agent`` from quarantine and forgets its violations. Raises as
        :meth:`SyncAdmin.release`."""
        await asyncio.to_thread(self._sync.release, agent)

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
        """Submits a task for ``role`` (the arguments are :meth:`SyncAdmin.submit`'s; a
        random idempotency key is added when none is given). Returns its number once
        durable (``new`` false for a key that named an earlier task). Raises as
        :meth:`SyncAdmin.submit` (``overloaded``, ``bad_request``, …)."""
        return await asyncio.to_thread(
            lambda: self._sync.submit(
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

    async def tasks(self, *, status: Optional[str] = None, role: Optional[str] = None, limit: Optional[int] = None) -> List[TaskInfo]:
        """Tasks, newest first, filtered by ``status`` and ``role``, at most ``limit``
        (admin token). Raises as :meth:`SyncAdmin.tasks`."""
        return await asyncio.to_thread(lambda: self._sync.tasks(status=status, role=role, limit=limit))

    async def task(self, task: int) -> TaskInfo:
        """Task number ``task`` with its steps. Raises as :meth:`SyncAdmin.task`
        (``unknown_task``, …)."""
        return await asyncio.to_thread(self._sync.task, task)

    async def cancel(self, task: int) -> None:
        """Cancels task number ``task`` wherever it is. Raises as :meth:`SyncAdmin.cancel`
        (``unknown_task``, ``task_ended``, …)."""
        await asyncio.to_thread(self._sync.cancel, task)

    async def status(self) -> SystemStatus:
        """The system's mode, capacity per role and the queue (admin token). Raises as
        :meth:`SyncAdmin.status`."""
        return await asyncio.to_thread(self._sync.status)

    async def cluster(self) -> ClusterInfo:
        """The node's view of its cluster (admin token). Raises as
        :meth:`SyncAdmin.cluster` (``not_clustered`` on a single node, …)."""
        return await asyncio.to_thread(self._sync.cluster)

    async def nodes(self) -> List[NodeSummary]:
        """The nodes of the cluster (admin token). Raises as :meth:`SyncAdmin.nodes`
        (``not_clustered`` on a single node, …)."""
        return await asyncio.to_thread(self._sync.nodes)

    async def cluster_init(self) -> int:
        """Makes the node asked a cluster of one; returns how many events of a single
        node's log it brought in. Raises as :meth:`SyncAdmin.cluster_init`."""
        return await asyncio.to_thread(self._sync.cluster_init)

    async def cluster_leave(self, node_id: Optional[int] = None) -> List[int]:
        """Removes node ``node_id`` (``None``: the node asked) from the cluster; returns
        the voters left. Raises as :meth:`SyncAdmin.cluster_leave`."""
        return await asyncio.to_thread(self._sync.cluster_leave, node_id)

    async def cluster_join(self, address: str) -> None:
        """Has the node asked join the cluster a member of which listens at ``address``.
        Raises as :meth:`SyncAdmin.cluster_join`."""
        await asyncio.to_thread(self._sync.cluster_join, address)

    async def backup(self, path: str, progress: Optional[Callable[[int, int], None]] = None) -> BackupDone:
        """Has hale back its log up into ``path``, a new file on the server's machine
        (admin token). ``progress(pages_done, pages_total)`` is called on the event loop
        as the copy goes. Returns once the backup is complete and fsync'd; cancelling the
        call closes the connection, which cancels a backup still running (hale then
        leaves no file).
        Raises as :meth:`SyncAdmin.backup` (``bad_request``, ``backup_exists``,
        ``backup_failed``, …)."""
        loop = asyncio.get_running_loop()
        relay: Optional[Callable[[int, int], None]] = None
        if progress is not None:
            report = progress

            def relay(done: int, total: int) -> None:
                loop.call_soon_threadsafe(report, done, total)

        opening = asyncio.ensure_future(asyncio.to_thread(self._sync._open_backup, path))
        try:
            stream = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # The connection opens in its thread all the same: close it once it has.
            opening.add_done_callback(_close_opened)
            raise
        try:
            return await asyncio.to_thread(self._sync._read_backup, stream, relay)
        finally:
            stream.close()

    async def events(
        self,
        *,
        agent: Optional[str] = None,
        kind: Union[str, Sequence[str], None] = None,
        since_ms: Optional[int] = None,
        after: Optional[int] = None,
        limit: Optional[int] = None,
    ) -> List[EventInfo]:
        """Events of the log in order, filtered as :meth:`SyncAdmin.events` (admin token);
        page on with ``after`` set to the last one's ``seq``. Raises as
        :meth:`SyncAdmin.events`."""
        return await asyncio.to_thread(
            lambda: self._sync.events(agent=agent, kind=kind, since_ms=since_ms, after=after, limit=limit)
        )

    async def follow_events(
        self,
        *,
        agent: Optional[str] = None,
        kind: Union[str, Sequence[str], None] = None,
        since_ms: Optional[int] = None,
        after: Optional[int] = None,
    ) -> AsyncGenerator[EventInfo, None]:
        """Follows the log (admin token): ``async for event in admin.follow_events(...)``
        yields every event that passes the filters as it becomes durable, from after
        ``after`` (else ``since_ms``, else from when iteration begins), reconnecting
        without a gap when hale says the reader fell behind. The stream is read by a
        thread of its own; close the generator (``await gen.aclose()``, or
        ``contextlib.aclosing``) or cancel the task iterating it to stop, which closes
        the connection at once. Raises, from the iteration, as
        :meth:`SyncAdmin.follow_events` (:class:`~hale.SessionClosed` when hale ends the
        stream, :class:`~hale.AuthError`, :class:`~hale.ConnectError`, …)."""
        reader = self._sync._event_reader(agent, kind, since_ms, after)
        # Not the loop's default executor: a follower waits for as long as it lives.
        thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hale-events")
        loop = asyncio.get_running_loop()
        try:
            while True:
                yield await loop.run_in_executor(thread, reader.next)
        finally:
            reader.close()
            thread.shutdown(wait=False)

