"""The one table of allowed status transitions (STYLE habit 4)."""

import pytest

from mantle.states import (EXECUTION_TRANSITIONS, STEP_TRANSITIONS, ExecutionStatus,
                           IllegalTransition, StepStatus, check_transition)


def test_final_statuses_allow_no_transition():
    for status in ExecutionStatus:
        assert status.is_final == (not EXECUTION_TRANSITIONS[status])
    for status in StepStatus:
        assert status.is_final == (not STEP_TRANSITIONS[status])


def test_refused_transition_raises():
    with pytest.raises(IllegalTransition):
        check_transition(STEP_TRANSITIONS, StepStatus.COMPLETED, StepStatus.RUNNING)
    with pytest.raises(IllegalTransition):
        check_transition(EXECUTION_TRANSITIONS, ExecutionStatus.PENDING,
                         ExecutionStatus.COMPLETED)


def test_pending_execution_can_be_cancelled_directly():
    check_transition(EXECUTION_TRANSITIONS, ExecutionStatus.PENDING, ExecutionStatus.CANCELLED)
