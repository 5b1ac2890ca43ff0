"""``LiveLines`` (SPEC 13.1.2) fed detail documents as ``mantle run`` polls them: which lines
come out at each look, in which order."""

from __future__ import annotations

from mantle.cli.progress import LiveLines


def step(name: str, status: str, completed: str | None, **extra) -> dict:
    return {"name": name, "status": status, "completed_at": completed, **extra}


def detail(status: str, steps: list[dict], hooks: list[dict] | None = None) -> dict:
    return {"status": status, "steps": steps, "hooks": hooks or []}


T1, T2, T3, T4 = (f"2026-03-18T09:00:0{n}.000Z" for n in (1, 2, 3, 4))


def test_steps_come_out_once_each_in_the_order_they_finished():
    live = LiveLines()
    assert live.new_lines(detail("running", [step("a", "running", None),
                                             step("b", "pending", None)])) == []
    assert live.new_lines(detail("running", [step("b", "completed", T2),
                                             step("a", "skipped", T1)])) == \
        ["  a: skipped", "  b: completed"]
    assert live.new_lines(detail("completed", [step("b", "completed", T2),
                                               step("a", "skipped", T1)]), last=True) == []


def test_a_step_between_attempts_is_not_printed_until_its_last_attempt_ends():
    live = LiveLines()
    # The API shows the latest attempt: running again after a failed one.
    assert live.new_lines(detail("running", [step("flaky", "running", None, attempt=2)])) == []
    assert live.new_lines(detail("running", [step("flaky", "failed", T2, attempt=2)])) == \
        ["  flaky: failed"]


def test_never_started_steps_and_unsettled_ones_wait_for_the_last_look():
    live = LiveLines()
    cancelled = detail("cancelled", [step("nap", "running", None),
                                     step("after", "cancelled", None)])
    assert live.new_lines(cancelled) == []  # final, but nap's row has not settled yet
    settled = detail("cancelled", [step("nap", "cancelled", T3),
                                   step("after", "cancelled", None)])
    assert live.new_lines(settled, last=True) == ["  nap: cancelled", "  after: cancelled"]


def test_hooks_follow_every_main_step_then_come_in_their_own_finishing_order():
    live = LiveLines()
    main = [step("bad", "failed", T1), step("next", "cancelled", None)]
    assert live.new_lines(detail("running", main)) == ["  bad: failed"]
    hooks = [step("alert", "running", None, block="on_failure")]
    assert live.new_lines(detail("running", main, hooks)) == ["  next: cancelled"]
    hooks = [step("alert", "completed", T2, block="on_failure"),
             step("tidy", "failed", T4, block="on_finish")]
    assert live.new_lines(detail("running", main, hooks)) == \
        ["  alert (hook): completed", "  tidy (hook): failed"]
    assert live.new_lines(detail("failed", main, hooks), last=True) == []
