"""Duration grammar (SPEC 2.3) and the ``since`` filter form."""

import pytest

from mantle.durations import format_seconds, parse_duration, parse_since, since_filter


@pytest.mark.parametrize("text, seconds", [
    ("500ms", 0.5), ("30s", 30), ("1m30s", 90), ("1.5h", 5400), ("0", 0), ("0s", 0),
    ("-1s", -1), ("+2m", 120), ("1h2m3.5s", 3723.5), ("250us", 0.00025), ("250µs", 0.00025),
    ("10ns", 1e-8), (".5s", 0.5),
])
def test_durations_parse_to_seconds(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "s", "1d", "1 s", "abc", "1s2", "--1s", "1.2.3s"])
def test_malformed_durations_are_rejected(text):
    with pytest.raises(ValueError):
        parse_duration(text)


def test_since_accepts_days_and_positive_durations():
    assert parse_since("7d") == 7 * 86400
    assert parse_since("1h30m") == 5400
    for bad in ("0", "0d", "-1h", "d", "1.5d"):
        with pytest.raises(ValueError):
            parse_since(bad)


@pytest.mark.parametrize("text", ["1" + "0" * 400 + "d", "9" * 5000 + "d", "1" + "0" * 400 + "h"])
def test_a_since_beyond_a_float_is_forever_not_an_error(text):
    """``mantle logs/audit --since``, ``GET /api/v1/executions?since=``: a count of days
    beyond a float (or beyond Python's 4,300 digits for ``int``) reaches back beyond
    everything: it crashed the CLI with an OverflowError traceback."""
    assert parse_since(text) == float("inf")


def test_a_since_filter_reaching_back_a_millennium_filters_nothing():
    """One rule for ``mantle logs``, ``mantle audit`` and ``GET /api/v1/executions``: no row
    is that old, and ``now - since`` before year 1 cannot be computed."""
    assert since_filter(None) is None
    assert since_filter("7d") == 7 * 86400
    assert since_filter("300000d") == 300000 * 86400  # about 820 years
    assert since_filter("1000000d") is None and since_filter("9" * 5000 + "d") is None
    with pytest.raises(ValueError):
        since_filter("0d")


def test_step_durations_format_as_seconds_or_milliseconds():
    assert format_seconds(1.243) == "1.2s"
    assert format_seconds(0.015) == "15ms"
