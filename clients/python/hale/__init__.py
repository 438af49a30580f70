"""Python client for hale, the runtime that keeps AI agents alive.

::

    import asyncio, hale

    @hale.step()
    async def draft(topic: str) -> dict:             # a durable step: runs once per task
        return {"text": await model(topic)}

    async def main() -> None:
        agent = await hale.Agent.from_env()          # or Agent.connect(url, name, role, token=...)
        state = agent.welcome.state                  # where the last run stopped
        await agent.checkpoint({"step": 1})          # durable when it returns
        async for task in agent.tasks():
            async with agent.work_on(task):
                text = await draft(task.payload["topic"])
            await agent.complete(task, text)

    asyncio.run(main())

The session and its heartbeats run on the client's own thread, so the agent's code may
block; :mod:`hale.sync` has the same API for code that is not asyncio.

Operators and tools use the HTTP API through :class:`Admin` (asyncio) or :class:`SyncAdmin`
(blocking): ``hale.SyncAdmin.from_env().agents()``; see :mod:`hale.admin`.

LangGraph graphs keep their checkpoints in the agent's state with
:class:`hale.langgraph.HaleSaver` (the ``langgraph`` extra; imported only from there).
"""

from . import sync
from .admin import Admin, SyncAdmin, TaskInfo
from .agent import Agent, StepContext, TaskHandle, WorkScope, install_sigterm, merge_patch, run_until_sigterm
from .steps import StepResult, StepRun, current_step, step
from .errors import (
    AuthError,
    Code,
    ConnectError,
    Fenced,
    HaleError,
    IncarnationDown,
    LeaseLost,
    MailboxFull,
    NoRecipient,
    NotJson,
    NotLeader,
    OverBudget,
    ProtocolError,
    Quarantined,
    ServerError,
    SessionClosed,
    StaleIncarnation,
    StepUncertain,
    TaskFailed,
    UnknownMessage,
    VersionConflict,
)
from .types import JSON as _JSON
from .types import (
    Conversation,
    LlmCall,
    Message,
    PendingReply,
    Progress,
    Reconnect,
    RecoveryPoint,
    RolledBack,
    SentMessage,
    Step,
    Submitted,
    Task,
    Welcome,
)

JSON = _JSON
"""A JSON value as ``json.loads`` returns it (``dict``, ``list``, ``str``, ``int``,
``float``, ``bool`` or ``None``): what state, payloads, step results and messages are
made of. A value that is not JSON is refused with :class:`NotJson` before it is sent."""

__version__ = "0.1.0"

__all__ = [
    "Admin",
    "Agent",
    "AuthError",
    "Code",
    "ConnectError",
    "Conversation",
    "Fenced",
    "HaleError",
    "IncarnationDown",
    "JSON",
    "LeaseLost",
    "LlmCall",
    "MailboxFull",
    "Message",
    "NoRecipient",
    "NotJson",
    "NotLeader",
    "OverBudget",
    "PendingReply",
    "Progress",
    "ProtocolError",
    "Quarantined",
    "Reconnect",
    "RecoveryPoint",
    "RolledBack",
    "SentMessage",
    "ServerError",
    "SessionClosed",
    "StaleIncarnation",
    "Step",
    "StepContext",
    "StepResult",
    "StepRun",
    "StepUncertain",
    "Submitted",
    "SyncAdmin",
    "Task",
    "TaskFailed",
    "TaskHandle",
    "TaskInfo",
    "UnknownMessage",
    "VersionConflict",
    "Welcome",
    "WorkScope",
    "current_step",
    "install_sigterm",
    "merge_patch",
    "run_until_sigterm",
    "step",
    "sync",
]
