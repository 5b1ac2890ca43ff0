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
