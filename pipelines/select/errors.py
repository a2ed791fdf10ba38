"""Errors of study and series selection."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from models.errors import ConfigurationError


class ProtocolError(ConfigurationError):
    """The protocol file is invalid or names something unknown; the message says where."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'X'?)`` for the closest choice, or ``""`` when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
