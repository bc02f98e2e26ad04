"""One error type for bad external input, so every edge reports *where* the problem is."""

from __future__ import annotations


class InputError(ValueError):
    """Bad external input: a config field, a topology entry, a trace line, an HTTP body.

    `where` names the place (``file:line``, ``field.path``, ``body.prompt_tokens``) so that the
    message a user sees always points at the thing to fix.
    """

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where
        self.message = message
