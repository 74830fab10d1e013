"""The one base class of every error a user can fix: the command line prints these as one line, exit code 2."""

from __future__ import annotations


class DynvitError(Exception):
    """An error caused by input, a recipe, a file or the machine, whose message names the problem and the fix.

    Anything else reaching the command line is a bug and is reported as one.
    """


def one_line(exc: BaseException) -> str:
    """An error's message on one line (multi-line messages, such as key lists, joined)."""
    if isinstance(exc, OSError) and not isinstance(exc, DynvitError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror[0].lower()}{exc.strerror[1:]}{where}"
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    return text or type(exc).__name__
