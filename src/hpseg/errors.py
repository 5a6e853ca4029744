"""Exceptions raised for problems a user can fix."""

from __future__ import annotations


class HPSegError(ValueError):
    """A problem with the user's input, named together with its fix.

    The CLI prints these as one line (``error: <message>``) without a traceback.
    """
