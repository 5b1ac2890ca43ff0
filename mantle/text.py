"""Text that cannot leave the process as UTF-8."""

from __future__ import annotations

import re

__all__ = ["LONE_SURROGATE"]

# A lone UTF-16 surrogate: no UTF-8 stream, database column, JSON document or HTTP body can
# carry one. Python text holds one after a JSON, YAML or CEL escape such as ``\ud800``, or
# bytes that are not UTF-8 decoded with ``surrogateescape`` (an environment variable).
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
