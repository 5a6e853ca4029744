"""What a run does about schedulers and accidents: signals, worker processes, one run per folder.

Schedulers stop a job by signalling every process of it (SLURM's ``scancel``, a Kubernetes
pod's termination): the DataLoader worker processes as well as the main one. Here the main
process alone decides what a signal means (:func:`hpseg.checkpointing.stop_on_signals`):

* :class:`QuietWorkersLoader` is a ``DataLoader`` whose worker processes ignore SIGINT,
  SIGTERM, SIGUSR1 and SIGUSR2 (so a signal to the process group neither kills them — which
  made PyTorch raise ``DataLoader worker … is killed by signal`` inside the stop-save — nor
  makes each of them print a warning); the main process blocks those signals while it starts
  the workers, so none arrives in a worker before it has set them aside.
* :func:`close_loader` ends the workers of an iterator before the stop-save.
* :class:`Stopped` is the exception a stop ends with; the CLI exits with ``128 + signum``.

One run per folder: :func:`run_folder_lock` holds a POSIX record lock (``fcntl.lockf``) on
``FOLDER/.hpseg.lock`` for the run's lifetime, with the pid, host and start time inside. A
second run into the folder is refused with one line naming them (:class:`RunFolderBusy`); the
kernel releases the lock when its process ends however it ends, so a lock left by a killed run
is taken over without anyone's help. Unlike ``flock``, a record lock is not inherited by
forked processes (DataLoader workers), so a worker that outlives a killed run for a few
seconds does not keep the folder locked (a restarted ``torchrun`` rank 0 takes it at once).
Holding the lock, a run removes the temporary files its killed predecessors' saves left behind
(:func:`remove_stale_temporaries`, the ``.NAME.XXXXXXXX.tmp`` files of :func:`hpseg.io.atomic_path`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader

from hpseg.errors import HPSegError
from hpseg.io import write_error

log = logging.getLogger(__name__)

__all__ = [
    "LOCK_NAME",
    "QuietWorkersLoader",
    "RunFolderBusy",
    "RunLock",
    "Stopped",
    "close_loader",
    "remove_stale_temporaries",
    "run_folder_lock",
    "signal_name",
]

#: what a scheduler sends to ask a run to stop or to save: the main process decides, workers ignore them
WORKER_IGNORED = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGUSR2") if hasattr(signal, n))
_MASKS = hasattr(signal, "pthread_sigmask")  # POSIX
LOCK_NAME = ".hpseg.lock"
#: the temporary files of hpseg.io.atomic_path: ``.NAME.`` + mkstemp's 8 random characters + ``.tmp``
_TEMPORARY = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")
#: file systems without record locks (e.g. Lustre mounted without -o flock, some FUSE mounts)
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL}


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15 (the number itself when it has no name)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


class Stopped(KeyboardInterrupt):
    """A run stopped on a signal after saving its state; the CLI exits with ``128 + signum``
    (130 for SIGINT, 143 for SIGTERM) and prints the message, which says how to resume."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = int(signum)


# ------------------------------------------------------------------------------------------
# worker processes
# ------------------------------------------------------------------------------------------


class _QuietWorker:
    """A ``worker_init_fn``: ignore the stop signals, then run the loader's own init (if any).
    A class, not a closure, so that it pickles for the ``spawn`` start method."""

    def __init__(self, inner: Callable[[int], None] | None = None) -> None:
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        for s in WORKER_IGNORED:
            signal.signal(s, signal.SIG_IGN)
        if _MASKS:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_IGNORED)  # blocked by the parent while it forked
        if self.inner is not None:
            self.inner(worker_id)


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """Block the stop signals in this thread (a forked worker inherits the mask); on exit a
    pending signal is delivered to this process's handler as usual."""
    if not _MASKS or threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_IGNORED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


class QuietWorkersLoader(DataLoader):
    """A ``torch.utils.data.DataLoader`` whose worker processes ignore SIGINT, SIGTERM, SIGUSR1
    and SIGUSR2, leaving them to the main process (see the module docstring). Takes the
    arguments of ``DataLoader``; a given ``worker_init_fn`` still runs, after the signals are set."""

    def __init__(self, *args: Any, worker_init_fn: Callable[[int], None] | None = None, **kwargs: Any) -> None:
        kwargs["worker_init_fn"] = _QuietWorker(worker_init_fn)
        super().__init__(*args, **kwargs)

    def __iter__(self) -> Any:
        if self.num_workers == 0:
            return super().__iter__()
        with _stop_signals_blocked():  # the workers start here (one iterator, one set of workers)
            return super().__iter__()


def close_loader(batches: Any) -> None:
    """End the worker processes of a DataLoader iterator now (before a stop-save), rather than
    when the iterator is collected; nothing for a single-process iterator."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()


# ------------------------------------------------------------------------------------------
# one run per folder
# ------------------------------------------------------------------------------------------


class RunFolderBusy(HPSegError):
    """Another process holds the run folder's lock."""


@dataclass
class RunLock:
    """The lock of one run folder, held by this process (``locked``) or not (a file system
    without locks, a folder this user cannot write, another rank of a torchrun job).
    ``existed``: whether the folder was there before the lock was taken."""

    folder: Path
    existed: bool
    locked: bool = False
    fd: int | None = None
    depth: int = 1


_HELD: dict[Path, RunLock] = {}  # folders this process holds (a nested lock of one is a no-op)


def _holder(text: str) -> str:
    """Who holds a lock, from its file's text: ``pid 123 on node7, since 2026-01-02 03:04:05``."""
    try:
        info = json.loads(text)
        return f"pid {int(info['pid'])} on {info['host']}, since {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "a process that is starting"


def _read_holder(path: Path) -> str:
    """:func:`_holder` of a lock file this process does not hold. Never call it on a file this
    process has locked: closing any descriptor of a file releases the process's record locks."""
    try:
        return _holder(path.read_text(encoding="utf-8"))
    except OSError:
        return "a process that is starting"


def _lock_file(folder: Path) -> int | None:
    """An open descriptor of ``folder/.hpseg.lock`` locked by this process; None when the file
    system cannot lock or the folder cannot be written (the run goes on unlocked: said in the log).

    Raises:
        RunFolderBusy: another live process holds it (the message names its pid and host).
    """
    path = folder / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except PermissionError as exc:
            log.warning("%s cannot be written (%s): no lock taken", folder, exc.strerror)
            return None
        try:
            import fcntl
        except ImportError:  # not a POSIX system
            os.close(fd)
            log.warning("no file locks on this system: two runs into %s would not be detected", folder)
            return None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                who = _read_holder(path)
                raise RunFolderBusy(f"{folder} is in use by another hpseg run ({who}): wait for it to end, or stop "
                                    "it and run this command again to resume, or train into another folder "
                                    "(train.out_dir=…)") from None
            if exc.errno in _NO_LOCKS:
                log.warning("the file system of %s has no file locks (%s): two runs into this folder would not "
                            "be detected", folder, exc.strerror)
                return None
            raise
        try:  # the file we locked must still be the lock file (a run that ends removes it)
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _write_holder(fd: int, folder: Path) -> None:
    """Write the pid, host and start time into the locked file (for the refusal message)."""
    previous = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    if previous:
        log.info("%s was locked by a run that ended without unlocking it (%s): taken over", folder,
                 _holder(previous))
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
    except OSError as exc:  # a full disk: the lock holds all the same; the run's first save will say it
        log.debug("could not write the lock's owner into %s: %s", folder / LOCK_NAME, exc)


@contextlib.contextmanager
def run_folder_lock(folder: Path, *, enabled: bool = True) -> Iterator[RunLock]:
    """Hold ``folder``'s lock within the block (creating the folder); remove the stale
    temporary files of killed saves once it is held.

    ``enabled=False`` (the other ranks of a torchrun job: rank 0 locks for all) takes nothing.
    A folder this process already holds is held once more (nested runs: a multi-seed run's
    folder, then a seed's own). On exit the lock file is removed and the lock released.

    Raises:
        RunFolderBusy: another process holds the folder's lock.
        HPSegError: the folder cannot be created (names it and the OS error).
    """
    folder = Path(folder)
    key = folder.resolve()
    if key in _HELD:
        _HELD[key].depth += 1
        try:
            yield _HELD[key]
        finally:
            _HELD[key].depth -= 1
        return
    lock = RunLock(folder, existed=folder.is_dir())
    # the folders this lock creates above the run folder (``runs/`` of ``runs/photos``): removed
    # again on exit while empty, so that a run refused at start leaves nothing behind
    created = [p for p in folder.absolute().parents if not p.exists()][::-1] if enabled else []
    if enabled:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            error = write_error(folder, exc)
            if error is None:
                raise
            raise error from exc
        lock.fd = _lock_file(folder)
        lock.locked = lock.fd is not None
    if lock.fd is not None:
        _HELD[key] = lock
    try:
        if lock.fd is not None:
            _write_holder(lock.fd, folder)
            remove_stale_temporaries(folder)
        yield lock
    finally:
        if lock.fd is not None:
            del _HELD[key]
            with contextlib.suppress(OSError):  # gone with its folder, or the folder became read-only
                os.unlink(folder / LOCK_NAME)  # while still locked: a waiting opener sees another file
            os.close(lock.fd)  # releases the lock
        for parent in reversed(created):
            with contextlib.suppress(OSError):  # not empty: another run's, or this run's results
                parent.rmdir()


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files that saves killed mid-write left in ``folder`` (not below it);
    only safe while holding the folder's lock. Returns the files removed."""
    removed = []
    for path in sorted(folder.glob(".*.tmp")):
        if _TEMPORARY.fullmatch(path.name) and path.is_file():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) of interrupted saves from %s: %s", len(removed), folder,
                 ", ".join(p.name for p in removed))
    return removed
