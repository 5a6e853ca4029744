"""Exceptions raised for problems a user can fix.

The error policy of hpseg: every problem a user can fix (a missing file, a wrong setting, an
unreadable image, weights that cannot be downloaded) is an :class:`HPSegError` whose message
names the problem *and* the fix, in one line. The CLI prints these as ``error: <message>``
without a traceback and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["HPSegError", "UnreadableFileError"]


class HPSegError(ValueError):
    """A problem with the user's input, named together with its fix."""


class UnreadableFileError(HPSegError):
    """An image or label file that is missing or cannot be decoded.

    ``path`` is the offending file, so that a caller may log and skip the item. The message
    alone also constructs it (``UnreadableFileError(message)``), which lets DataLoader workers
    re-raise it with its type in the main process.
    """

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else Path(path)

    @classmethod
    def for_file(cls, path: str | Path, reason: str, fix: str | None = None) -> UnreadableFileError:
        """The error for ``path``, with a message naming the file, the problem and the fix (by
        default what fits any folder of images: restore a missing file, replace or delete a
        damaged one)."""
        if fix is None:
            fix = ("restore it or check the path" if "not found" in reason
                   else "replace it with a readable copy, or delete it")
        return cls(f"cannot read {path} ({reason}): {fix}", path)

    def __reduce__(self) -> tuple[type[UnreadableFileError], tuple[str, Path | None]]:
        return (type(self), (str(self), self.path))
