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
restored. :func:`stop_on_signals` turns SIGINT/SIGTERM (pre-emption) into a clean stop between
two steps, after ``last.pt`` is written.

A run folder keeps the user's work: :func:`check_run_folder` says when a folder already holds a
finished run of the same settings (nothing to do) and refuses, naming the changed settings and
a new folder, a finished or unfinished run of other settings; :func:`removed_on_failure` removes
a folder that a failed start created, so that no half-made run (a lone ``config.yaml``) stays.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from hpseg import distributed as dist
from hpseg.checkpoint import save_checkpoint
from hpseg.errors import HPSegError
from hpseg.io import atomic_torch_save, atomic_write_text, finite
from hpseg.model import HPModel
from hpseg.runtime import Runtime

log = logging.getLogger(__name__)

__all__ = [
    "Checkpointer",
    "StopRequest",
    "TrainState",
    "changed_settings",
    "check_run_folder",
    "removed_on_failure",
    "stop_on_signals",
    "suggest_out_dir",
]

LAST_FORMAT_VERSION = 2


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
    """Set by a signal handler; the loop stops at the next step boundary."""

    requested: bool = False


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Within the block, SIGTERM and a first SIGINT only set ``requested`` (a second SIGINT
    interrupts at once). Outside the main thread nothing is installed."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum: int, frame: Any) -> None:
        if request.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        request.requested = True
        log.warning("signal %d: stopping after this step (state saved to last.pt)", signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
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
        if runtime.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)

    # -- the log -------------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line to ``metrics.jsonl`` (main process only); a number that is not
        finite (e.g. a precision without a labelled pair) is written as null, never NaN."""
        if self.runtime.is_main:
            with self.metrics_path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(finite(record), allow_nan=False) + "\n")

    def _truncate_log(self, iteration: int) -> None:
        """Drop log lines written after ``iteration`` steps (by a run that died after saving)."""
        if not (self.runtime.is_main and self.metrics_path.is_file()):
            return
        keep = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            done = row["iteration"] if "val" in row else row["iteration"] + 1
            if done <= iteration:
                keep.append(line)
        atomic_write_text(self.metrics_path, "".join(f"{line}\n" for line in keep))

    # -- resumable state -------------------------------------------------------------------------
    def save_last(self, model: HPModel, optimizers: Any, scaler: torch.amp.GradScaler, pools: Any,
                  state: TrainState) -> None:
        """Write ``last.pt`` (collective in distributed runs: every rank must call it)."""
        streams = {k: _gather(v, self.runtime) for k, v in _rank_streams(self.runtime).items()}
        pool_gen = _gather(pools.generator.get_state(), self.runtime)
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
        """Restore everything from ``last.pt``; False when there is none."""
        if not self.last_path.is_file():
            return False
        ckpt = torch.load(self.last_path, map_location="cpu", weights_only=True)
        if ckpt.get("format_version") != LAST_FORMAT_VERSION:
            from hpseg.errors import HPSegError

            raise HPSegError(f"{self.last_path} was written by another hpseg version and cannot resume exactly: "
                             "delete it to start over (or use that version)")
        device, rank = self.runtime.device, self.runtime.rank
        model.load_state_dict(ckpt["model"])
        optimizers.load_state_dict(ckpt["optimizers"])
        scaler.load_state_dict(ckpt["scaler"])
        pool_state = dict(ckpt["pools"])
        pool_state["generator"] = _own_row(pool_state["generator"], rank)
        pools.load_state_dict(pool_state, device)
        state.load_state_dict(ckpt["state"])
        torch.set_rng_state(_own_row(ckpt["rng"]["cpu"], rank))
        if device.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(_own_row(ckpt["rng"]["cuda"], rank), device)
        self._truncate_log(state.iteration)
        return True

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


# ------------------------------------------------------------------------------------------
# the state of a run folder
# ------------------------------------------------------------------------------------------

#: settings that change how a run is carried out, never what it computes
_BOOKKEEPING = frozenset({"train.progress", "train.device", "train.out_dir", "train.log_freq", "train.seeds",
                          "train.dist_timeout", "data.num_workers", "data.max_skipped_fraction"})
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


def changed_settings(before: dict[str, Any], now: dict[str, Any], *,
                     finished: bool) -> list[tuple[str, Any, Any]]:
    """``(key, stored value, new value)`` of the settings (``Config.to_dict`` form) that differ
    and matter: every data/model/loss/train setting but bookkeeping (device, progress, workers…)
    for a finished run; for resuming an unfinished one, data/model/loss and the run's batch,
    epochs, seed and precision (a new ``train.max_iters`` only changes where it stops)."""
    a, b = _flat(before), _flat(now)
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


def check_run_folder(out_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """Before training into ``out_dir`` with ``config`` (``Config.to_dict``): the stored
    ``train_summary.json`` (plus ``"already_finished": True``) when the folder holds a finished
    run of the same settings; None when there is nothing there or an unfinished run to resume.

    Raises:
        HPSegError: the folder holds a run of other settings (names them and a new folder).
    """
    import yaml

    saved, summary_file = out_dir / "config.yaml", out_dir / "train_summary.json"
    finished = summary_file.is_file() and (out_dir / "final.pt").is_file()
    if not saved.is_file() or not (finished or (out_dir / "last.pt").is_file()):
        return None
    before = yaml.safe_load(saved.read_text(encoding="utf-8")) or {}
    changed = changed_settings(before, config, finished=finished)
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
    summary: dict[str, Any] = json.loads(summary_file.read_text(encoding="utf-8"))
    log.info("%s already holds this finished run (%s iterations): nothing to do", out_dir, summary.get("iterations"))
    return {**summary, "already_finished": True}


@contextlib.contextmanager
def removed_on_failure(out_dir: Path) -> Iterator[None]:
    """Remove ``out_dir`` when the block fails and the folder did not exist before it, unless a
    ``last.pt`` (anywhere below it) makes it resumable: a failed start leaves nothing behind."""
    existed = out_dir.exists()
    try:
        yield
    except BaseException:
        if dist.rank() == 0 and not existed and out_dir.is_dir() and not any(out_dir.rglob("last.pt")):
            shutil.rmtree(out_dir, ignore_errors=True)
            log.debug("removed %s: the run failed before it could be resumed", out_dir)
        raise
