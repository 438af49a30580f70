"""Durable steps, written as plain functions.

A step is a piece of a task whose result must survive the attempt that made it: a model
call, a search, a write to another system. Decorate the function with :func:`step` and
call it while working on a task (``with agent.work_on(task):``)::

    @hale.step()
    def search(query: str) -> list:          # or ``async def``
        return web.search(query)

    with agent.work_on(task):
        hits = search(task.payload["query"])

The first call records the intent (durable), runs the body, and commits what it returned
(durable) before returning it. When the task is handed to another attempt (its holder
crashed, was killed, lost its node), the same call returns the committed result without
running the body again. A step the lost attempt began but never committed is
*uncertain*: its side effect may or may not have happened. By default it runs again
(at-least-once, as DBOS steps and Temporal activities do); ``uncertain="raise"`` raises
:class:`~hale.StepUncertain` instead, and ``uncertain=check`` lets ``check(run)`` ask the
other system, with the step's stable idempotency key ``run.key``, whether it happened.

What a step returns must be JSON. It can return a :class:`StepResult` to record the
model call behind it (tokens, model, sampling settings) and what would undo it; the
model call's tokens count against the task's and the agent's budgets in the same
commit. Whether it ran now or in an earlier attempt, a step returns its committed result
as JSON gives it back (a tuple comes back as a list), so the code after it sees the same
value either way.

Steps are named after the function (``search``, then ``search#2`` for the second call in
the same task, and so on), so the code that calls them must make the same calls in the
same order on a retry, as with DBOS and Temporal. Give ``name=`` to pin a name.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import json
from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable, Dict, Optional, Tuple, TypeVar, Union, cast, overload

from . import _runtime
from ._core import AgentCore
from .errors import HaleError, StepUncertain
from .types import JSON, LlmLike, Task

F = TypeVar("F", bound=Callable[..., Any])

#: Runs a step the lost attempt left uncertain again (the default).
RETRY = "retry"
#: Raises :class:`~hale.StepUncertain` for a step a lost attempt left uncertain.
RAISE = "raise"


@dataclass(frozen=True)
class StepResult:
    """What a step body may return instead of a bare value: the ``value`` to commit (and
    return), the model call behind it (its tokens count against the budgets) and the
    ``compensation`` that would undo it if the task is aborted."""

    value: JSON
    llm: LlmLike = None
    compensation: JSON = None


@dataclass
class StepRun:
    """The step being run, as :func:`current_step` gives it to the body.

    ``key`` is stable across attempts of the task (``hale-<task>-<step>``): send it to the
    other system as an idempotency key (an ``Idempotency-Key`` header, a client token,
    a correlation id), so a step run again after an uncertain attempt is applied once.
    ``uncertain`` says a lost attempt began this step. The body may set ``llm`` and
    ``compensation``; a :class:`StepResult` it returns takes precedence."""

    task: int
    name: str
    key: str
    attempt: int
    uncertain: bool
    llm: LlmLike = None
    compensation: JSON = None


#: What the body of an uncertain step with a ``check`` gets: the run; it returns a
#: :class:`StepResult` (or a bare value) if the side effect happened, ``None`` if not.
Check = Callable[[StepRun], Any]


@dataclass
class _Options:
    uncertain: Union[str, Check] = RETRY
    timeout: Optional[float] = None
    reserve_tokens: Optional[int] = None


class Work:
    """One attempt at a task, as the step functions called for it see it."""

    def __init__(self, core: AgentCore, task: Task) -> None:
        self.core = core
        self.task = task
        #: Results committed for this attempt so far, by step name (earlier attempts'
        #: come from the task itself).
        self.committed: Dict[str, JSON] = {}
        self.calls: Dict[str, int] = {}

    def name_for(self, base: str) -> str:
        """``base`` for its first call in this attempt, ``base#2`` for the second…"""
        count = self.calls.get(base, 0) + 1
        self.calls[base] = count
        return base if count == 1 else f"{base}#{count}"

    def lookup(self, name: str, options: "_Options") -> "Union[_Done, StepRun]":
        """Step ``name``'s committed result if it has one, else the run to make of it.
        Raises :class:`StepUncertain` for an uncertain step that asked for it."""
        if name in self.committed:
            return _Done(self.committed[name])
        prior = self.task.step(name)
        if prior is not None and prior.state == "done":
            return _Done(prior.result)
        uncertain = prior is not None and prior.state == "uncertain"
        run = StepRun(self.task.task, name, f"hale-{self.task.task}-{name}", self.task.attempts, uncertain)
        if uncertain and options.uncertain == RAISE:
            raise StepUncertain(run.task, name, run.key)
        return run

    async def start(self, run: StepRun, options: "_Options") -> Optional[int]:
        """Records the intent (durable), reserves tokens and declares a long call as
        asked; the reservation, if one was made. On the client's loop."""
        await self.core.intend_step(run.task, run.name)
        reservation = None
        if options.reserve_tokens:
            reservation = await self.core.reserve(options.reserve_tokens, task=run.task)
        if options.timeout is not None:
            await self.core.busy(options.timeout)
        return reservation

    async def finish(self, run: StepRun, outcome: Any, options: "_Options", reservation: Optional[int]) -> JSON:
        """Commits what the body returned (durable); the committed value as JSON gives it
        back. On the client's loop."""
        if options.timeout is not None:
            try:
                await self.core.busy(0)
            except HaleError:
                pass
        value, llm, compensation = _unpack(outcome, run)
        await self.core.commit_step(
            run.task, run.name, value, llm=llm, compensation=compensation, reservation=reservation
        )
        # JSON in, JSON out: the value returned now is the one a later attempt gets.
        committed = json.loads(json.dumps(value))
        self.committed[run.name] = committed
        return committed

    async def drive(self, name: str, body: Callable[[], Any], options: "_Options") -> JSON:
        """Runs step ``name`` from the caller's event loop: hale's side on the client's
        loop, the body (and an uncertain step's check) where the caller is."""
        found = self.lookup(name, options)
        if isinstance(found, _Done):
            return found.value
        run = found
        token = _current.set(run)
        try:
            if run.uncertain and callable(options.uncertain):
                checked = options.uncertain(run)
                if inspect.isawaitable(checked):
                    checked = await checked
                if checked is not None:
                    return await _runtime.call(self.finish(run, checked, replace(options, timeout=None), None))
            reservation = await _runtime.call(self.start(run, options))
            try:
                outcome = body()
                if inspect.isawaitable(outcome):
                    outcome = await outcome
            except BaseException:
                if options.timeout is not None:
                    await _quietly(_runtime.call(self.core.busy(0)))
                raise
        finally:
            _current.reset(token)
        return await _runtime.call(self.finish(run, outcome, options, reservation))

    def drive_blocking(self, name: str, body: Callable[[], Any], options: "_Options") -> JSON:
        """:meth:`drive` for a caller that is on no event loop: blocks; the body runs on
        the caller's thread."""
        found = self.lookup(name, options)
        if isinstance(found, _Done):
            return found.value
        run = found
        if run.uncertain and callable(options.uncertain):
            checked = _with_step(run, options.uncertain, run)
            if checked is not None:
                return _runtime.block(self.finish(run, checked, replace(options, timeout=None), None))
        reservation = _runtime.block(self.start(run, options))
        try:
            outcome = _with_step(run, body)
        except BaseException:
            if options.timeout is not None:
                with contextlib.suppress(HaleError):
                    _runtime.block(self.core.busy(0))
            raise
        return _runtime.block(self.finish(run, outcome, options, reservation))


@dataclass(frozen=True)
class _Done:
    value: JSON


def _with_step(run: StepRun, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` with ``run`` as the current step (for ``current_step()``)."""
    token = _current.set(run)
    try:
        return function(*args)
    finally:
        _current.reset(token)


async def _quietly(call: Awaitable[Any]) -> None:
    with contextlib.suppress(HaleError):
        await call


def _unpack(outcome: Any, run: StepRun) -> Tuple[JSON, LlmLike, JSON]:
    if isinstance(outcome, StepResult):
        llm = outcome.llm if outcome.llm is not None else run.llm
        compensation = outcome.compensation if outcome.compensation is not None else run.compensation
        return outcome.value, llm, compensation
    return outcome, run.llm, run.compensation


_current: "contextvars.ContextVar[Optional[StepRun]]" = contextvars.ContextVar("hale_step", default=None)
_working: "contextvars.ContextVar[Optional[Work]]" = contextvars.ContextVar("hale_work", default=None)


def current_step() -> StepRun:
    """The step whose body is running (its task, name, idempotency key, whether a lost
    attempt began it). Raises ``RuntimeError`` outside a step body."""
    run = _current.get()
    if run is None:
        raise RuntimeError("hale.current_step() is called from inside a step's body")
    return run


def current_work() -> Optional[Work]:
    """The attempt the calling code works on (set by ``agent.work_on(task)``), if any."""
    return _working.get()


@overload
def step(function: F) -> F: ...


@overload
def step(
    function: None = None,
    *,
    name: Optional[str] = None,
    uncertain: Union[str, Check] = RETRY,
    timeout: Optional[float] = None,
    reserve_tokens: Optional[int] = None,
) -> Callable[[F], F]: ...


def step(
    function: Optional[F] = None,
    *,
    name: Optional[str] = None,
    uncertain: Union[str, Check] = RETRY,
    timeout: Optional[float] = None,
    reserve_tokens: Optional[int] = None,
) -> Union[F, Callable[[F], F]]:
    """Makes ``function`` (plain or ``async``) a durable step of the task being worked on.

    Call it inside ``with agent.work_on(task):`` (or ``async with``). It returns the
    committed result of this step if an earlier attempt committed it, without running
    the body; otherwise it records the intent, runs the body, commits what it returned
    and returns that.

    * ``name``: the step's name (default: the function's; the n-th call in a task adds
      ``#n``).
    * ``uncertain``: what to do with a step a lost attempt began and did not commit:
      ``"retry"`` (default) runs it again, ``"raise"`` raises
      :class:`~hale.StepUncertain`, a function ``check(run)`` decides: it returns the
      result if the side effect happened (committed without running the body) or
      ``None`` to run the body. ``run.key`` is the idempotency key the lost attempt used.
    * ``timeout``: how long the body may take, in seconds, when that is longer than the
      stall detector allows (ten minutes by default): hale does not count the run as
      stalled until then. Heartbeats go on from the client's own thread either way.
    * ``reserve_tokens``: reserve this many tokens from the task's budget before the body
      runs (refused with :class:`~hale.OverBudget` if they would go over); the commit
      settles the reservation with the tokens the model call used.

    An exception in the body leaves the step's intent: the exception propagates, and the
    next attempt sees the step as uncertain.
    """
    options = _Options(uncertain, timeout, reserve_tokens)
    if isinstance(uncertain, str) and uncertain not in (RETRY, RAISE):
        raise ValueError(f'uncertain is "retry", "raise" or a function: {uncertain!r}')

    def decorate(body: F) -> F:
        base = name or body.__name__
        if inspect.iscoroutinefunction(body):

            @functools.wraps(body)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                work = _require_work(base)
                return await work.drive(work.name_for(base), lambda: body(*args, **kwargs), options)

            return cast(F, run_async)

        @functools.wraps(body)
        def run_plain(*args: Any, **kwargs: Any) -> Any:
            work = _require_work(base)
            if _in_event_loop():
                # Its hale calls would block the caller's loop: run hale's side as the
                # async form does, and the body here (it blocks the loop as it would
                # anyway; the heartbeats go on from the client's thread).
                raise RuntimeError(
                    f"step {base!r} is a plain function called from a running event loop: make it "
                    "`async def`, or run it with `await agent.run_step(task, name, function)`"
                )
            return work.drive_blocking(work.name_for(base), lambda: body(*args, **kwargs), options)

        return cast(F, run_plain)

    if function is not None:
        return decorate(function)
    return decorate


def _require_work(base: str) -> Work:
    work = _working.get()
    if work is None:
        raise RuntimeError(f"step {base!r} was called outside `with agent.work_on(task):`: which task is it a step of?")
    return work


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False
