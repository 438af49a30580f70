"""Python client for hale, the runtime that keeps AI agents alive.

::

    import asyncio, hale

    async def main() -> None:
        agent = await hale.Agent.from_env()          # or Agent.connect(url, name, role, token=...)
        state = agent.welcome.state                  # where the last run stopped
        await agent.checkpoint({"step": 1})          # durable when it returns
        async for task in agent.tasks():
            async with agent.step(task, "draft") as step:
                step.result = {"text": "..."}
            await agent.complete(task.task, {"ok": True})

    asyncio.run(main())

Operators and tools use the HTTP API through :class:`Admin` (asyncio) or :class:`SyncAdmin`
(blocking): ``hale.SyncAdmin.from_env().agents()``; see :mod:`hale.admin`.
"""

from .admin import Admin, SyncAdmin
from .agent import Agent, StepContext, install_sigterm, merge_patch, run_until_sigterm
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
    NotLeader,
    OverBudget,
    ProtocolError,
    Quarantined,
    ServerError,
    SessionClosed,
    StaleIncarnation,
    UnknownMessage,
    VersionConflict,
)
from .types import (
    JSON,
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
    "Submitted",
    "SyncAdmin",
    "Task",
    "UnknownMessage",
    "VersionConflict",
    "Welcome",
    "install_sigterm",
    "merge_patch",
    "run_until_sigterm",
]
