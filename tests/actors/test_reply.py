"""``Reply``: the one-shot answer Engine.run and Engine.cancel wait on."""

from __future__ import annotations

import threading

import pykka
import pytest

from actors.context import Reply


def test_a_reply_set_from_another_thread_wakes_its_waiter_with_the_value():
    reply = Reply()
    threading.Timer(0.01, reply.set, args=("running",)).start()
    assert reply.get(timeout=5) == "running"
    assert reply.get(timeout=0) == "running"  # answered once, readable again


def test_a_reply_raises_the_exception_it_was_answered_with():
    reply = Reply()
    error = KeyError("x")
    reply.set_exception((type(error), error, None))
    with pytest.raises(KeyError):
        reply.get(timeout=1)


def test_an_unanswered_reply_times_out_as_pykka_does():
    with pytest.raises(pykka.Timeout):
        Reply().get(timeout=0.01)


def test_only_the_first_answer_counts():
    reply = Reply()
    reply.set("first")
    reply.set_exception((RuntimeError, RuntimeError("late"), None))
    reply.set("second")
    assert reply.get(timeout=1) == "first"


def test_a_caller_that_abandons_its_reply_before_the_answer_is_told_the_answer_was_not_taken():
    """Engine.run gives up after its timeout: the run's answer coming later is not taken
    (``set`` is False), which tells submit_run that the caller was answered 503."""
    reply = Reply()
    with pytest.raises(pykka.Timeout):
        reply.get(timeout=0.01)
    assert reply.abandon() is True
    assert reply.set("late") is False
    assert reply.set_exception((RuntimeError, RuntimeError("later"), None)) is False


def test_an_answer_that_came_first_is_returned_to_a_caller_that_abandons_too_late():
    reply = Reply()
    assert reply.set("running") is True
    assert reply.abandon() is False
    assert reply.get(timeout=0) == "running"


def test_exactly_one_of_an_answer_and_an_abandon_racing_each_other_wins():
    for _ in range(200):
        reply = Reply()
        taken = []
        answer = threading.Thread(target=lambda: taken.append(("set", reply.set(1))))
        answer.start()
        taken.append(("abandon", reply.abandon()))
        answer.join()
        assert sorted(won for _, won in taken) == [False, True], taken
