"""Atomic file output: write to a temporary file next to the target, then rename.

Every file hpseg writes (checkpoints, results, figures, label maps, reports, exports) goes
through :func:`atomic_write` or one of its wrappers, so a crash never leaves a half-written file
where a good one was, and every file gets the permissions an ordinary ``open()`` would give it
(``0o666`` minus the process umask: ``0644`` under the usual umask ``022``). ``mkstemp`` alone
would create ``0600`` files that a colleague or a web server cannot read.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

from hpseg.errors import HPSegError

__all__ = [
    "atomic_path",
    "atomic_torch_save",
    "atomic_write",
    "atomic_write_text",
    "default_file_mode",
    "file_sha256",
    "finite",
    "safe_torch_load",
    "write_error",
]

_UMASK_LOCK = threading.Lock()


def default_file_mode() -> int:
    """The mode ``open()`` gives a new file: ``0o666`` minus the current umask."""
    with _UMASK_LOCK:  # reading the umask means setting it; keep other threads out meanwhile
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


#: OS errors of a write that the user fixes (space, quota, permissions), by their fix
_WRITE_FIXES = {
    errno.ENOSPC: "free space on that disk or write elsewhere",
    errno.EDQUOT: "free space within your quota or write elsewhere",
    errno.EFBIG: "write elsewhere (the file system refuses files this large)",
    errno.EACCES: "make the folder writable or write elsewhere",
    errno.EPERM: "make the folder writable or write elsewhere",
    errno.EROFS: "write elsewhere (the file system is read-only)",
}


def write_error(path: str | os.PathLike[str], exc: BaseException) -> HPSegError | None:
    """The one-line error of a write of ``path`` that failed with ``exc``, or None when no OS
    error of a full disk, a quota or missing permissions is among its causes.

    The OS error may be wrapped: ``torch.save`` raises ``RuntimeError: … unexpected pos …``
    with the ``OSError`` as its context. The message names the path, the OS error and the fix,
    and says that the files already there are unchanged (every write is atomic).
    """
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in _WRITE_FIXES:
            return HPSegError(f"cannot write {Path(path)}: {cause.strerror or os.strerror(cause.errno)}: "
                              f"{_WRITE_FIXES[cause.errno]} (the files already there are unchanged)")
        cause = cause.__cause__ or cause.__context__
    return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (ONNX, savefig, …).

    On success the temporary file gets the umask's permissions and is renamed over ``path``;
    on any exception it is removed and an existing ``path`` is left untouched.

    Raises:
        HPSegError: the write failed for a full disk, a quota or missing permissions
            (:func:`write_error`: one line naming ``path`` and the OS error).
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        error = write_error(target, exc)
        if error is None:
            raise
        raise error from exc
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        error = None if isinstance(exc, HPSegError) else write_error(target, exc)
        if error is not None:
            raise error from exc
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; rename it over ``path`` only on success.

    A crash or exception while writing leaves any existing ``path`` untouched.
    """
    with atomic_path(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else "utf-8") as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    with atomic_write(path, "wb") as fh:
        torch.save(obj, fh)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) atomically."""
    with atomic_write(path, "w") as fh:
        fh.write(text)


def file_sha256(path: str | os.PathLike[str], length: int = 16) -> str:
    """First ``length`` hex digits of the file's SHA-256 (identifies a checkpoint)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, recursively: JSON that any
    reader accepts (``NaN`` is not JSON), e.g. a precision without any labelled pair."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def _file_kind(path: Path) -> str | None:
    """What a file that ``torch.load`` cannot read looks like: an export, empty, or None."""
    size = path.stat().st_size
    if size == 0:
        return "an empty file (0 bytes; a save that never finished?)"
    with path.open("rb") as fh:
        head = fh.read(64)
    # ONNX: a protobuf ModelProto, ir_version (field 1) first, then the producer's name
    if path.suffix.lower() == ".onnx" or (head[:1] == b"\x08" and (b"pytorch" in head or b"onnx" in head.lower())):
        return "an ONNX export (hpseg export), not a checkpoint: run it with onnxruntime"
    import zipfile

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "a TorchScript export (hpseg export --format torchscript), not a checkpoint: run it with torch.jit.load"
    return None


def safe_torch_load(path: str | os.PathLike[str], *, expected: str, fix: str, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` whose failures are one line naming the file.

    The error never repeats PyTorch's advice to retry with ``weights_only=False``: for a damaged
    or foreign file that advice is wrong, and for an untrusted one it is unsafe. TorchScript and
    ONNX exports, empty and truncated files are recognised and said as such.

    Args:
        path: the file. expected: what it should be (``"an hpseg checkpoint"``).
        fix: what the user can do, appended to the message (``"give the run folder or its best.pt"``).
        map_location: as for ``torch.load``.

    Raises:
        HPSegError: ``"cannot read <path>: <what it is>; expected <expected>: <fix>"``.
    """
    path = Path(path)
    if not path.is_file():
        raise HPSegError(f"{path} does not exist (expected {expected}): {fix}")
    kind = _file_kind(path)  # before torch.load, which warns about TorchScript archives
    if kind is None:
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # torch raises many types (UnpicklingError, RuntimeError, EOFError, …)
            import zipfile

            text = str(exc)
            if not zipfile.is_zipfile(path):
                kind = "not a PyTorch file (damaged, truncated, or another kind of file)"
            elif "weights_only" in text or "Weights only load failed" in text:
                kind = "it holds Python objects that safe loading (weights_only=True) refuses to run"
            else:
                kind = "not a complete PyTorch file (truncated or damaged)"
    raise HPSegError(f"cannot read {path}: {kind}; expected {expected}: {fix}")
