"""Batching on the caller's side: concurrent requests' calls of one model method, sent as one handle call.

A handle call has a fixed CPU cost on both sides: the ingress routes it, serialises its arguments and starts
a Ray task; the model replica receives it and runs a task on its loop. On a small CPU node that cost is of the
order of a small model's own compute (docs/BENCHMARKS.md). Under load an ingress replica holds many requests
for the same model at once, so ``Grouped`` sends them together, as one handle call
(``ModelDeployment.call_group``), whose replica hands each item to its own batching as a separate call would,
and answers each item with its result or its error.

It is the ``@serve.batch`` pattern on the caller's side, with no timer: a call goes out at once while fewer
than ``max_groups_in_flight`` groups are in flight, so a lone request pays no latency; the calls that arrive
while they are all in flight wait for the first to end, and go together, up to ``max_group_size`` at a time.
(``serve.batch`` itself works only inside a replica, and the batch job's driver uses the dataplane too.)
"""

import asyncio
import contextvars
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

DEFAULT_GROUP_SIZE = 8
"""The default most calls in one group (the ingress's user_config sets it; 1 is off: each call the caller's own)."""
DEFAULT_GROUPS_IN_FLIGHT = 2
"""The default number of groups of one method in flight before calls wait to go together."""

Item = TypeVar("Item")
Result = TypeVar("Result")


class Grouped(Generic[Item, Result]):
    """``await grouped(item)``: ``send(items)`` answers a list of results or exceptions, one per item, in order;
    an exception is raised to its own caller only. A caller cancelled while it waits is left out of its group."""

    def __init__(
        self,
        send: Callable[[list[Item]], Awaitable[list[Result | BaseException]]],
        max_group_size: int = DEFAULT_GROUP_SIZE,
        max_groups_in_flight: int = DEFAULT_GROUPS_IN_FLIGHT,
    ):
        self._send = send
        self.max_group_size = max_group_size
        self.max_groups_in_flight = max_groups_in_flight
        self._waiting: deque[tuple[Item, asyncio.Future]] = deque()
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()

    def configure(self, max_group_size: int, max_groups_in_flight: int) -> None:
        """Applies from the next group on."""
        self.max_group_size, self.max_groups_in_flight = max_group_size, max_groups_in_flight
        self._dispatch()

    async def __call__(self, item: Item) -> Result:
        if self.max_group_size == 1:  # grouping off: the call is the caller's own, made at once
            (answer,) = await self._send([item])
            if isinstance(answer, BaseException):
                raise answer
            return answer
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        self._dispatch()
        return await future

    def _dispatch(self) -> None:
        while self._waiting and self._in_flight < self.max_groups_in_flight:
            group = []
            while self._waiting and len(group) < self.max_group_size:
                item, future = self._waiting.popleft()
                if not future.done():  # not cancelled meanwhile
                    group.append((item, future))
            if group:
                self._in_flight += 1
                # In a context of its own: the group's call belongs to none of its callers' requests, so Serve,
                # which cancels the calls a request made when its client goes away, cannot cancel the others'.
                task = asyncio.get_running_loop().create_task(self._send_group(group), context=contextvars.Context())
                self._tasks.add(task)  # held until done: the loop keeps only weak references to tasks
                task.add_done_callback(self._tasks.discard)

    async def _send_group(self, group: list[tuple[Item, asyncio.Future]]) -> None:
        try:
            answers = await self._send([item for item, _ in group])
            if len(answers) != len(group):
                raise RuntimeError(f"a group call of {len(group)} items answered {len(answers)}")
        except asyncio.CancelledError:  # the loop is closing: so are its callers
            for _, future in group:
                future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - the whole call failed: each of its callers gets the error
            answers = [exc] * len(group)
        finally:
            self._in_flight -= 1
            self._dispatch()
        for (_, future), answer in zip(group, answers):
            if future.done():
                continue
            if isinstance(answer, BaseException):
                future.set_exception(answer)
            else:
                future.set_result(answer)
