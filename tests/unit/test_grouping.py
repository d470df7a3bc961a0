"""Calls grouped on the caller's side (pipelines/grouping.py): each caller gets its own answer, at once when
there is room, together with others when there is not."""

import asyncio
import contextvars

import pytest

from pipelines.grouping import Grouped


class Model:
    """Answers ``2 * item``; an item of 13 is refused; ``fail_next`` makes the next whole call fail."""

    def __init__(self, seconds: float = 0.02):
        self.seconds = seconds
        self.groups: list[list[int]] = []
        self.fail_next = False

    async def send(self, items: list[int]) -> list:
        self.groups.append(list(items))
        await asyncio.sleep(self.seconds)
        if self.fail_next:
            self.fail_next = False
            raise ConnectionError("the replica stopped")
        return [ValueError(f"item {i} refused") if i == 13 else 2 * i for i in items]


def run(coroutine):
    return asyncio.run(coroutine)


def test_a_lone_call_goes_out_at_once_and_alone():
    model = Model()

    async def main():
        grouped = Grouped(model.send, max_group_size=8, max_groups_in_flight=2)
        return [await grouped(i) for i in range(3)]

    assert run(main()) == [0, 2, 4]
    assert model.groups == [[0], [1], [2]]


def test_calls_beyond_the_groups_in_flight_go_together_and_each_gets_its_own_answer():
    model = Model()

    async def main():
        grouped = Grouped(model.send, max_group_size=8, max_groups_in_flight=2)
        return await asyncio.gather(*(grouped(i) for i in range(20)), return_exceptions=True)

    answers = run(main())
    assert [a for i, a in enumerate(answers) if i != 13] == [2 * i for i in range(20) if i != 13]
    assert isinstance(answers[13], ValueError) and "13" in str(answers[13])  # its own caller only
    assert [len(g) for g in model.groups] == [1, 1, 8, 8, 2]  # two go at once; the rest wait, at most 8 a call
    assert sorted(i for g in model.groups for i in g) == list(range(20))  # each sent once


def test_a_failed_call_fails_its_own_callers_only_and_the_next_calls_are_served():
    model = Model()

    async def main():
        grouped = Grouped(model.send, max_group_size=4, max_groups_in_flight=1)
        model.fail_next = True
        first = await asyncio.gather(*(grouped(i) for i in range(3)), return_exceptions=True)
        return first, await grouped(5)

    first, after = run(main())
    assert isinstance(first[0], ConnectionError)  # the call that failed went out alone
    assert first[1:] == [2, 4]  # the next group went out after it, and was served
    assert after == 10


def test_a_caller_that_gives_up_while_waiting_is_left_out_of_its_group():
    model = Model(seconds=0.05)

    async def main():
        grouped = Grouped(model.send, max_group_size=8, max_groups_in_flight=1)
        first = asyncio.ensure_future(grouped(1))
        await asyncio.sleep(0)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(grouped(2), timeout=0.01)  # waits behind the first group, then gives up
        return await first, await grouped(3)

    assert run(main()) == (2, 6)
    assert model.groups == [[1], [3]]


def test_a_smaller_group_size_applies_to_the_next_groups():
    model = Model()

    async def main():
        grouped = Grouped(model.send, max_group_size=8, max_groups_in_flight=1)
        grouped.configure(max_group_size=2, max_groups_in_flight=1)
        return await asyncio.gather(*(grouped(i) for i in range(5)))

    assert run(main()) == [0, 2, 4, 6, 8]
    assert [len(g) for g in model.groups] == [1, 2, 2]


def test_an_answer_of_the_wrong_length_is_an_error_for_every_caller_of_the_call():
    async def short(items):
        return items[:-1]

    async def main():
        grouped = Grouped(short, max_group_size=8, max_groups_in_flight=1)
        return await asyncio.gather(grouped(1), grouped(2), grouped(3), return_exceptions=True)

    first, *grouped_pair = run(main())
    assert isinstance(first, RuntimeError) and all(isinstance(a, RuntimeError) for a in grouped_pair)


def test_a_group_call_belongs_to_none_of_its_callers_requests():
    """Serve ties a handle call to the request whose context made it, and cancels it with that request: a group
    made in one caller's context would fail every other caller in it when that one's client went away."""
    request = contextvars.ContextVar("request", default=None)
    seen = []

    async def send(items):
        seen.append(request.get())
        await asyncio.sleep(0.01)
        return items

    async def main():
        grouped = Grouped(send, max_group_size=8, max_groups_in_flight=1)

        async def caller(i):
            request.set(f"request {i}")
            return await grouped(i)

        return await asyncio.gather(*(caller(i) for i in range(5)))

    assert run(main()) == [0, 1, 2, 3, 4]
    assert seen == [None, None]  # two groups (one alone, then the other four), neither in a caller's context


def test_a_group_size_of_one_turns_grouping_off():
    """Each call is then made at once, in its caller's context, however many are in flight."""
    request = contextvars.ContextVar("request", default=None)
    seen = []

    async def send(items):
        seen.append(request.get())
        await asyncio.sleep(0.01)
        return [2 * i for i in items]

    async def main():
        grouped = Grouped(send, max_group_size=1, max_groups_in_flight=1)

        async def caller(i):
            request.set(i)
            return await grouped(i)

        return await asyncio.gather(*(caller(i) for i in range(4)))

    assert run(main()) == [0, 2, 4, 6]
    assert seen == [0, 1, 2, 3]
