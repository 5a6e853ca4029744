"""The training run's files: resumable state, best/final checkpoints, the metrics log.

:class:`Checkpointer` owns a run folder::

    last.pt              everything a resumed run needs (weights, optimisers, scaler, pools,
                         TrainState, every random stream of every rank) — atomically replaced
    best.pt, final.pt    self-describing model checkpoints (:func:`hpseg.checkpoint.save_checkpoint`)
    metrics.jsonl        one JSON object per logged step and per validation
    train_summary.json   what the run did and how best.pt was chosen

A run resumed from ``last.pt`` ends with the same weights as one never interrupted: data order
and augmentation are functions of (seed, epoch, item) (:mod:`hpseg.data.sampler`), and the
global random streams (dropout masks, negative sampling) and the pool generator are saved and
restored. With ``loss.candidates=global`` every process holds the same streams, so a run may be
resumed on another number of processes with the same global batch, exactly; otherwise that is
refused (``Checkpointer._stream_row``). :func:`stop_on_signals` turns SIGINT/SIGTERM (pre-emption) into a clean stop between
two steps, after ``last.pt`` is written.

A run folder keeps the user's work: :func:`check_run_folder` says when a folder already holds a
finished run of the same settings (nothing to do) and refuses, naming the changed settings and
a new folder, a finished or unfinished run of other settings; :func:`removed_on_failure` removes
a folder that a failed start created, so that no half-made run (a lone ``config.yaml``) stays.

Pre-emption and accidents (README "Resuming, pre-emption and accidents"): the stop-save
(:meth:`Checkpointer.at_signal`) ends the DataLoader workers first and is never cut short by
another signal; an optional save signal (``train.save_on_signal``) saves and goes on. The log
matches the checkpoint: a fresh start (no ``last.pt``) begins an empty ``metrics.jsonl``, a
resumed run drops the lines written after its ``last.pt`` (and a torn last line, said once); a
damaged ``last.pt`` or a failed write is one line naming the file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import re
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import torch

from hpseg import distributed as dist
from hpseg.checkpoint import save_checkpoint
from hpseg.config import Config
from hpseg.errors import HPSegError
from hpseg.io import atomic_torch_save, atomic_write_text, finite, safe_torch_load, write_error
from hpseg.model import HPModel
from hpseg.preemption import RunFolderBusy, Stopped, close_loader, signal_name
from hpseg.runtime import Runtime

log = logging.getLogger(__name__)

__all__ = [
    "REQUESTED_FILE",
    "Checkpointer",
    "StopRequest",
    "TrainState",
    "changed_settings",
    "check_run_folder",
    "removed_on_failure",
    "seed_folder_states",
    "stop_on_signals",
    "suggest_out_dir",
]

LAST_FORMAT_VERSION = 2
#: the settings as given (preset + overrides), before hpseg fitted them to the data (config.yaml)
REQUESTED_FILE = "requested.yaml"


@dataclass
class TrainState:
    """Progress and selection bookkeeping of a training run."""

    iteration: int = 0  # steps done
    best_score: float = -math.inf
    best_iteration: int = -1
    best_metrics: dict[str, Any] | None = None
    last_metrics: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if hasattr(self, key):
                setattr(self, key, value)


@dataclass
class StopRequest:
    """Set by the signal handlers of :func:`stop_on_signals`; the loop acts at the next step
    boundary (:meth:`Checkpointer.at_signal`)."""

    requested: bool = False  # stop (SIGINT, SIGTERM): save last.pt and raise Stopped
    signum: int = signal.SIGINT  # the first stop signal (the exit status is 128 + it)
    save_requested: bool = False  # the save signal: save last.pt and go on
    interrupts: int = 0  # SIGINTs received; a third one (not during a save) aborts without saving

    @property
    def pending(self) -> bool:
        """Whether the loop has something to do at this step boundary."""
        return self.requested or self.save_requested

    def agreed(self, sync_point: bool) -> bool:
        """Whether the loop acts on a signal at this step boundary.

        One process: whenever one is pending. Under torchrun the processes may see a signal at
        different steps (a scheduler signals each one), and the save is a collective: they act
        only at ``sync_point`` boundaries — iterations that are the same on every rank (log and
        validation points) — where the requests of every rank are combined (one small
        all-reduce), so that every rank saves, and stops or goes on, at the same iteration.
        """
        if dist.world_size() == 1:
            return self.pending
        if not sync_point:
            return False
        requested, save, signum = dist.max_over_ranks(
            [int(self.requested), int(self.save_requested), int(self.signum) if self.requested else 0],
            name="the all-reduce of the stop signals")
        if requested and not self.requested:  # another process was signalled: stop like it
            self.requested, self.signum = True, signal.Signals(signum)
        self.save_requested = bool(save)
        return bool(requested or save)


#: SIGINTs that abort at once (unless a save is under way), losing the steps since the last save
ABORT_AFTER = 3
_saves_under_way = [0]  # a signal handler never interrupts a save (Checkpointer.save_last)
_F = TypeVar("_F", bound=Callable[..., Any])


def _uninterrupted(method: _F) -> _F:
    """Mark ``method`` a save: while it runs, no signal handler of :func:`stop_on_signals` raises."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _saves_under_way[0] += 1
        try:
            return method(*args, **kwargs)
        finally:
            _saves_under_way[0] -= 1

    return cast(_F, wrapper)


@contextlib.contextmanager
def stop_on_signals(save_signal: str | int | None = None) -> Iterator[StopRequest]:
    """Within the block, SIGTERM and SIGINT only set ``requested``: the loop saves and stops at
    the next step boundary, and more signals never cut that save short. A third SIGINT outside
    a save aborts at once (``KeyboardInterrupt``, the steps since the last save are lost).
    ``save_signal`` (``"SIGUSR1"``, ``"USR2"`` or a number) sets ``save_requested``: save and go
    on. Outside the main thread nothing is installed."""
    if isinstance(save_signal, str):
        save_signal = int(signal.Signals["SIG" + save_signal.upper().removeprefix("SIG")])
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum: int, frame: Any) -> None:
        name = signal_name(signum)
        if signum == save_signal:
            request.save_requested = True
            log.warning("%s: saving last.pt after this step, then going on", name)
            return
        request.interrupts += signum == signal.SIGINT
        if not request.requested:
            request.requested, request.signum = True, signum
            log.warning("%s: stopping after this step (state saved to last.pt)", name)
        elif request.interrupts >= ABORT_AFTER and not _saves_under_way[0]:
            raise KeyboardInterrupt("aborted without saving: the steps since the last save are lost")
        else:
            more = ABORT_AFTER - request.interrupts
            log.warning("%s: already stopping after this step%s", name, "" if more <= 0 or signum != signal.SIGINT
                        else f" (Ctrl-C {more} more time(s) to abort without saving)")

    watched = [signal.SIGINT, signal.SIGTERM] + ([save_signal] if save_signal is not None else [])
    previous = {s: signal.signal(s, handler) for s in watched}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _rank_streams(runtime: Runtime) -> dict[str, torch.Tensor]:
    """This process's global random streams (CPU, and CUDA on a GPU)."""
    streams = {"cpu": torch.get_rng_state()}
    if runtime.device.type == "cuda":
        streams["cuda"] = torch.cuda.get_rng_state(runtime.device)
    return streams


def _own_row(states: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank ``rank``'s row of a ``(world, …)`` tensor as a tensor of its own storage.

    ``last.pt`` stores per-rank states as rows of one tensor; a row is a view at a non-zero storage
    offset for every rank but 0, and ``torch.Generator.set_state`` / ``torch.set_rng_state`` given
    such a view crash the process (a segmentation fault in torch 2.14.1): every per-rank state is
    restored from a copy.
    """
    return states[rank].clone()


def _gather(t: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """``(world, …)``: every rank's tensor (same shape on every rank), on the CPU."""
    if runtime.world_size == 1:
        return t.unsqueeze(0)
    device = runtime.device if runtime.device.type == "cuda" else torch.device("cpu")
    return dist.all_gather_cat(t.to(device).unsqueeze(0), name="the all-gather of every rank's random streams "
                               "for last.pt").cpu()


class Checkpointer:
    """Writes and restores the files of one run folder (see the module docstring)."""

    def __init__(self, out_dir: Path, runtime: Runtime, config: dict[str, Any]) -> None:
        self.out_dir, self.runtime, self.config = Path(out_dir), runtime, config
        self.last_path = self.out_dir / "last.pt"
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.saved_at = -1  # the iteration of the last save_last (or resume) of this process
        if runtime.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)

    # -- the log -------------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line to ``metrics.jsonl`` (main process only); a number that is not
        finite (e.g. a precision without a labelled pair) is written as null, never NaN."""
        if self.runtime.is_main:
            try:
                with self.metrics_path.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(finite(record), allow_nan=False) + "\n")
            except OSError as exc:  # a full disk, a folder made read-only: one line (a torn line is dropped on resume)
                error = write_error(self.metrics_path, exc)
                if error is None:
                    raise
                raise error from exc

    def _fresh_log(self) -> None:
        """Begin an empty log at a fresh start: rows of a run that never saved ``last.pt`` go."""
        if self.runtime.is_main and self.metrics_path.is_file() and self.metrics_path.stat().st_size:
            log.info("starting over: %s held the log of a run that never saved last.pt; it begins anew",
                     self.metrics_path)
            atomic_write_text(self.metrics_path, "")

    def _truncate_log(self, iteration: int) -> None:
        """Drop log lines written after ``iteration`` steps (by a run that died after saving),
        and lines that are not JSON rows (a torn last line of a crash mid-write; said once)."""
        if not (self.runtime.is_main and self.metrics_path.is_file()):
            return
        keep, torn = [], []
        for number, line in enumerate(self.metrics_path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                done = row["iteration"] if "val" in row else row["iteration"] + 1
            except (ValueError, TypeError, KeyError):
                torn.append(number)
                continue
            if done <= iteration:
                keep.append(line)
        if torn:
            log.warning("%s: dropped %d unreadable line(s) (line %s; a crash while writing it)", self.metrics_path,
                        len(torn), ", ".join(map(str, torn[:5])) + (", …" if len(torn) > 5 else ""))
        atomic_write_text(self.metrics_path, "".join(f"{line}\n" for line in keep))

    # -- resumable state -------------------------------------------------------------------------
    @_uninterrupted
    def save_last(self, model: HPModel, optimizers: Any, scaler: torch.amp.GradScaler, pools: Any,
                  state: TrainState) -> None:
        """Write ``last.pt`` (collective in distributed runs: every rank must call it)."""
        streams = {k: _gather(v, self.runtime) for k, v in _rank_streams(self.runtime).items()}
        pool_gen = _gather(pools.generator.get_state(), self.runtime)
        self.saved_at = state.iteration
        if not self.runtime.is_main:
            return
        pool_state = pools.state_dict()
        pool_state["generator"] = pool_gen
        atomic_torch_save(
            {
                "format_version": LAST_FORMAT_VERSION,
                "model": model.state_dict(),
                "optimizers": optimizers.state_dict(),
                "scaler": scaler.state_dict(),
                "pools": pool_state,
                "state": state.state_dict(),
                "rng": streams,
                "config": self.config,
            },
            self.last_path,
        )

    def resume(self, model: HPModel, optimizers: Any, scaler: torch.amp.GradScaler, pools: Any,
               state: TrainState) -> bool:
        """Restore everything from ``last.pt``; False when there is none (a fresh start, which
        begins an empty log).

        Raises:
            HPSegError: ``last.pt`` is damaged or of another version (one line: restore or delete it).
        """
        if not self.last_path.is_file():
            self._fresh_log()
            return False
        ckpt = safe_torch_load(self.last_path, expected="the resumable state of a run (last.pt)",
                               fix="restore it from a copy, or delete it to start the run over from scratch")
        if not isinstance(ckpt, dict) or "format_version" not in ckpt:
            raise HPSegError(f"{self.last_path} is not the resumable state of a run: restore it from a copy, "
                             "or delete it to start the run over from scratch")
        if ckpt.get("format_version") != LAST_FORMAT_VERSION:
            raise HPSegError(f"{self.last_path} was written by another hpseg version and cannot resume exactly: "
                             "delete it to start over (or use that version)")
        device = self.runtime.device
        row = self._stream_row(ckpt)
        model.load_state_dict(ckpt["model"])
        optimizers.load_state_dict(ckpt["optimizers"])
        scaler.load_state_dict(ckpt["scaler"])
        pool_state = dict(ckpt["pools"])
        pool_state["generator"] = _own_row(pool_state["generator"], row)
        pools.load_state_dict(pool_state, device)
        state.load_state_dict(ckpt["state"])
        torch.set_rng_state(_own_row(ckpt["rng"]["cpu"], row))
        if device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(_own_row(ckpt["rng"]["cuda"], row), device)
        self._truncate_log(state.iteration)
        self.saved_at = state.iteration
        return True

    def _stream_row(self, ckpt: dict[str, Any]) -> int:
        """The row of ``last.pt``'s per-process random streams this process restores.

        The same number of processes: its own. Another number (the same global batch): with
        ``loss.candidates=global`` every process held the same streams (docs/method.md,
        "Randomness and the number of processes") and the run continues exactly as the
        interrupted one would have — row 0 for every process; otherwise refused.
        """
        saved, world = int(ckpt["rng"]["cpu"].shape[0]), self.runtime.world_size
        if saved == world:
            return self.runtime.rank
        candidates = (ckpt.get("config") or {}).get("loss", {}).get("candidates", "local")
        streams = [ckpt["rng"][k] for k in sorted(ckpt["rng"])] + [ckpt["pools"]["generator"]]
        if candidates != "global" or not all(bool((t == t[:1]).all()) for t in streams):
            how = "loss.candidates=local" if candidates != "global" else "per-process random streams"
            raise HPSegError(f"{self.last_path} was written by {saved} process(es) and this run has {world}: "
                             f"its training depends on the number of processes ({how}); resume it with "
                             f"{saved} (torchrun --nproc_per_node={saved}) or train into a new folder")
        log.info("resuming a run of %d process(es) with %d: the same global batch, the same training", saved, world)
        return 0

    # -- model checkpoints -----------------------------------------------------------------------
    def _save_model(self, name: str, model: HPModel, metrics: dict[str, Any] | None, iteration: int) -> None:
        assignment = (metrics or {}).get("unsupervised", {}).get("assignment")
        model.assignment = [int(a) for a in assignment] if assignment else None
        extra: dict[str, Any] = {"iteration": iteration}
        if metrics is not None:
            extra["metrics"] = metrics
        save_checkpoint(self.out_dir / name, model, config=self.config, extra=extra)

    def save_best(self, model: HPModel, metrics: dict[str, Any], iteration: int) -> None:
        """``best.pt`` with the validation that selected it (main process)."""
        self._save_model("best.pt", model, metrics, iteration)

    def finish(self, model: HPModel, state: TrainState, *, labelled: bool) -> dict[str, Any]:
        """Write ``final.pt`` (and ``best.pt`` = final when nothing was selected); the summary."""
        if self.runtime.is_main:
            if not labelled or not (self.out_dir / "best.pt").is_file():
                self._save_model("best.pt", model, state.last_metrics, state.iteration)
            self._save_model("final.pt", model, state.last_metrics, state.iteration)
        if labelled:
            selection = "best validation by cluster + linear accuracy and mIoU (the authors' criterion)"
        else:
            selection = "final model: no labels to select on, best.pt is final.pt"
            if self.runtime.is_main:
                log.info("no labelled validation data: best.pt is the final model")
        return {
            "iterations": state.iteration,
            "best_iteration": state.best_iteration if labelled else state.iteration,
            "best_score": state.best_score if math.isfinite(state.best_score) else None,
            "best_metrics": state.best_metrics if labelled else state.last_metrics,
            "selection": selection,
        }

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.out_dir / "train_summary.json", json.dumps(summary, indent=2))

    # -- signals ---------------------------------------------------------------------------------
    def at_signal(self, stop: StopRequest, batches: Any, model: HPModel, optimizers: Any,
                  scaler: torch.amp.GradScaler, pools: Any, state: TrainState) -> None:
        """At a step boundary after a signal (:func:`stop_on_signals`): on the save signal, write
        ``last.pt`` and go on; on a stop, end the loader's workers (``batches``), write
        ``last.pt`` (unless this iteration is saved already) and raise :class:`Stopped`."""
        if stop.requested:
            close_loader(batches)  # the workers end before the save (a pre-empted job's time is short)
        if self.saved_at != state.iteration:
            self.save_last(model, optimizers, scaler, pools, state)
            if not stop.requested and self.runtime.is_main:
                log.info("saved %s at iteration %d (save signal)", self.last_path, state.iteration)
        stop.save_requested = False
        if stop.requested:
            raise Stopped(f"{signal_name(stop.signum)}: stopped at iteration {state.iteration}, state saved in "
                          f"{self.last_path}: run the same command to resume", stop.signum)


# ------------------------------------------------------------------------------------------
# the state of a run folder
# ------------------------------------------------------------------------------------------

#: settings that change how a run is carried out, never what it computes
_BOOKKEEPING = frozenset({"train.progress", "train.device", "train.out_dir", "train.log_freq", "train.seeds",
                          "train.dist_timeout", "data.num_workers", "data.max_skipped_fraction",
                          "train.save_on_signal"})
#: what an unfinished run may change when resumed (its other train.* settings too: a longer run...)
_RESUME_TRAIN = frozenset({"train.batch_size", "train.epochs", "train.seed", "train.precision"})
#: short tags of a suggested folder name (runs/photos-k8)
_TAGS = {"model.n_clusters": "k", "data.n_classes": "k", "train.seed": "seed", "data.resolution": "r",
         "train.epochs": "e", "train.batch_size": "b", "train.max_iters": "it"}


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    flat = {f"{sec}.{k}": v for sec in ("data", "model", "loss", "train")
            for k, v in (config.get(sec) or {}).items()}
    if flat.get("data.root"):
        flat["data.root"] = str(Path(str(flat["data.root"])).expanduser().resolve())
    return flat


def _read_run_file(path: Path, parse: Callable[[str], Any]) -> dict[str, Any]:
    """A run folder's ``config.yaml`` or ``train_summary.json``; a damaged one is one line."""
    try:
        value = parse(path.read_text(encoding="utf-8")) or {}
    except (ValueError, UnicodeDecodeError, _yaml_error()) as exc:
        raise HPSegError(f"cannot read {path} ({type(exc).__name__}): the file is damaged; restore it from a copy, "
                         "or delete the run folder to start over") from exc
    if not isinstance(value, dict):
        raise HPSegError(f"cannot read {path}: not the file a run writes; restore it from a copy, or delete the "
                         "run folder to start over")
    return value


def _yaml_error() -> type[Exception]:
    """PyYAML's base error type (imported when needed)."""
    import yaml

    return yaml.YAMLError


def changed_settings(before: dict[str, Any], now: dict[str, Any], *,
                     finished: bool) -> list[tuple[str, Any, Any]]:
    """``(key, stored value, new value)`` of the settings (``Config.to_dict`` form) that differ
    and matter: every data/model/loss/train setting but bookkeeping (device, progress, workers…)
    for a finished run; for resuming an unfinished one, data/model/loss and the run's batch,
    epochs, seed and precision (a new ``train.max_iters`` only changes where it stops)."""
    # a setting the stored run predates (an older hpseg) counts as its default: a run folder made
    # before loss.candidates existed is not "another setting" (one process: both values agree)
    a, b = {**_flat(Config().to_dict()), **_flat(before)}, _flat(now)
    keys = [k for k in b if k not in _BOOKKEEPING and a.get(k) != b[k]]
    if not finished:
        keys = [k for k in keys if not k.startswith("train.") or k in _RESUME_TRAIN]
    return [(k, a.get(k), b[k]) for k in keys]


def suggest_out_dir(out_dir: Path, key: str, value: Any) -> Path:
    """A free sibling folder named after a changed setting: ``runs/photos`` → ``runs/photos-k8``."""
    if key == "data.root":
        tag = hashlib.sha1(str(value).encode("utf-8")).hexdigest()[:6]
    else:
        tag = f"{_TAGS.get(key, key.split('.')[-1])}{value}"
    tag = re.sub(r"[^A-Za-z0-9._-]+", "-", tag).strip("-") or "new"
    candidate, n = out_dir.with_name(f"{out_dir.name}-{tag}"), 2
    while candidate.exists():
        candidate, n = out_dir.with_name(f"{out_dir.name}-{tag}-{n}"), n + 1
    return candidate


def check_run_folder(out_dir: Path, config: dict[str, Any], *,
                     requested: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Before training into ``out_dir`` with ``config`` (``Config.to_dict``, the settings the run
    will use): the stored ``train_summary.json`` (plus ``"already_finished": True``) when the
    folder holds a finished run of the same settings; None when there is nothing there or an
    unfinished run to resume.

    ``requested`` are the settings as given, before :func:`hpseg.schedule.fit_schedule` fitted
    them to the folder: a finished run is the same run when they equal its stored
    ``requested.yaml`` (the same command typed again), even where hpseg's fitted values differ
    (the folder changed) — or when the fitted settings are equal. An unfinished run resumes only
    with the settings it ran with.

    Raises:
        HPSegError: the folder holds a run of other settings (names them and a new folder).
    """
    import yaml

    saved, summary_file = out_dir / "config.yaml", out_dir / "train_summary.json"
    finished = summary_file.is_file() and (out_dir / "final.pt").is_file()
    if not saved.is_file() or not (finished or (out_dir / "last.pt").is_file()):
        return None
    before = _read_run_file(saved, yaml.safe_load)
    changed = changed_settings(before, config, finished=finished)
    typed = out_dir / REQUESTED_FILE
    if changed and finished and requested is not None and typed.is_file():  # compare what was typed
        changed = changed_settings(yaml.safe_load(typed.read_text(encoding="utf-8")) or {}, requested, finished=True)
    if changed:
        key, _, new = changed[0]
        listing = "; ".join(f"{k} {a!r} → {b!r}" for k, a, b in changed[:3]) + ("; …" if len(changed) > 3 else "")
        keep = ("delete the folder to train it again" if finished else
                "resume with the stored settings, or delete its last.pt to start over")
        raise HPSegError(f"{out_dir} holds {'a finished' if finished else 'an unfinished'} run with other settings "
                         f"({listing}): train into a new folder, e.g. train.out_dir={suggest_out_dir(out_dir, key, new)}"
                         f", or {keep}")
    if not finished:
        old, new = (before.get("train") or {}).get("max_iters"), (config.get("train") or {}).get("max_iters")
        if old != new:
            log.warning("resuming with train.max_iters=%s instead of %s: the λ ramp follows the new length", new, old)
        return None
    summary: dict[str, Any] = _read_run_file(summary_file, json.loads)
    log.info("%s already holds this finished run (%s iterations): nothing to do", out_dir, summary.get("iterations"))
    return {**summary, "already_finished": True}


def seed_folder_states(folders: list[Path]) -> dict[str, list[Path]]:
    """The run folders of a multi-seed run by state: ``finished`` (``final.pt`` and
    ``train_summary.json``), ``unfinished`` (``last.pt``: it continues) and ``new``."""
    states: dict[str, list[Path]] = {"finished": [], "unfinished": [], "new": []}
    for folder in folders:
        if (folder / "final.pt").is_file() and (folder / "train_summary.json").is_file():
            states["finished"].append(folder)
        elif (folder / "last.pt").is_file():
            states["unfinished"].append(folder)
        else:
            states["new"].append(folder)
    return states


@contextlib.contextmanager
def removed_on_failure(out_dir: Path, *, existed: bool | None = None) -> Iterator[None]:
    """Remove ``out_dir`` when the block fails and the folder did not exist before it
    (``existed``; None: look now), unless a ``last.pt`` (anywhere below it) makes it resumable:
    a failed start leaves nothing behind. A refusal for a folder in use
    (:class:`~hpseg.preemption.RunFolderBusy`) removes nothing: the folder is the other run's."""
    existed = out_dir.exists() if existed is None else existed
    try:
        yield
    except RunFolderBusy:
        raise
    except BaseException:
        if dist.rank() == 0 and not existed and out_dir.is_dir() and not any(out_dir.rglob("last.pt")):
            shutil.rmtree(out_dir, ignore_errors=True)
            log.debug("removed %s: the run failed before it could be resumed", out_dir)
        raise
