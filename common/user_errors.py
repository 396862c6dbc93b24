"""Bad input stops a command with one clear line, not a traceback through Lightning's internals.

Our modules raise ValueError / FileNotFoundError / FileExistsError (and CheckpointError, a
ValueError) with messages that name the config key, file, column or token at fault. Entry points
run under `report_user_errors`, which prints that message and exits with status 2. Set
LMTRAIN_DEBUG=1 to get the full traceback instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class DiskFullError(OSError):
    """The disk filled up while writing; the message says where, how much is free and what was needed."""


USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, DiskFullError)


def report_user_errors(entry_point: Callable[[], T]) -> T:
    """Run ``entry_point``; on a user error print ``error: <message>`` and exit(2)."""
    try:
        return entry_point()
    except USER_ERRORS as e:
        if os.environ.get("LMTRAIN_DEBUG"):
            raise
        print(f"error: {e}\n(set LMTRAIN_DEBUG=1 for the full traceback)", file=sys.stderr)
        raise SystemExit(2) from None
