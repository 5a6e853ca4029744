"""Training: the Hidden Positives step and a short engine loop around it (docs/method.md §7).

One step, as data::

    images ──backbone (frozen)──► feats (B,F,S,S), attn_logits (B,H,1+S²,1+S²)
    feats ──SegmentationHead──► code (B,D,S,S)      feats ──EMA head──► code_ema
    code ──local_propagation(attn_logits)──► code_lhp
    code, code_lhp ──ProjectionHead + L2──► z, z_lhp (N,D)
    feats, code_ema ──L2──► f, s ──vs pools──► task-agnostic / task-specific positives
    hidden-positive loss + α·consistency(z, z_aug) + probe losses on code.detach()
    EMA update · backward · clip the head · the authors' four optimisers

:class:`HPObjective` is that step from the backbone's outputs to the loss (the module
DistributedDataParallel wraps), :func:`train_step` one full step, :func:`fit` the loop with its
named collaborators: :class:`TrainState`, :class:`ReferencePools`, :class:`Optimizers` and the
:class:`~hpseg.checkpointing.Checkpointer`. Counting follows the authors: the task-specific
pool is renewed and the model validated on the batch index *within the epoch*.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from hpseg import distributed as dist
from hpseg.checkpointing import Checkpointer, TrainState, stop_on_signals
from hpseg.config import LossConfig, TrainConfig
from hpseg.data.plan import DataPlan
from hpseg.errors import HPSegError
from hpseg.heads import probe_cross_entropy, share_dropout2d, upsample_bilinear
from hpseg.hidden_positives import (
    HiddenPositiveLoss,
    consistency_loss,
    lambda_schedule,
    local_propagation,
    sample_pool_entries,
)
from hpseg.model import HPModel
from hpseg.runtime import Runtime, eval_mode
from hpseg.viz import save_figure, training_curve_figure

log = logging.getLogger(__name__)

__all__ = [
    "DataPlan",
    "HPObjective",
    "Optimizers",
    "ReferencePools",
    "StepOutput",
    "backbone_outputs",
    "check_finite",
    "fit",
    "flatten_patches",
    "negatives_seed",
    "probe_cross_entropy",
    "selection_score",
    "track_finite",
    "train_step",
    "upsample_bilinear",
]

#: validate(model, pools) -> {"unsupervised": …, "linear": …, "diagnostics": …, "labelled": bool}
Validator = Callable[[HPModel, "ReferencePools"], dict[str, Any]]


def negatives_seed(seed: int, rank: int, candidates: str = "local") -> int:
    """The seed of the loss's negatives draw for process ``rank`` of a run seeded ``seed`` (the
    step number is the draw's other key). ``loss.candidates=global``: ``seed`` on every rank —
    the draw is keyed by the global image index, so it is one process's draw; ``local``: each
    rank's images draw their own negatives (rank 0's seed is ``seed``)."""
    return int(seed) if candidates == "global" else int(seed) + (int(rank) << 32)


def flatten_patches(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, S, S) -> (B·S², C)``, patches of image 0 first (row-major)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def selection_score(metrics: dict[str, Any]) -> float:
    """The authors' best-checkpoint criterion: cluster mIoU + accuracy + linear mIoU + accuracy."""
    u, lin = metrics["unsupervised"], metrics["linear"]
    return float(u["miou"] + u["accuracy"] + lin["miou"] + lin["accuracy"])


# ------------------------------------------------------------------------------------------
# the step
# ------------------------------------------------------------------------------------------


class HPObjective(nn.Module):
    """The trainable part of one HP step: heads, projection and probes → losses.

    Holds no parameters of its own; it references the model's trainable modules so that
    DistributedDataParallel can wrap a single module whose forward is the whole step.

    Args:
        model: the model (its ``spec.dropout`` is the Dropout2d rate of the step).
        loss: the hidden-positive loss module (τ, ρ, reweighting, memory budget).
        alpha: weight of the photometric consistency loss.
        sigma: LHP softmax scale.
    """

    def __init__(self, model: HPModel, loss: HiddenPositiveLoss, *, alpha: float, sigma: float) -> None:
        super().__init__()
        self.head = model.head
        self.ema_head = model.ema_head
        self.projection = model.projection
        self.linear_probe = model.linear_probe
        self.cluster_probe = model.cluster_probe
        self.hp_loss = loss
        self.alpha, self.sigma, self.dropout = float(alpha), float(sigma), float(model.spec.dropout)

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout2d on backbone features / codes (training only, a fresh mask per call; in a
        distributed run the masks of the global batch, :func:`~hpseg.heads.share_dropout2d`)."""
        return share_dropout2d(x, self.dropout, self.training)

    def forward(
        self,
        feats: torch.Tensor,
        attn_logits: torch.Tensor,
        feats_aug: torch.Tensor,
        label: torch.Tensor,
        pool_agnostic: torch.Tensor,
        pool_specific: torch.Tensor,
        lam: float,
        negative_keep: torch.Tensor | None = None,
        step: int = 0,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One step's total loss and its parts.

        In a distributed run the tensors hold this rank's share of the global batch (``B`` of
        ``world·B`` images): the dropout masks are the global batch's
        (:func:`~hpseg.distributed.batch_share`) and the hidden-positive loss with
        ``loss.candidates=global`` sees the candidates of every rank.

        Args:
            feats: frozen backbone features ``(B, F, S, S)``.
            attn_logits: last-block pre-softmax attention ``(B, H, 1+S², 1+S²)``.
            feats_aug: features of the photometrically augmented images ``(B, F, S, S)``.
            label: labels for the probes ``(B, H_img, W_img)``, −1 = ignore.
            pool_agnostic, pool_specific: reference pools ``(P, F)``, ``(P, D)``.
            lam: weight λ of task-specific positives.
            negative_keep: explicit ``(N, N)`` denominator draw (parity tests); None draws.
            step: the training iteration (the negatives draw is a function of the loss's seed and it).
        """
        with dist.batch_share(feats.shape[0]):  # dropout masks of the global batch, this rank's rows
            return self._forward(feats, attn_logits, feats_aug, label, pool_agnostic, pool_specific, lam,
                                 negative_keep, step)

    def _forward(
        self, feats: torch.Tensor, attn_logits: torch.Tensor, feats_aug: torch.Tensor, label: torch.Tensor,
        pool_agnostic: torch.Tensor, pool_specific: torch.Tensor, lam: float, negative_keep: torch.Tensor | None,
        step: int,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        code = self.head(feats)  # (B,D,S,S), each branch its own dropout
        with torch.no_grad():
            code_ema = self.drop(self.ema_head(feats, dropout=self.dropout if self.training else 0.0))
        code_lhp = self.drop(local_propagation(attn_logits.float(), code.float(), sigma=self.sigma))
        z = self.projection(flatten_patches(code))  # (N,D), L2-normalised
        z_lhp = self.projection(flatten_patches(code_lhp))
        f = F.normalize(flatten_patches(self.drop(feats)).float(), dim=1)  # (N,F)
        s = F.normalize(flatten_patches(code_ema).float(), dim=1)  # (N,D)
        loss_hp = self.hp_loss(
            z.float(), z_lhp.float(), f, s, pool_agnostic, pool_specific,
            num_images=feats.shape[0], lam=lam, step=step, negative_keep=negative_keep,
        )
        if self.alpha > 0:  # photometric consistency (docs/method.md §7); skipped when its weight is 0
            z_aug = self.projection(flatten_patches(self.head(feats_aug)))
            loss_consistency = consistency_loss(z.float(), z_aug.float())
        else:
            loss_consistency = z.new_zeros(())
        detached = code.detach()  # the probes learn on the code, never into it
        loss_linear = probe_cross_entropy(self.linear_probe(detached), label, across_ranks=True)
        loss_cluster, _ = self.cluster_probe(detached, None)
        total = loss_hp + self.alpha * loss_consistency + loss_linear + loss_cluster
        parts = {
            "loss_hp": loss_hp.detach(),
            "loss_consistency": loss_consistency.detach(),
            "loss_linear": loss_linear.detach(),
            "loss_cluster": loss_cluster.detach(),
        }
        return total, parts


class Optimizers:
    """The authors' four optimisers, stepped as one: AdamW for the segmentation head, Adam for
    the projection head and the two probes (docs/method.md §7).

    They stay four because a gradient scaler skips an optimiser whose gradients overflowed: one
    optimiser with parameter groups would skip the probes together with the head, which the
    authors' code does not. Clipping applies to the segmentation head only.
    """

    def __init__(self, model: HPModel, train: TrainConfig, *, fused: bool | None = None) -> None:
        self.head_params = list(model.head.parameters())
        # fused kernels (default on CUDA) also take the gradient scaler's overflow flag on the
        # device: no host synchronisation in GradScaler.step; elsewhere PyTorch's default kernels
        if fused is None:
            fused = self.head_params[0].device.type == "cuda"
        kwargs: dict[str, Any] = {"fused": True} if fused else {}
        self.all: dict[str, torch.optim.Optimizer] = {
            "head": torch.optim.AdamW(self.head_params, lr=train.lr_head, weight_decay=train.weight_decay, **kwargs),
            "projection": torch.optim.Adam(model.projection.parameters(), lr=train.lr_projection, **kwargs),
            "linear": torch.optim.Adam(model.linear_probe.parameters(), lr=train.lr_linear, **kwargs),
            "cluster": torch.optim.Adam(model.cluster_probe.parameters(), lr=train.lr_cluster, **kwargs),
        }
        self.grad_clip = train.grad_clip

    def zero_grad(self) -> None:
        for opt in self.all.values():
            opt.zero_grad(set_to_none=True)

    def step(self, scaler: torch.amp.GradScaler) -> torch.Tensor:
        """Unscale and clip the head's gradients, step every optimiser; returns the head's
        gradient norm before clipping (a 0-dim tensor on the device: nothing is read back)."""
        scaler.unscale_(self.all["head"])
        norm = nn.utils.clip_grad_norm_(self.head_params, self.grad_clip)
        for opt in self.all.values():
            scaler.step(opt)
        scaler.update()
        return norm.detach()

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.all.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, opt in self.all.items():
            opt.load_state_dict(state[name])


@torch.no_grad()
def backbone_outputs(
    model: HPModel, batch: dict[str, Any], runtime: Runtime, *, need_aug: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frozen-backbone ``feats (B,F,S,S)``, ``attn_logits (B,H,1+S²,1+S²)`` and the augmented
    view's ``feats_aug``, in float32.

    Batches from :class:`hpseg.feature_cache.CachedFeatures` carry ``feats``/``attn_logits``
    already; the augmented view (random photometric transform) is never cached. When the
    consistency weight is 0 (``need_aug=False``) the augmented view is not computed at all and
    ``feats`` stands in for it.
    """
    device = runtime.device
    with runtime.autocast():
        if "feats" in batch:
            feats = batch["feats"].to(device, non_blocking=True)
            attn_logits = batch["attn_logits"].to(device, non_blocking=True)
        else:
            out = model.backbone(batch["img"].to(device, non_blocking=True))
            feats, attn_logits = out.feats, out.attn_logits
        feats_aug = feats
        if need_aug:
            feats_aug = model.backbone.features(batch["img_aug"].to(device, non_blocking=True))
    return feats.float(), attn_logits.float(), feats_aug.float()


@dataclass
class StepOutput:
    """What one training step reports: 0-dim tensors on the step's device, read (and so
    synchronised with the device) only when a log line needs them (:meth:`values`)."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]
    grad_norm: torch.Tensor

    @property
    def finite(self) -> torch.Tensor:
        """Whether the loss is finite (a bool tensor; the loop checks it when it logs or saves)."""
        return torch.isfinite(self.loss)

    def stacked(self) -> tuple[list[str], torch.Tensor]:
        """The names ``loss``, the parts, ``grad_norm`` and their values (float32, on the device)."""
        return ["loss", *self.parts, "grad_norm"], torch.stack([t.float() for t in (self.loss, *self.parts.values(), self.grad_norm)])

    def values(self, mean_over_ranks: bool = False) -> dict[str, float]:
        """``loss``, the parts and ``grad_norm`` as Python floats (one read from the device).

        ``mean_over_ranks`` (a collective: every rank must ask): their means over the processes
        — with ``loss.candidates=global`` the loss of one process with the global batch (each
        rank's hidden-positive loss is ``world ×`` its share, :func:`~hpseg.hidden_positives.hidden_positive_loss`).
        """
        names, flat = self.stacked()
        if mean_over_ranks:
            flat = dist.all_reduce_mean(flat)
        return dict(zip(names, flat.tolist()))


def train_step(
    step_module: nn.Module,
    model: HPModel,
    batch: dict[str, Any],
    pools: ReferencePools,
    lam: float,
    optimizers: Optimizers,
    scaler: torch.amp.GradScaler,
    runtime: Runtime,
    *,
    ema_m: float,
    step: int = 0,
    negative_keep: torch.Tensor | None = None,
) -> StepOutput:
    """One HP training step (docs/method.md §7), in the authors' order: frozen backbone, the
    objective's forward, the EMA update (after the forward that used the EMA head, before the
    optimisers move the head), backward, clipping, the four optimiser steps.

    ``step_module`` is the :class:`HPObjective` (or its DistributedDataParallel wrapper); ``step``
    the training iteration (it keys the negatives draw). Nothing is read back to the host: the
    returned values stay on the device, and the caller checks :attr:`StepOutput.finite` when it
    logs or saves (:func:`check_finite`), before a non-finite step's weights can be written.
    """
    objective: Any = step_module.module if isinstance(step_module, nn.parallel.DistributedDataParallel) else step_module
    label = batch["label"].to(runtime.device, non_blocking=True)
    feats, attn_logits, feats_aug = backbone_outputs(model, batch, runtime, need_aug=objective.alpha > 0)
    with runtime.autocast():
        loss, parts = step_module(feats, attn_logits, feats_aug, label, pools.agnostic, pools.specific, lam,
                                  negative_keep, step=step)
    model.ema_head.ema_update(model.head, ema_m)
    optimizers.zero_grad()
    scaler.scale(loss).backward()
    grad_norm = optimizers.step(scaler)
    return StepOutput(loss.detach(), parts, grad_norm)


def check_finite(first_bad: torch.Tensor, out: StepOutput | None = None) -> None:
    """Raise :class:`HPSegError` if a step since the last check had a non-finite loss on any process,
    naming the iteration, the rank, the step's values and the fix (one read; nothing saved since).

    ``first_bad``: from :func:`track_finite` (−1: none); ``out`` names its values. A collective when
    distributed, called by every rank at the same points (log and save points, the end): one small
    all-gather of every rank's ``first_bad``, so that all raise the same error there.
    """
    mine = first_bad.float().reshape(1, -1)  # (1, 1 + values); float32: exact iterations up to 2^24 (and MPS)
    table = dist.all_gather_cat(mine, name="the all-gather of the finiteness check").tolist()  # (world, 1 + values)
    bad = [(int(row[0]), r) for r, row in enumerate(table) if row[0] >= 0]
    if not bad:
        return
    iteration, rank = min(bad)
    where, names = f" on rank {rank}" if len(table) > 1 else "", out.stacked()[0] if out is not None else []
    detail = " (" + ", ".join(f"{k} {v:.4g}" for k, v in zip(names, table[rank][1:])) + ")" if names else ""
    raise HPSegError(f"non-finite loss at iteration {iteration}{where}{detail}: lower the learning rates or use "
                     "train.precision=fp32 (the last checkpoint saved before it is intact)")


def track_finite(first_bad: torch.Tensor, out: StepOutput, iteration: int) -> torch.Tensor:
    """``first_bad`` updated with this step, on the device without synchronisation: ``(1 + values,)``,
    the first non-finite step's iteration (−1: none yet) and its values (:meth:`StepOutput.stacked`)."""
    row = torch.cat([out.loss.new_full((1,), iteration, dtype=torch.float32), out.stacked()[1]])
    return torch.where((first_bad.reshape(-1)[:1] < 0) & ~out.finite, row, first_bad)


# ------------------------------------------------------------------------------------------
# reference pools (docs/method.md §3)
# ------------------------------------------------------------------------------------------


class ReferencePools:
    """The task-agnostic pool ``(P, F)`` (built once) and the task-specific pool ``(P, D)``
    (renewed every ``renew_interval`` batches): one random patch of ``Dropout2d(feats)`` /
    ``Dropout2d(code_ema)`` per training image, L2-normalised.

    ``loader`` yields training batches in a fresh order per call of :meth:`renew_specific`
    (an :class:`~hpseg.data.sampler.EpochSampler` epoch per renewal). In distributed runs every
    rank reads its share of the same global batches, draws the dropout masks and patch positions
    of the whole global batch (``generator`` seeded alike on every rank) and uses its rows; the
    gathered pools, in global-batch order, are identical everywhere and equal one process's.
    """

    def __init__(self, size: int, dropout: float, generator: torch.Generator) -> None:
        self.size, self.dropout, self.generator = size, dropout, generator
        self.agnostic = torch.empty(0)
        self.specific = torch.empty(0)

    @torch.no_grad()
    def collect(self, model: HPModel, batches: Iterable[dict[str, Any]], runtime: Runtime, which: str) -> torch.Tensor:
        """One pool (``which``: ``"agnostic"`` or ``"specific"``) from ``batches``."""
        rows: list[torch.Tensor] = []
        for batch in batches:
            with runtime.autocast():
                if "feats" in batch:  # cached backbone outputs
                    feats = batch["feats"].to(runtime.device, non_blocking=True).float()
                else:
                    feats = model.backbone.features(batch["img"].to(runtime.device, non_blocking=True))
                with dist.batch_share(feats.shape[0]) as share:
                    if which == "specific":  # Dropout2d(ema_head(·)) with a mask per EMA branch, as the authors
                        x = share_dropout2d(model.ema_head(feats, dropout=self.dropout), self.dropout, True)
                    else:
                        x = share_dropout2d(feats, self.dropout, True)
            shared = {"share": (share.start, share.total)} if share.total > share.size else {}
            rows.append(sample_pool_entries(x.float(), generator=self.generator, **shared))
            if len(rows) * share.total >= self.size:  # the same number of global batches on every rank
                break
        if not rows:
            raise HPSegError("the training set yielded no images for the reference pools: check the data")
        pool = torch.cat(rows)
        if runtime.world_size > 1:  # (world, batches, b, C) → global-batch order, as one process collects
            pool = dist.all_gather_cat(pool, name=f"the all-gather of the {which} reference pool").view(runtime.world_size, len(rows), -1, pool.shape[1])
            pool = pool.transpose(0, 1).reshape(-1, pool.shape[3])
        return pool[: self.size]

    def build(self, model: HPModel, batches: Callable[[int], Iterable[dict[str, Any]]], runtime: Runtime) -> None:
        """Both pools, at the start of training (``batches(k)`` yields the k-th pass)."""
        self.agnostic = self.collect(model, batches(0), runtime, "agnostic")
        self.specific = self.collect(model, batches(0), runtime, "specific")

    def renew_specific(self, model: HPModel, batches: Iterable[dict[str, Any]], runtime: Runtime) -> None:
        """Rebuild the task-specific pool from the current EMA head."""
        self.specific = self.collect(model, batches, runtime, "specific")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"agnostic": self.agnostic.cpu(), "specific": self.specific.cpu(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        self.agnostic, self.specific = state["agnostic"].to(device), state["specific"].to(device)
        self.generator.set_state(state["generator"])


# ------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------


def fit(
    model: HPModel,
    train_set: Dataset[Any],
    *,
    train: TrainConfig,
    loss: LossConfig,
    runtime: Runtime,
    out_dir: Path,
    config: dict[str, Any],
    num_workers: int = 0,
    validate: Validator | None = None,
) -> dict[str, Any]:
    """Train ``model`` with Hidden Positives; resume from ``out_dir/last.pt`` when present.

    Writes in ``out_dir``: ``last.pt`` (the full training state, random streams included: a
    resumed run ends with the weights of an uninterrupted one), ``best.pt`` (the best validation
    by the authors' criterion; without labels the final model, said so in the log),
    ``final.pt``, ``metrics.jsonl``, ``training_curve.png``, ``train_summary.json``.
    """
    data = DataPlan.create(train_set, train, runtime, num_workers)
    n_train = len(train_set)  # type: ignore[arg-type]
    pool_size = min(loss.pool_size, n_train)
    if pool_size < loss.pool_size:
        log.info("reference pools capped at %d entries: the training set has %d images (loss.pool_size=%d)",
                 pool_size, n_train, loss.pool_size)
    # one stream for every rank: the pools' patch positions and the dropout masks are drawn for the
    # global batch (docs/method.md, "Randomness and the number of processes")
    pools = ReferencePools(pool_size, model.spec.dropout, torch.Generator().manual_seed(train.seed + 7919))
    dist.broadcast_rng_state(runtime.device)

    model.to(runtime.device)
    with dist.collective("DDP's first broadcast of the weights"):  # the first collective of a run
        hp_loss, step_module = _objective(model, loss, train.seed, runtime)
    optimizers = Optimizers(model, train)
    scaler = runtime.grad_scaler()
    state = TrainState()
    ckpt = Checkpointer(out_dir, runtime, config)
    if ckpt.resume(model, optimizers, scaler, pools, state):
        log.info("resumed from %s at iteration %d", ckpt.last_path, state.iteration)
    else:
        log.info("building reference pools (%d images)", pool_size)
        model.train()
        pools.build(model, data.pool_pass, runtime)
    max_iters, per_epoch = data.max_iters, data.iters_per_epoch
    log.info("training %d iterations (%d per epoch, batch %d = %d × %d processes) on %s", max_iters, per_epoch,
             train.batch_size, data.per_rank, runtime.world_size, runtime.describe())

    progress = None
    if runtime.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=max_iters, initial=state.iteration, desc="train", unit="it", dynamic_ncols=True)
    t0 = time.perf_counter()
    first_bad = torch.full((), -1.0, device=runtime.device)  # the first non-finite step (track_finite)
    model.train()
    with stop_on_signals(train.save_on_signal) as stop:
        while state.iteration < max_iters:
            epoch, batches = data.epoch(state.iteration)
            for batch in batches:
                it = state.iteration
                i = it if train.counting == "global" else it - epoch * per_epoch  # authors: within the epoch
                if i % loss.renew_interval == 0 and i != 0:
                    pools.renew_specific(model, data.pool_pass(1 + it // loss.renew_interval), runtime)
                lam = lambda_schedule(it, loss.warmup, max_iters)
                with dist.collective(f"the training step of iteration {it} (candidate gathers, DDP gradient all-reduce)"):
                    out = train_step(step_module, model, batch, pools, lam, optimizers, scaler, runtime,
                                     ema_m=loss.ema_m, step=it)
                first_bad = track_finite(first_bad, out, it)
                state.iteration = it + 1
                if progress is not None:
                    progress.update(1)
                logged = it % train.log_freq == 0 or it + 1 == max_iters
                if logged:  # the only reads from the device
                    check_finite(first_bad, out)
                    _log_step(ckpt, out, hp_loss, progress, it=it, epoch=epoch, lam=lam, seconds=time.perf_counter() - t0)
                epoch_end = train.counting == "epoch" and i + 1 == per_epoch
                validated = (i + 1) % train.valid_freq == 0 or epoch_end or it + 1 == max_iters
                if validated:
                    check_finite(first_bad, out)
                    _validate(model, pools, validate, state, ckpt, epoch)
                    ckpt.save_last(model, optimizers, scaler, pools, state)
                if stop.agreed(sync_point=logged or validated):  # a stop (SIGTERM, SIGINT) or the save signal
                    check_finite(first_bad, out)
                    ckpt.at_signal(stop, batches, model, optimizers, scaler, pools, state)
                if state.iteration >= max_iters:
                    break
    if progress is not None:
        progress.close()
    check_finite(first_bad)
    summary = {**ckpt.finish(model, state, labelled=state.best_iteration >= 0), "max_iters": max_iters,
               "seconds": round(time.perf_counter() - t0, 2), "world_size": runtime.world_size,
               "per_rank_batch": data.per_rank, "global_batch": data.per_rank * runtime.world_size}
    if runtime.is_main:
        rows = [json.loads(line) for line in ckpt.metrics_path.read_text().splitlines() if line.strip()]
        save_figure(training_curve_figure(rows), out_dir / "training_curve.png")
        ckpt.write_summary(summary)
    dist.wait_for_main("the wait for rank 0's final checkpoints")
    return summary


def _log_step(ckpt: Checkpointer, out: StepOutput, hp_loss: HiddenPositiveLoss, progress: Any, *, it: int,
              epoch: int, lam: float, seconds: float) -> None:
    """One training entry of ``metrics.jsonl`` (the values are the global batch's: a collective)."""
    values = out.values(mean_over_ranks=True)
    if progress is not None:
        progress.set_postfix(loss=f"{values['loss']:.3f}", lam=f"{lam:.2f}")
    ckpt.log({"iteration": it, "epoch": epoch, **values, "lambda": lam,
              **{f"train_{k}": v for k, v in hp_loss.stats.items()}, "seconds": round(seconds, 3)})


def _objective(model: HPModel, loss: LossConfig, seed: int, runtime: Runtime) -> tuple[HiddenPositiveLoss, nn.Module]:
    """The loss module and the step module (:class:`HPObjective`, wrapped by DDP when distributed)."""
    hp_loss = HiddenPositiveLoss(loss.tau, loss.rho, reweight=loss.reweight, memory_gb=loss.memory_gb,
                                 chunk_images=loss.chunk_images, path=loss.path, matmul_dtype=runtime.matmul_dtype,
                                 seed=negatives_seed(seed, runtime.rank, loss.candidates), compile_chunks=loss.compile,
                                 candidates=loss.candidates)
    objective = HPObjective(model, hp_loss, alpha=loss.alpha, sigma=loss.sigma)
    if runtime.world_size == 1:
        return hp_loss, objective
    # the objective's modules hold no buffers: DDP's buffer syncing is a no-op
    return hp_loss, nn.parallel.DistributedDataParallel(
        objective, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)


def _validate(model: HPModel, pools: ReferencePools, validate: Validator | None, state: TrainState,
              ckpt: Checkpointer, epoch: int) -> None:
    """Validate on the main process, log, and keep ``best.pt`` by the authors' criterion."""
    if validate is not None and ckpt.runtime.is_main:
        with eval_mode(model):
            metrics = validate(model, pools)
        record: dict[str, Any] = {"iteration": state.iteration, "epoch": epoch, "val": metrics}
        if metrics.get("labelled", True):
            score = selection_score(metrics)
            record["score"] = score
            improved = score >= state.best_score
            if improved:
                state.best_score, state.best_iteration, state.best_metrics = score, state.iteration, metrics
                ckpt.save_best(model, metrics, state.iteration)
            u, lin = metrics["unsupervised"], metrics["linear"]
            log.info("val @%d: unsupervised acc %.2f mIoU %.2f | linear acc %.2f mIoU %.2f%s", state.iteration,
                     u["accuracy"], u["miou"], lin["accuracy"], lin["miou"], "  (best)" if improved else "")
        else:
            log.info("val @%d (no labels): %s", state.iteration,
                     " · ".join(f"{k} {v:.3g}" for k, v in metrics.get("diagnostics", {}).items()
                                if isinstance(v, (int, float))))
        ckpt.log(record)
    dist.wait_for_main(f"the wait for rank 0's validation at iteration {state.iteration}")
    dist.broadcast_rng_state(ckpt.runtime.device)  # whatever rank 0's validation drew, one stream again
