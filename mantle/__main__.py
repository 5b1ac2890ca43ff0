"""``python -m mantle`` is the ``mantle`` command."""

import sys

from mantle.cli import main

sys.exit(main())
