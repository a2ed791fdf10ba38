"""Errors of the defacing step."""

from __future__ import annotations


class DefaceError(Exception):
    """A series (or the study's reference T1) cannot be defaced; ``code`` is machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class TemplateError(Exception):
    """The defacing template (pydeface's package data) cannot be loaded."""
