"""Steps: a sequence of calls to servers written once, run by a blocking or an asyncio driver.

A step is a generator: its CPU work runs inside it, and each call to a server is *yielded*
as an :class:`Io` for the driver to run, which sends the result back. :func:`run_step`
runs the calls on this thread; :func:`arun_step` awaits their asyncio variants. The label
join (:meth:`models.join.LabelJoiner.join_step`) is one: the learner process runs it
blocking, role ``all``'s embedded learner awaits it on its event loop (issue #12: no sync
Redis in an executor thread per label batch).

>>> def step():
...     a = yield Io(lambda: 2, "two", acall=lambda client: _value(client + 2))
...     return a * 10
>>> async def _value(v):
...     return v
>>> run_step(step())
20
>>> import asyncio
>>> asyncio.run(arun_step(step(), 5))
70
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Io:
    """A call to a server that a step needs; the driver runs it and sends back its result.

    ``what`` names it in logs (``learner: label join failed ...``). ``acall``, when given,
    is the same call on an asyncio client (``acall(client)`` returns an awaitable of the
    same result): a driver with such a client awaits it instead of running ``call`` on a
    thread.
    """

    call: Callable[[], Any]
    what: str
    acall: Callable[[Any], Awaitable[Any]] | None = None


#: A step: yields :class:`Io` calls (and None: "others may run now"), returns ``T``.
Step = Generator["Io | None", Any, T]


def _at_once(op: Io) -> Any:
    return op.call()


def run_step(step: Step[T], call: Callable[[Io], Any] = _at_once) -> T:
    """Drive a step on this thread: ``call`` runs each :class:`Io` and returns its result
    (default: at once, an error propagates; the learner process retries it)."""
    result: Any = None
    while True:
        try:
            op = step.send(result)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        result = None if op is None else call(op)


async def arun_step(step: Step[T], client: Any) -> T:
    """Drive a step on the running event loop: each :class:`Io`'s ``acall(client)`` is
    awaited (an error propagates: the caller retries the whole step, as the blocking driver's
    caller does). Every call of the step must have an ``acall``."""
    result: Any = None
    while True:
        try:
            op = step.send(result)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        if op is None:
            result = None
            continue
        if op.acall is None:
            raise TypeError(f"{op.what!r} has no asyncio variant; drive this step with run_step")
        result = await op.acall(client)
