"""The one base class of every error a user can fix: the command line prints these as one line, exit code 2."""

from __future__ import annotations


class DynvitError(Exception):
    """An error caused by input, a recipe, a file or the machine, whose message names the problem and the fix.

    Anything else reaching the command line is a bug and is reported as one.
    """
