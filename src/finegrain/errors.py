"""Errors a user can act on: the CLI prints their message on one line, never a traceback."""


class FinegrainError(Exception):
    """A problem with the user's input or environment; the message says what to do."""
