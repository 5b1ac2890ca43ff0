"""Text from outside: characters that cannot leave the process, numbers written in it."""

from __future__ import annotations

import re

__all__ = ["LONE_SURROGATE", "whole_number"]

# A lone UTF-16 surrogate: no UTF-8 stream, database column, JSON document or HTTP body can
# carry one. Python text holds one after a JSON, YAML or CEL escape such as ``\ud800``, or
# bytes that are not UTF-8 decoded with ``surrogateescape`` (an environment variable).
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def whole_number(text: str, low: int, high: int, digits: int = 9) -> int | None:
    """``text`` read as a whole number from ``low`` to ``high``, or None when it is not one:
    1 to ``digits`` ASCII digits. ``str.isdigit()`` also takes ``²``, which ``int()``
    refuses, as it refuses more than 4300 digits (each was a ValueError traceback)."""
    if re.fullmatch(f"[0-9]{{1,{digits}}}", text) and low <= (value := int(text)) <= high:
        return value
    return None
