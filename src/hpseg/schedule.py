"""A training schedule that fits the data: warm-up, pool renewal and validation for small folders.

The paper presets count iterations like the authors (renewal and validation on the batch index
*within the epoch*, a validation at every epoch's end) and assume epochs of hundreds of
iterations. A folder of 45 photos at batch 32 gives one iteration per epoch: the preset's
warm-up of 50 iterations then keeps λ = 0 for the whole run, the task-specific pool is never
renewed and every iteration ends with a full validation. :func:`fit_schedule` derives, for
folder training (``data.dataset=folder`` with ``train.auto_schedule=true``), values that fit the
run's length ``M`` and the folder's size, and says why:

* the batch: ``train.batch_size`` when the folder's training images fill it, else all of them
  (a folder of 3 photos trains on batches of its 2 training photos; the README's command works
  on any folder from 3 images up);
* counting on the global iteration (``train.counting=global``) when an epoch is shorter than
  the renewal or validation interval (no validation at every epoch's end);
* warm-up ``⌊WARMUP_FRACTION · M⌋`` when the configured one exceeds ``MAX_WARMUP_FRACTION · M``
  (λ > 0 for most of the run);
* pool renewal every ``⌈M / RENEWALS⌉`` iterations when the configured interval is longer than
  ``M / 2`` (the task-specific pool follows the EMA head a few times per run);
* validation every ``⌈M / VALIDATIONS⌉`` iterations when the configured cadence gives fewer
  than two validations, or more than ``VALIDATIONS`` and more than one per
  ``1 / MAX_VALIDATION_RATE`` iterations;
* at most ``VALID_IMAGES`` validation images during training (``train.valid_images``; the final
  ``hpseg evaluate`` still uses every held-out image);
* a training log (and the progress bar's loss and λ) every ``⌈M / LOGS⌉`` iterations when the
  configured ``train.log_freq`` gives fewer than ``LOGS / 2`` entries.

Other datasets are returned unchanged; for every dataset a warning says when λ cannot reach its
ramp (warm-up ≥ the run's length). Pure arithmetic on the configuration: no torch, no files.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from hpseg.config import Config, config_from_dict

log = logging.getLogger(__name__)

__all__ = ["LOGS", "MAX_VALIDATION_RATE", "MAX_WARMUP_FRACTION", "MIN_BATCH", "VALIDATIONS", "VALID_IMAGES",
           "WARMUP_FRACTION", "FittedSchedule", "fit_schedule", "fitted_batch_size", "run_length"]

#: warm-up as a fraction of the run when the configured one does not fit
WARMUP_FRACTION = 0.2
#: a configured warm-up longer than this fraction of the run is replaced
MAX_WARMUP_FRACTION = 0.25
#: task-specific pool renewals per run when the configured interval does not fit
RENEWALS = 5
#: validations per run when the configured cadence does not fit
VALIDATIONS = 4
#: the most validations per training iteration accepted (beyond ``VALIDATIONS`` per run)
MAX_VALIDATION_RATE = 0.1
#: validation images used by each validation during training
VALID_IMAGES = 16
#: training-log entries per run when the configured frequency gives too few
LOGS = 20
#: the smallest batch per process (positives are mined across the images of a batch)
MIN_BATCH = 2


@dataclass
class FittedSchedule:
    """The configuration to train with and what was changed (``{key: (before, after, reason)}``)."""

    config: Config
    changes: dict[str, tuple[object, object, str]] = field(default_factory=dict)

    def describe(self) -> str:
        """One line per change: ``key: before → after (reason)``."""
        return "; ".join(f"{k} {a} → {b} ({why})" for k, (a, b, why) in self.changes.items())


def run_length(cfg: Config, n_train: int, world_size: int = 1) -> tuple[int, int]:
    """``(iterations per epoch, iterations of the run)`` for ``n_train`` training images, as
    :class:`hpseg.train.DataPlan` counts them (full batches only)."""
    per_rank = max(1, cfg.train.batch_size // max(1, world_size))
    per_epoch = (n_train // max(1, world_size)) // per_rank
    total = per_epoch * cfg.train.epochs
    if cfg.train.max_iters is not None:
        total = min(total, cfg.train.max_iters)
    return per_epoch, total


def fitted_batch_size(batch_size: int, n_train: int, world_size: int = 1) -> int:
    """The batch of a folder run: ``batch_size``, or the most images ``n_train`` fills when it is
    fewer (a multiple of ``world_size``, at least ``MIN_BATCH`` per process); ``batch_size``
    when even that is out of reach (training then refuses the folder with its own message)."""
    if n_train >= batch_size:
        return batch_size
    fits = n_train // world_size * world_size
    return fits if fits >= MIN_BATCH * world_size else batch_size


def fit_schedule(cfg: Config, n_train: int, n_val: int, world_size: int = 1) -> FittedSchedule:
    """The schedule of ``cfg`` fitted to ``n_train`` training and ``n_val`` validation images.

    Only folder datasets with ``train.auto_schedule`` are changed (a copy; ``cfg`` is left
    alone). The changes are logged once, with their reasons; a warm-up that keeps λ = 0 for the
    whole run is a warning.
    """
    fitted = config_from_dict(cfg.to_dict())
    out = FittedSchedule(fitted)
    lo, t = fitted.loss, fitted.train
    auto = cfg.data.dataset == "folder" and cfg.train.auto_schedule

    def change(key: str, section: object, name: str, value: object, why: str) -> None:
        before = getattr(section, name)
        if before != value:
            setattr(section, name, value)
            out.changes[key] = (before, value, why)

    batch = fitted_batch_size(cfg.train.batch_size, n_train, world_size)
    if auto and batch != t.batch_size:
        change("train.batch_size", t, "batch_size", batch,
               f"{n_train} training images, fewer than one batch of {t.batch_size}: each batch takes them all")
    per_epoch, total = run_length(fitted, n_train, world_size)
    if auto and total >= 1:
        if t.counting == "epoch" and per_epoch < max(lo.renew_interval, t.valid_freq):
            change("train.counting", t, "counting", "global",
                   f"an epoch has {per_epoch} iteration(s), fewer than the renewal/validation intervals")
        if lo.warmup > MAX_WARMUP_FRACTION * total:
            change("loss.warmup", lo, "warmup", int(WARMUP_FRACTION * total),
                   f"{lo.warmup} would keep λ = 0 for more than {MAX_WARMUP_FRACTION:.0%} of {total} iterations")
        if lo.renew_interval > total / 2:
            change("loss.renew_interval", lo, "renew_interval", max(1, math.ceil(total / RENEWALS)),
                   f"{lo.renew_interval} would renew the task-specific pool at most once in {total} iterations")
        validations = total // t.valid_freq if t.counting == "global" else t.epochs * (
            per_epoch // t.valid_freq + (per_epoch % t.valid_freq != 0))
        if validations < 2 or validations > max(VALIDATIONS, MAX_VALIDATION_RATE * total):
            change("train.valid_freq", t, "valid_freq", max(1, math.ceil(total / VALIDATIONS)),
                   f"{validations} validations in {total} iterations; about {VALIDATIONS} keep their cost bounded")
        if t.valid_images is None and n_val > VALID_IMAGES:
            change("train.valid_images", t, "valid_images", VALID_IMAGES,
                   f"validating on all {n_val} images at every validation costs more than training")
        if total // t.log_freq < LOGS // 2:
            change("train.log_freq", t, "log_freq", max(1, math.ceil(total / LOGS)),
                   f"{t.log_freq} would log {total // t.log_freq} training entries in {total} iterations")
        if out.changes:
            log.info("schedule fitted to %d training images (%d iterations; train.auto_schedule=false keeps the "
                     "preset's): %s", n_train, total, out.describe())
    if total >= 1 and lo.warmup >= total:
        log.warning("loss.warmup=%d ≥ the run's %d iterations: λ stays 0 and the task-specific positives never "
                    "switch on; lower loss.warmup or train longer", lo.warmup, total)
    return out
