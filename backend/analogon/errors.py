"""Errors that carry a code and a message a painter can read."""
from __future__ import annotations

from typing import Any


class AnalogonError(Exception):
    """A failure explained to the user: ``code`` is stable, ``message`` is a sentence.

    ``status`` is the HTTP status the server answers with when the error is the caller's
    (bad input: 4xx). Errors raised inside a running job are reported as ``error`` events.
    """

    status = 400

    def __init__(self, code: str, message: str, detail: Any = None, status: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail
        if status is not None:
            self.status = status

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "detail": self.detail}


class InputError(AnalogonError):
    """The images or parameters cannot be used (wrong size, empty layer, ...)."""


class ModelError(AnalogonError):
    """The model spec cannot be resolved or loaded."""

    status = 404


class JobCancelled(Exception):
    """Raised inside a job when the user cancelled it."""
