"""A LangGraph checkpointer that keeps a graph's checkpoints in the agent's hale state, so a
graph run by an agent that hale restarts resumes from its last checkpoint.

Install the extra (``pip install 'hale-client[langgraph]'``) and give the graph a
:class:`HaleSaver` over the agent's session::

    import hale.sync
    from hale.langgraph import HaleSaver

    agent = hale.sync.Agent.from_env()
    graph = builder.compile(checkpointer=HaleSaver(agent))
    config = {"configurable": {"thread_id": "report-42"}}
    if graph.get_state(config).next:          # a run that was cut short: carry on
        result = graph.invoke(None, config, durability="sync")
    else:
        result = graph.invoke({"topic": "tides"}, config, durability="sync")

Each :meth:`~HaleSaver.put` and :meth:`~HaleSaver.put_writes` is one checkpoint of the
agent's state (one RFC 7396 merge patch, durable when the call returns), so a process
killed at any moment keeps every checkpoint and pending write whose call returned, once,
and the one in flight whole or not at all; a node that finished (its writes saved) is not
run again when the graph resumes. Run the graph with ``durability="sync"`` for that: each
step's checkpoint is then durable before the next step starts. LangGraph's default,
``"async"``, saves it while the next step runs, so a crash may lose the last steps'
checkpoints, and their nodes run again.

Where: ``state["langgraph"]`` (``key``) holds, per thread and checkpoint namespace (a
subgraph's checkpoints have a namespace of their own)::

    {"<thread>": {"<ns>": {                  # "" is the root graph
        "checkpoints": {"<id>": {"checkpoint": [type, b64], "metadata": [type, b64],
                                 "parent": "<id>", "versions": {"<channel>": "<version>"}}},
        "blobs": {"<channel>": {"<version>": [type, b64]}},
        "writes": {"<id>": {"<task>/<idx>": {"task": ..., "idx": ..., "channel": ...,
                                             "value": [type, b64], "path": ...}}}}}}

Values are what the serializer (``serde``) makes of them: a type and bytes, the bytes as
base64 so the state stays JSON. A channel's value is stored once per version and shared by
the checkpoints that have it, so a put sends only the channels that changed.

Bounds: only the newest ``keep`` checkpoints of each thread and namespace are kept (20 by
default), with their pending writes and the channel values they use; older ones are
deleted in the same patch that adds a new one, so a thread's share of the state stays
bounded by what ``keep`` checkpoints hold. hale limits an agent's state to 4 MiB and each
patch to 256 KiB by default (``state_bytes_max``, ``patch_bytes_max``): a put (its
changed channels) or a task's writes that do not fit are refused with
:class:`hale.HaleError` (``patch_too_large``, ``state_too_large``) and store nothing. Keep bulk data (documents, embeddings) elsewhere
and its reference in the graph's state; lower ``keep`` for graphs with large state;
:meth:`~HaleSaver.delete_thread` (or :meth:`~HaleSaver.prune`) a thread that is done. A
graph that makes a new subgraph namespace per run keeps ``keep`` checkpoints in each until
the thread is deleted. Time travel reaches back ``keep`` checkpoints only, and a
``DeltaChannel`` (beta in LangGraph) whose history reaches past them cannot be rebuilt.

Agents: either kind. With :class:`hale.sync.Agent` the graph's ``invoke``/``stream`` call
the blocking methods; with :class:`hale.Agent`, ``ainvoke``/``astream`` call the ``a…``
ones. Every method works with both: the ``a…`` methods run the blocking ones in a worker
thread (``asyncio.to_thread``), so the caller's event loop never waits on hale, and the
blocking ones, given an asyncio agent, hand the checkpoint to the client's own thread and
wait for it (so a synchronous ``graph.invoke`` works with ``hale.Agent`` too, called
from any thread but the client's; on a thread that runs an event loop it blocks that loop
until the checkpoint is durable: use ``ainvoke`` there). Writes are serialized by a lock:
LangGraph saves checkpoints and writes from several threads or tasks at once.

The saver owns ``state[key]``: write the rest of the state as usual, but not that member,
and make one saver per agent and key (graphs of one process may share it). It reads the
member from the agent (``agent.state``) at its first call and whenever the agent's
version is not the one its own last write made (the application checkpointed, rolled
back, or the session resumed), and otherwise keeps its own copy.
"""

from __future__ import annotations

import asyncio
import base64
import random
import threading
from typing import AbstractSet, Any, AsyncIterator, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union, cast

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    PendingWrite,
    get_checkpoint_id,
    get_checkpoint_metadata,
)
from langgraph.checkpoint.serde.base import SerializerProtocol

from . import _runtime
from ._core import merge_patch
from .agent import Agent as AsyncAgent
from .sync import Agent as SyncAgent
from .types import JSON

__all__ = ["HaleSaver", "DEFAULT_KEEP", "DEFAULT_KEY"]

#: Checkpoints kept per thread and namespace unless told otherwise.
DEFAULT_KEEP = 20
#: The member of the agent's state the checkpoints live under unless told otherwise.
DEFAULT_KEY = "langgraph"

_Tree = Dict[str, Any]


class HaleSaver(BaseCheckpointSaver[str]):
    """LangGraph checkpoints in the hale state of ``agent`` (see :mod:`hale.langgraph`).

    * ``agent``: the session, :class:`hale.sync.Agent` or :class:`hale.Agent`.
    * ``keep``: the newest checkpoints kept per thread and namespace (at least 1; the
      latest one is all a resume needs, older ones serve history and time travel).
    * ``key``: the member of the state the checkpoints live under; the saver owns it.
    * ``serde``: LangGraph's serializer (default: its ``JsonPlusSerializer``; an
      ``EncryptedSerializer`` encrypts the values before they reach hale).

    Thread ids are stored as strings (``str(thread_id)``). Channel versions are strings
    as :meth:`get_next_version` makes them (``InMemorySaver``'s scheme).
    """

    def __init__(
        self,
        agent: Union[SyncAgent, AsyncAgent],
        *,
        keep: int = DEFAULT_KEEP,
        key: str = DEFAULT_KEY,
        serde: Optional[SerializerProtocol] = None,
    ) -> None:
        super().__init__(serde=serde)
        if not isinstance(agent, (SyncAgent, AsyncAgent)):
            raise TypeError(f"agent is a hale.sync.Agent or a hale.Agent, not {type(agent).__name__}")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep is how many checkpoints to keep per thread and namespace, 1 or more: {keep!r}")
        if not key:
            raise ValueError("key names a member of the agent's state: give a non-empty string")
        self.agent = agent
        self.keep = keep
        self.key = key
        # Shared with the copies LangGraph makes of the saver (``with_allowlist``).
        self._mirror = _Mirror()

    # ---- the state -------------------------------------------------------------------

    def _current(self) -> _Tree:
        """``state[key]`` as hale holds it; called with the lock held."""
        mirror = self._mirror
        version = self.agent.version
        if mirror.version != version:
            stored = self.agent.state.get(self.key)
            mirror.tree = stored if isinstance(stored, dict) else {}
            mirror.version = version
        return mirror.tree

    def _write(self, patch: _Tree) -> None:
        """Checkpoints ``{key: patch}`` (durable when it returns) and folds it into the
        copy; called with the lock held. On any failure the copy is read again next time:
        whether hale applied it is then the agent's to say."""
        whole: Dict[str, JSON] = {self.key: patch}
        try:
            if isinstance(self.agent, SyncAgent):
                version = self.agent.checkpoint(whole)
            else:
                version = _runtime.block(self.agent.checkpoint(whole))
        except BaseException:
            self._mirror.version = None
            raise
        self._mirror.tree = merge_patch(self._mirror.tree, patch)
        self._mirror.version = version

    def _dump(self, value: Any) -> List[str]:
        kind, data = self.serde.dumps_typed(value)
        return [kind, base64.b64encode(data).decode("ascii")]

    def _load(self, stored: Sequence[str]) -> Any:
        return self.serde.loads_typed((stored[0], base64.b64decode(stored[1])))

    # ---- reading ---------------------------------------------------------------------

    def get_tuple(self, config: RunnableConfig) -> Optional[CheckpointTuple]:
        """The checkpoint ``config`` names (``thread_id``, ``checkpoint_ns``,
        ``checkpoint_id``), or the thread's newest in that namespace if it names none;
        None if there is none (or it was pruned). Its pending writes are in LangGraph's
        order (task path, task id, index)."""
        configurable = config["configurable"]
        thread_id = configurable["thread_id"]
        namespace = str(configurable.get("checkpoint_ns", ""))
        with self._mirror.lock:
            tree = self._current()
        space = _object(_object(tree.get(str(thread_id))).get(namespace))
        checkpoints = _object(space.get("checkpoints"))
        checkpoint_id = get_checkpoint_id(config)
        if not checkpoint_id:
            if not checkpoints:
                return None
            checkpoint_id = max(checkpoints)
        entry = checkpoints.get(checkpoint_id)
        if not isinstance(entry, dict):
            return None
        return self._tuple(thread_id, namespace, checkpoint_id, entry, space, None)

    def list(
        self,
        config: Optional[RunnableConfig],
        *,
        filter: Optional[Dict[str, Any]] = None,
        before: Optional[RunnableConfig] = None,
        limit: Optional[int] = None,
    ) -> Iterator[CheckpointTuple]:
        """The checkpoints of ``config``'s thread (every thread if ``config`` is None),
        newest first within each namespace: only ``config``'s namespace and checkpoint if
        it names them, only those older than ``before``'s, only those whose metadata has
        every member of ``filter``, at most ``limit`` of them."""
        with self._mirror.lock:
            tree = self._current()
        configurable = config["configurable"] if config is not None else {}
        if config is not None:
            threads = [str(configurable["thread_id"])]
        else:
            threads = sorted(tree)
        wanted_namespace = configurable.get("checkpoint_ns")
        wanted_id = get_checkpoint_id(config) if config is not None else None
        before_id = get_checkpoint_id(before) if before is not None else None
        left = limit
        for thread in threads:
            spaces = _object(tree.get(thread))
            for namespace in sorted(spaces):
                if wanted_namespace is not None and namespace != str(wanted_namespace):
                    continue
                space = _object(spaces[namespace])
                checkpoints = _object(space.get("checkpoints"))
                for checkpoint_id in sorted(checkpoints, reverse=True):
                    if wanted_id and checkpoint_id != wanted_id:
                        continue
                    if before_id and checkpoint_id >= before_id:
                        continue
                    entry = checkpoints[checkpoint_id]
                    metadata = self._load(entry["metadata"])
                    if filter and not all(metadata.get(name) == value for name, value in filter.items()):
                        continue
                    if left is not None:
                        if left <= 0:
                            return
                        left -= 1
                    yield self._tuple(thread, namespace, checkpoint_id, entry, space, metadata)

    def _tuple(
        self,
        thread_id: Any,
        namespace: str,
        checkpoint_id: str,
        entry: _Tree,
        space: _Tree,
        metadata: Optional[CheckpointMetadata],
    ) -> CheckpointTuple:
        skeleton = self._load(entry["checkpoint"])
        blobs = _object(space.get("blobs"))
        values: Dict[str, Any] = {}
        for channel, version in skeleton.get("channel_versions", {}).items():
            stored = _object(blobs.get(channel)).get(str(version))
            if stored is not None and stored[0] != "empty":
                values[channel] = self._load(stored)
        checkpoint = cast(Checkpoint, {**skeleton, "channel_values": values})
        writes = sorted(
            _object(_object(space.get("writes")).get(checkpoint_id)).values(),
            key=lambda write: (write.get("path", ""), write["task"], write["idx"]),
        )
        pending: List[PendingWrite] = [(write["task"], write["channel"], self._load(write["value"])) for write in writes]
        parent = entry.get("parent")
        return CheckpointTuple(
            config=_config(thread_id, namespace, checkpoint_id),
            checkpoint=checkpoint,
            metadata=metadata if metadata is not None else self._load(entry["metadata"]),
            parent_config=_config(thread_id, namespace, parent) if parent else None,
            pending_writes=pending,
        )

    # ---- writing ---------------------------------------------------------------------

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Stores ``checkpoint`` (its parent is ``config``'s ``checkpoint_id``) with its
        metadata and the values of the channels in ``new_versions``, and deletes the
        checkpoints past the newest ``keep`` of its thread and namespace with their
        writes and the values no kept checkpoint uses: one checkpoint of the agent's
        state, durable when this returns. Storing the same checkpoint again replaces it.
        Returns the config that names it."""
        configurable = config["configurable"]
        thread_id = configurable["thread_id"]
        namespace = str(configurable.get("checkpoint_ns", ""))
        parent = configurable.get("checkpoint_id")
        values = checkpoint["channel_values"]
        skeleton = {name: value for name, value in checkpoint.items() if name != "channel_values"}
        entry: _Tree = {
            "checkpoint": self._dump(skeleton),
            "metadata": self._dump(get_checkpoint_metadata(config, metadata)),
            "versions": {channel: str(version) for channel, version in checkpoint["channel_versions"].items()},
        }
        if parent:
            entry["parent"] = str(parent)
        blobs = {
            channel: {str(version): self._dump(values[channel]) if channel in values else ["empty", ""]}
            for channel, version in new_versions.items()
        }
        thread = str(thread_id)
        with self._mirror.lock:
            space = _object(_object(self._current().get(thread)).get(namespace))
            patch = _plan(space, keep=self.keep, add=(checkpoint["id"], entry, blobs))
            self._write({thread: {namespace: patch}})
        return _config(thread_id, namespace, checkpoint["id"])

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[Tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Stores the writes a task made against the checkpoint ``config`` names: one
        checkpoint of the agent's state, durable when this returns. A write already
        stored for the same task and index is kept as it was (a task's writes are stored
        once); the special ones (an error, an interrupt...) replace theirs."""
        configurable = config["configurable"]
        thread = str(configurable["thread_id"])
        namespace = str(configurable.get("checkpoint_ns", ""))
        checkpoint_id = str(configurable["checkpoint_id"])
        made: Dict[str, Tuple[int, _Tree]] = {}
        for index, (channel, value) in enumerate(writes):
            idx = WRITES_IDX_MAP.get(channel, index)
            made[f"{task_id}/{idx}"] = (
                idx,
                {"task": task_id, "idx": idx, "channel": channel, "value": self._dump(value), "path": task_path},
            )
        with self._mirror.lock:
            space = _object(_object(self._current().get(thread)).get(namespace))
            stored = _object(_object(space.get("writes")).get(checkpoint_id))
            patch = {name: write for name, (idx, write) in made.items() if idx < 0 or name not in stored}
            if patch:
                self._write({thread: {namespace: {"writes": {checkpoint_id: patch}}}})

    def delete_thread(self, thread_id: str) -> None:
        """Deletes every checkpoint and write of the thread, in all its namespaces."""
        thread = str(thread_id)
        with self._mirror.lock:
            if thread in self._current():
                self._write({thread: None})

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Deletes the checkpoints (of any thread) whose metadata names one of
        ``run_ids`` as its ``run_id``, with their writes and the values only they used:
        one checkpoint of the agent's state."""
        runs = set(run_ids)
        if not runs:
            return
        with self._mirror.lock:
            tree = self._current()
            patch: _Tree = {}
            for thread, spaces in tree.items():
                for namespace, space in _object(spaces).items():
                    checkpoints = _object(_object(space).get("checkpoints"))
                    drop = {
                        checkpoint_id
                        for checkpoint_id, entry in checkpoints.items()
                        if self._load(entry["metadata"]).get("run_id") in runs
                    }
                    if drop:
                        patch.setdefault(thread, {})[namespace] = _plan(_object(space), drop=drop)
            if patch:
                self._write(patch)

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Copies every checkpoint and write of one thread to another, in one
        checkpoint of the agent's state: the whole thread travels in one patch, which
        hale refuses past ``patch_bytes_max`` (256 KiB by default). A source with
        nothing stored copies nothing."""
        source, target = str(source_thread_id), str(target_thread_id)
        with self._mirror.lock:
            stored = self._current().get(source)
            if isinstance(stored, dict) and stored:
                self._write({target: stored})

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """``"keep_latest"``: keeps only the newest checkpoint of each namespace of the
        threads (with its writes); ``"delete"``: deletes the threads. One checkpoint of
        the agent's state."""
        if strategy not in ("keep_latest", "delete"):
            raise ValueError(f'strategy is "keep_latest" or "delete": {strategy!r}')
        with self._mirror.lock:
            tree = self._current()
            patch: _Tree = {}
            for thread in {str(thread_id) for thread_id in thread_ids}:
                spaces = tree.get(thread)
                if not isinstance(spaces, dict):
                    continue
                if strategy == "delete":
                    patch[thread] = None
                    continue
                for namespace, space in spaces.items():
                    planned = _plan(_object(space), keep=1)
                    if planned != {}:
                        patch.setdefault(thread, {})[namespace] = planned
            if patch:
                self._write(patch)

    def get_next_version(self, current: Optional[str], channel: None) -> str:
        """The version after ``current``: an increasing number and a random part, so two
        branches of one thread (a fork, an update of an old checkpoint) do not share a
        version with different values (the scheme of LangGraph's own savers)."""
        if current is None:
            number = 0
        elif isinstance(current, int):
            number = current
        else:
            number = int(str(current).split(".")[0])
        return f"{number + 1:032}.{random.random():016}"

    # ---- asyncio ---------------------------------------------------------------------

    async def aget_tuple(self, config: RunnableConfig) -> Optional[CheckpointTuple]:
        """:meth:`get_tuple` in a worker thread."""
        return await asyncio.to_thread(self.get_tuple, config)

    async def alist(
        self,
        config: Optional[RunnableConfig],
        *,
        filter: Optional[Dict[str, Any]] = None,
        before: Optional[RunnableConfig] = None,
        limit: Optional[int] = None,
    ) -> AsyncIterator[CheckpointTuple]:
        """:meth:`list`, read in a worker thread."""

        def read() -> List[CheckpointTuple]:
            return [*self.list(config, filter=filter, before=before, limit=limit)]

        for found in await asyncio.to_thread(read):
            yield found

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """:meth:`put` in a worker thread: durable when it returns. Cancelling the caller
        does not stop a write under way; it completes or fails as a whole."""
        return await asyncio.to_thread(self.put, config, checkpoint, metadata, new_versions)

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[Tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """:meth:`put_writes` in a worker thread: durable when it returns."""
        await asyncio.to_thread(self.put_writes, config, writes, task_id, task_path)

    async def adelete_thread(self, thread_id: str) -> None:
        """:meth:`delete_thread` in a worker thread."""
        await asyncio.to_thread(self.delete_thread, thread_id)

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        """:meth:`delete_for_runs` in a worker thread."""
        await asyncio.to_thread(self.delete_for_runs, run_ids)

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """:meth:`copy_thread` in a worker thread."""
        await asyncio.to_thread(self.copy_thread, source_thread_id, target_thread_id)

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """:meth:`prune` in a worker thread."""
        await asyncio.to_thread(self.prune, thread_ids, strategy=strategy)


class _Mirror:
    """What the saver knows of ``state[key]``: ``tree`` as of the agent's ``version``
    (None: read it from the agent), and the lock its writes take. ``tree`` is replaced,
    never changed in place, so a reader may go on using the one it took."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tree: _Tree = {}
        self.version: Optional[int] = None


def _object(value: Any) -> _Tree:
    return value if isinstance(value, dict) else {}


def _config(thread_id: Any, namespace: str, checkpoint_id: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": namespace, "checkpoint_id": checkpoint_id}}


def _plan(
    space: _Tree,
    *,
    keep: Optional[int] = None,
    add: Optional[Tuple[str, _Tree, _Tree]] = None,
    drop: AbstractSet[str] = frozenset(),
) -> Any:
    """The merge patch of one thread's namespace ``space`` that adds the checkpoint
    ``add`` (id, entry, the blobs of its new versions), deletes the checkpoints in ``drop``
    and those past the newest ``keep``, the writes of what it deleted, and the blobs no
    kept checkpoint uses. None deletes the namespace (nothing is left in it)."""
    checkpoints: _Tree = dict(_object(space.get("checkpoints")))
    patch_checkpoints: _Tree = {}
    added_blobs: _Tree = {}
    if add is not None:
        added_id, entry, added_blobs = add
        checkpoints[added_id] = entry
        patch_checkpoints[added_id] = entry
    deleted = set(drop) & set(checkpoints)
    ids = sorted(checkpoint_id for checkpoint_id in checkpoints if checkpoint_id not in deleted)
    if keep is not None and len(ids) > keep:
        deleted |= set(ids[:-keep])
        ids = ids[-keep:]
    for checkpoint_id in deleted:
        checkpoints.pop(checkpoint_id)
        patch_checkpoints[checkpoint_id] = None

    # Writes go with their checkpoint, and so do those older than every kept one (left by
    # a checkpoint pruned before). Writes for a newer id that is not stored yet stay: a
    # task's writes may be saved before the put of the checkpoint they belong to.
    oldest = ids[0] if ids else None
    stored_writes = _object(space.get("writes"))
    patch_writes: _Tree = {}
    for checkpoint_id in stored_writes:
        if checkpoint_id in deleted or (checkpoint_id not in checkpoints and (oldest is None or checkpoint_id < oldest)):
            patch_writes[checkpoint_id] = None

    # A channel's value is kept while a kept checkpoint has its version.
    used: Set[Tuple[str, str]] = set()
    for kept in checkpoints.values():
        used.update((channel, str(version)) for channel, version in _object(kept.get("versions")).items())
    stored_blobs = _object(space.get("blobs"))
    patch_blobs: _Tree = {}
    for channel in set(stored_blobs) | set(added_blobs):
        before = _object(stored_blobs.get(channel))
        after = {**before, **_object(added_blobs.get(channel))}
        left = {version for version in after if (channel, version) in used}
        if not left:
            if before:
                patch_blobs[channel] = None
            continue
        change: _Tree = {version: None for version in before if version not in left}
        change.update({version: value for version, value in _object(added_blobs.get(channel)).items() if version in left})
        if change:
            patch_blobs[channel] = change

    if not checkpoints and len(patch_writes) == len(stored_writes):
        return None if space else {}
    patch: _Tree = {}
    if patch_checkpoints:
        patch["checkpoints"] = patch_checkpoints
    if patch_writes:
        patch["writes"] = patch_writes
    if patch_blobs:
        patch["blobs"] = patch_blobs
    return patch
