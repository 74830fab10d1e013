"""The data error, kept one line long even when it is raised in a DataLoader worker process."""

from __future__ import annotations

import re

from dynvit.errors import DynvitError

# how torch re-raises a worker's exception: ``exc_type("Caught X in DataLoader worker process N.\nOriginal Traceback
# ...\nmodule.X: message")``; the last line carries the original message
_WORKER_MESSAGE = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback", re.ASCII)
_LAST_LINE = re.compile(r"^[\w.]+: (?P<message>.*)$")


class DataError(DynvitError, ValueError):
    """Data that cannot be used with a recipe; the message names the problem and the fix.

    Images are decoded lazily in the DataLoader workers, so a bad file raises
    there; torch re-raises it in the training process as the same type built
    from the worker's whole traceback. The constructor keeps only the
    original one-line message, so the user still reads a single line.
    """

    def __init__(self, message: str) -> None:
        super().__init__(_original_message(str(message)))


def _original_message(message: str) -> str:
    if not _WORKER_MESSAGE.match(message):
        return message
    last = message.rstrip().rsplit("\n", 1)[-1]
    found = _LAST_LINE.match(last)
    return found.group("message") if found else last
