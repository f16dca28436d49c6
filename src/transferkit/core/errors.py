"""User-facing errors: one clear paragraph, no traceback, exit code 2 from the CLI (74 for a full disk)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A problem the user can fix (bad path, bad value, missing weights).

    The CLI prints the message alone and exits with `exit_code` (2); the library raises it so
    callers can catch it. The message names the thing at fault and says what to do.
    """

    exit_code = 2


class DiskFull(UserError):
    """A write found the disk full: what it needed, what was free, what was kept. Exit code 74 (EX_IOERR)."""

    exit_code = 74


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean 'x'?' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""
