"""Errors the ``baffle-edge`` command line reports as one ``error:`` line (exit code 2), without a
traceback unless ``--debug``: a mistake the user can fix, or a refusal that ends the command, with
what to do. Plain ``ValueError`` / ``FileNotFoundError`` at a boundary are reported the same way."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class CommandError(Exception):
    """The command cannot go on; the message says why and what to do."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean X?)`` for the closest of ``choices`` to ``word``, or ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""
