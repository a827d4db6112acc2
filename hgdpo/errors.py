"""The one exception type the jobs turn into a clean error message and a non-zero exit."""

from __future__ import annotations

import sys
from typing import Callable


class HgdpoError(Exception):
    """Bad input or an impossible request, with a message that names what to fix.

    Jobs print ``error: <message>`` and exit with status 2; nothing else is caught,
    so a bug still shows its traceback.
    """


class ConfigError(HgdpoError):
    """A configuration value that is unknown, of the wrong type, or impossible."""


def exit_status(work: Callable[[], object]) -> int:
    """Run ``work`` as a command does: 0 when it finishes; 2, with ``error: <message>`` on stderr, when it
    raises ``HgdpoError`` (bad input). Anything else propagates with its traceback."""
    try:
        work()
    except HgdpoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
