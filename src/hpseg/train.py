"""Training: the Hidden Positives step and a short engine loop around it.

One step, as data (hp-method §7, architecture.md)::

    images ──backbone (frozen)──► feats (B,F,S,S), attn_logits (B,H,1+S²,1+S²)
    feats ──SegmentationHead──► code (B,D,S,S)      feats ──EMA head──► code_ema
    code ──local_propagation(attn_logits)──► code_lhp
    code, code_lhp ──ProjectionHead + L2──► z, z_lhp (N,D)
    feats, code_ema ──L2──► f, s ──vs pools──► task-agnostic / task-specific positives
    hidden_positive_loss(...) + α·consistency(z, z_aug) + probe losses on code.detach()

:class:`HPObjective` is that step from the backbone's outputs to the loss (it is the module
DistributedDataParallel wraps); :func:`fit` is the loop: pools, λ schedule, renewal, EMA,
clipping, validation, best-checkpoint selection, resume.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from hpseg import distributed as dist
from hpseg.errors import HPSegError
from hpseg.hidden_positives import (
    consistency_loss,
    hidden_positive_loss,
    lambda_schedule,
    local_propagation,
)
from hpseg.io import atomic_torch_save, atomic_write_text
from hpseg.model import HPModel, save_checkpoint
from hpseg.runtime import autocast, eval_mode, grad_scaler

log = logging.getLogger(__name__)


def flatten_patches(x: torch.Tensor) -> torch.Tensor:
    """``(B, C, S, S) -> (B·S², C)``, patches of image 0 first (row-major)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


@dataclass(frozen=True)
class LossWeights:
    """Hyper-parameters of one HP step (hp-method §4–7)."""

    tau: float = 0.8
    rho: float = 0.02
    alpha: float = 0.05
    sigma: float = 28.0
    reweight: bool = True
    chunk_images: int = 8
    dropout: float = 0.1


class HPObjective(nn.Module):
    """The trainable part of one HP step: heads, projection and probes → losses.

    Holds no parameters of its own; it owns references to the model's trainable modules so that
    DistributedDataParallel can wrap a single module whose forward is the whole step.
    """

    def __init__(self, model: HPModel, weights: LossWeights) -> None:
        super().__init__()
        self.head = model.head
        self.ema_head = model.ema_head
        self.projection = model.projection
        self.linear_probe = model.linear_probe
        self.cluster_probe = model.cluster_probe
        self.w = weights

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout2d on backbone features / codes (training only, a fresh mask per call)."""
        return F.dropout2d(x, self.w.dropout, self.training)

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
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One step's total loss and its parts.

        Args:
            feats: frozen backbone features ``(B, F, S, S)``.
            attn_logits: last-block pre-softmax attention ``(B, H, 1+S², 1+S²)``.
            feats_aug: features of the photometrically augmented images ``(B, F, S, S)``.
            label: labels for the probes ``(B, H_img, W_img)``, −1 = ignore.
            pool_agnostic, pool_specific: reference pools ``(P, F)``, ``(P, D)``.
            lam: weight λ of task-specific positives.
        """
        num_images = feats.shape[0]
        # --- heads ------------------------------------------------------------------------
        code = self.head(feats)  # (B,D,S,S), each branch its own dropout
        with torch.no_grad():
            code_ema = self.drop(self.ema_head(feats, dropout=self.w.dropout if self.training else 0.0))
        code_lhp = self.drop(local_propagation(attn_logits.float(), code.float(), sigma=self.w.sigma))
        # --- embeddings -------------------------------------------------------------------
        z = self.projection(flatten_patches(code))  # (N,D), L2-normalised
        z_lhp = self.projection(flatten_patches(code_lhp))
        f = F.normalize(flatten_patches(self.drop(feats)).float(), dim=1)  # (N,F)
        s = F.normalize(flatten_patches(code_ema).float(), dim=1)  # (N,D)
        # --- hidden positives: GHP + LHP ----------------------------------------------------
        loss_hp = hidden_positive_loss(
            z.float(),
            z_lhp.float(),
            f,
            s,
            pool_agnostic,
            pool_specific,
            num_images=num_images,
            tau=self.w.tau,
            lam=lam,
            rho=self.w.rho,
            negative_keep=negative_keep,
            reweight=self.w.reweight,
            chunk_images=self.w.chunk_images,
        )
        if self.w.alpha > 0:  # photometric consistency (hp-method §7); skipped when its weight is 0
            z_aug = self.projection(flatten_patches(self.head(feats_aug)))
            loss_consistency = consistency_loss(z.float(), z_aug.float())
        else:
            loss_consistency = z.new_zeros(())
        # --- probes on detached code (evaluation heads) --------------------------------------
        detached = code.detach()
        linear_logits = self.linear_probe(detached)
        loss_linear = probe_cross_entropy(linear_logits, label)
        loss_cluster, _ = self.cluster_probe(detached, None)
        total = loss_hp + self.w.alpha * loss_consistency + loss_linear + loss_cluster
        parts = {
            "loss_hp": loss_hp.detach(),
            "loss_consistency": loss_consistency.detach(),
            "loss_linear": loss_linear.detach(),
            "loss_cluster": loss_cluster.detach(),
        }
        return total, parts


def probe_cross_entropy(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of probe logits ``(B,C,h,w)`` upsampled to the labels ``(B,H,W)``.

    Labels < 0 or ≥ C are ignored; returns 0 (with a graph) when no label is valid, e.g. for
    unlabelled folders.
    """
    n_classes = logits.shape[1]
    logits = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=False)
    target = label.clone()
    target[(target < 0) | (target >= n_classes)] = -1
    if not bool((target >= 0).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=-1)


@torch.no_grad()
def backbone_outputs(
    model: HPModel, batch: dict[str, Any], device: torch.device, *, amp: bool, need_aug: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frozen-backbone ``feats (B,F,S,S)``, ``attn_logits (B,H,1+S²,1+S²)`` and the augmented
    view's ``feats_aug``, in float32.

    Batches from :class:`hpseg.feature_cache.CachedFeatures` carry ``feats``/``attn_logits``
    already; the augmented view (random photometric transform) is never cached. When the
    consistency weight is 0 (``need_aug=False``) the augmented view is not computed at all and
    ``feats`` stands in for it.
    """
    with autocast(device, amp):
        if "feats" in batch:
            feats = batch["feats"].to(device, non_blocking=True)
            attn_logits = batch["attn_logits"].to(device, non_blocking=True)
        else:
            out = model.backbone(batch["img"].to(device, non_blocking=True))
            feats, attn_logits = out.feats, out.attn_logits
        feats_aug = feats
        if need_aug:
            images_aug = batch["img_aug"].to(device, non_blocking=True)
            feats_aug = model.backbone(images_aug, with_attention=False).feats
    return feats.float(), attn_logits.float(), feats_aug.float()


# ------------------------------------------------------------------------------------------
# reference pools (hp-method §3)
# ------------------------------------------------------------------------------------------


@torch.no_grad()
def collect_pool(
    model: HPModel,
    loader: DataLoader,
    pool_size: int,
    device: torch.device,
    *,
    which: str,
    dropout: float,
    amp: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A reference pool: one random patch per training image, L2-normalised.

    ``which="agnostic"`` samples ``Dropout2d(feats)`` → ``(P, F)``; ``which="specific"`` samples
    ``Dropout2d(code_ema)`` → ``(P, D)`` (each EMA branch sees its own input mask). In distributed runs every rank
    contributes ``pool_size / world`` images and the gathered pool is identical on all ranks.
    When the dataset holds fewer than ``pool_size`` images, the pool has one entry per image
    (the authors' code would leave zero rows, which only lowers thresholds to ≥ 0).
    """
    per_rank = math.ceil(pool_size / dist.world_size())
    rows: list[torch.Tensor] = []
    taken = 0
    for batch in loader:
        with autocast(device, amp):
            if "feats" in batch:  # cached backbone outputs
                feats = batch["feats"].to(device, non_blocking=True).float()
            else:
                feats = model.backbone(batch["img"].to(device, non_blocking=True), with_attention=False).feats
            if which == "specific":  # Dropout2d(ema_head(·)) with a mask per EMA branch, as the authors
                x = F.dropout2d(model.ema_head(feats, dropout=dropout), dropout, True)
            else:
                x = F.dropout2d(feats, dropout, True)
        flat = x.float().flatten(2)  # (B, C, S²)
        idx = torch.randint(flat.shape[2], (flat.shape[0],), generator=generator, device="cpu").to(device)
        rows.append(flat[torch.arange(flat.shape[0], device=device), :, idx])
        taken += flat.shape[0]
        if taken >= per_rank:
            break
    if not rows:
        raise RuntimeError("the training loader yielded no images for the reference pool")
    pool = torch.cat(rows)[:per_rank]
    if dist.is_distributed():
        # ranks may hold different counts at the very end of small datasets: pad to per_rank
        if pool.shape[0] < per_rank:
            pad = pool[torch.arange(per_rank - pool.shape[0], device=device) % pool.shape[0]]
            pool = torch.cat([pool, pad])
        pool = dist.all_gather_cat(pool)[:pool_size]
    return F.normalize(pool, dim=1)


# ------------------------------------------------------------------------------------------
# data order: resumable, distributed-aware shuffling
# ------------------------------------------------------------------------------------------


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, split across ranks, that can start mid-epoch.

    Resuming at iteration ``k`` of an epoch replays exactly the batches the interrupted run
    would have seen next, without loading the skipped images.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch = 0
        self.start_batch = 0

    def batches_per_epoch(self) -> int:
        """Full batches each rank sees per epoch (incomplete batches are dropped)."""
        return (self.n // self.world) // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Choose the epoch's permutation and the first batch to yield."""
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        per_rank = self.n // self.world
        mine = perm[self.rank * per_rank : (self.rank + 1) * per_rank]
        usable = self.batches_per_epoch() * self.batch_size
        return iter(mine[self.start_batch * self.batch_size : usable].tolist())

    def __len__(self) -> int:
        return max(0, (self.batches_per_epoch() - self.start_batch) * self.batch_size)


# ------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------


@dataclass
class TrainSettings:
    """Everything :func:`fit` needs besides the model and the data (built by the entry layer)."""

    out_dir: Path
    epochs: int
    batch_size: int
    max_iters: int | None
    lr_head: float
    weight_decay: float
    lr_projection: float
    lr_linear: float
    lr_cluster: float
    grad_clip: float
    amp: bool
    valid_freq: int
    log_freq: int
    seed: int
    warmup: int
    pool_size: int
    renew_interval: int
    ema_m: float
    num_workers: int
    progress: bool
    loss: LossWeights
    config: dict[str, Any]
    validate: Any = None  # callable(model) -> metrics dict with "unsupervised"/"linear"


def selection_score(metrics: dict[str, Any]) -> float:
    """The authors' best-checkpoint criterion: cluster mIoU + accuracy + linear mIoU + accuracy."""
    u, lin = metrics["unsupervised"], metrics["linear"]
    return float(u["miou"] + u["accuracy"] + lin["miou"] + lin["accuracy"])


def _optimizers(model: HPModel, s: TrainSettings) -> dict[str, torch.optim.Optimizer]:
    return {
        "head": torch.optim.AdamW(model.head.parameters(), lr=s.lr_head, weight_decay=s.weight_decay),
        "projection": torch.optim.Adam(model.projection.parameters(), lr=s.lr_projection),
        "linear": torch.optim.Adam(model.linear_probe.parameters(), lr=s.lr_linear),
        "cluster": torch.optim.Adam(model.cluster_probe.parameters(), lr=s.lr_cluster),
    }


class _JsonlLog:
    """Append-only ``metrics.jsonl`` (main process only)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        if dist.is_main():
            with self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")


def fit(
    model: HPModel,
    train_set: Dataset[Any],
    settings: TrainSettings,
    device: torch.device,
) -> dict[str, Any]:
    """Train ``model`` with Hidden Positives; resume from ``out_dir/last.pt`` when present.

    Writes in ``settings.out_dir``: ``last.pt`` (full training state, for resuming),
    ``best.pt`` (the model of the best validation, or the final model without validation),
    ``metrics.jsonl`` and ``training_curve.png``. Returns a summary dict.
    """
    s = settings
    n_train = len(train_set)  # type: ignore[arg-type]
    out = s.out_dir
    out.mkdir(parents=True, exist_ok=True)
    model.to(device)
    rank, world = dist.rank(), dist.world_size()
    per_rank_batch = s.batch_size // world
    if per_rank_batch < 2:
        raise ValueError(f"train.batch_size={s.batch_size} over {world} processes leaves < 2 images per rank")
    if s.batch_size % world:
        raise HPSegError(
            f"train.batch_size={s.batch_size} is not divisible by the {world} processes: "
            f"use a multiple of {world} (each process takes batch_size / processes images)"
        )
    run_info = {"world_size": world, "per_rank_batch": per_rank_batch, "global_batch": per_rank_batch * world}
    log.info("batch %d = %d images per process × %d processes", s.batch_size, per_rank_batch, world)

    sampler = EpochSampler(n_train, per_rank_batch, s.seed, rank, world)
    iters_per_epoch = sampler.batches_per_epoch()
    if iters_per_epoch < 1:
        raise ValueError(
            f"the training set has {n_train} images, fewer than one batch of {s.batch_size}: "
            "lower train.batch_size"
        )
    max_iters = iters_per_epoch * s.epochs
    if s.max_iters is not None:
        max_iters = min(max_iters, s.max_iters)
    loader = DataLoader(
        train_set,
        batch_size=per_rank_batch,
        sampler=sampler,
        num_workers=s.num_workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    pool_gen = torch.Generator().manual_seed(s.seed + 7919 * (rank + 1))
    pool_sampler = EpochSampler(n_train, per_rank_batch, s.seed + 1, rank, world)
    pool_loader = DataLoader(train_set, batch_size=per_rank_batch, sampler=pool_sampler, num_workers=s.num_workers)

    objective = HPObjective(model, s.loss)
    step_module: nn.Module = objective
    if dist.is_distributed():
        step_module = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None
        )  # the objective's modules hold no buffers: the default buffer syncing is a no-op
    optimizers = _optimizers(model, s)
    scaler = grad_scaler(device, s.amp)
    log_file = _JsonlLog(out / "metrics.jsonl")

    state: dict[str, Any] = {"iteration": 0, "best_score": -math.inf, "best_iteration": -1, "best_metrics": None}
    pool_agnostic = torch.empty(0)
    pool_specific = torch.empty(0)
    last_path = out / "last.pt"
    if last_path.is_file():
        ckpt = torch.load(last_path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        for name, opt in optimizers.items():
            opt.load_state_dict(ckpt["optimizers"][name])
        scaler.load_state_dict(ckpt["scaler"])
        state.update(ckpt["state"])
        pool_agnostic, pool_specific = ckpt["pool_agnostic"].to(device), ckpt["pool_specific"].to(device)
        torch.set_rng_state(ckpt["rng_cpu"])
        pool_gen.set_state(ckpt["rng_pool"])
        if device.type == "cuda" and "rng_cuda" in ckpt:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
        log.info("resumed from %s at iteration %d", last_path, state["iteration"])

    model.train()
    if pool_agnostic.numel() == 0:
        log.info("building reference pools (%d images)", s.pool_size)
        pool_agnostic = collect_pool(
            model, pool_loader, s.pool_size, device, which="agnostic", dropout=s.loss.dropout, amp=s.amp,
            generator=pool_gen,
        )
        pool_specific = collect_pool(
            model, pool_loader, s.pool_size, device, which="specific", dropout=s.loss.dropout, amp=s.amp,
            generator=pool_gen,
        )

    def save_last() -> None:
        if not dist.is_main():
            return
        payload = {
            "model": model.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "scaler": scaler.state_dict(),
            "state": state,
            "pool_agnostic": pool_agnostic.cpu(),
            "pool_specific": pool_specific.cpu(),
            "rng_cpu": torch.get_rng_state(),
            "rng_pool": pool_gen.get_state(),
            "config": s.config,
        }
        if device.type == "cuda":
            payload["rng_cuda"] = torch.cuda.get_rng_state(device)
        atomic_torch_save(payload, last_path)

    def validate_and_select(epoch: int) -> None:
        if s.validate is None:
            return
        if dist.is_main():
            with eval_mode(model):
                metrics = s.validate(model)
            score = selection_score(metrics)
            record = {"iteration": state["iteration"], "epoch": epoch, "val": metrics, "score": score}
            log_file.write(record)
            improved = score >= state["best_score"]
            if improved:
                state.update(best_score=score, best_iteration=state["iteration"], best_metrics=metrics)
                save_checkpoint(out / "best.pt", model, config=s.config, extra={"metrics": metrics,
                                "iteration": state["iteration"]})
            log.info(
                "val @%d: unsupervised acc %.2f mIoU %.2f | linear acc %.2f mIoU %.2f%s",
                state["iteration"], metrics["unsupervised"]["accuracy"], metrics["unsupervised"]["miou"],
                metrics["linear"]["accuracy"], metrics["linear"]["miou"], "  (best)" if improved else "",
            )
        dist.barrier()

    progress = None
    if s.progress and dist.is_main():
        from tqdm.auto import tqdm

        progress = tqdm(total=max_iters, initial=state["iteration"], desc="train", unit="it", dynamic_ncols=True)

    def _loop() -> None:
        nonlocal pool_specific
        while state["iteration"] < max_iters:
            it = state["iteration"]
            epoch, start_batch = divmod(it, iters_per_epoch)
            sampler.set_epoch(epoch, start_batch)
            for batch in loader:
                it = state["iteration"]
                if it >= max_iters:
                    break
                lam = lambda_schedule(it, s.warmup, max_iters)
                i = it - epoch * iters_per_epoch  # batch index within the epoch (the authors' count)
                if i % s.renew_interval == 0 and i != 0:
                    pool_sampler.set_epoch(it // s.renew_interval)  # fresh images each renewal
                    pool_specific = collect_pool(
                        model, pool_loader, s.pool_size, device, which="specific", dropout=s.loss.dropout,
                        amp=s.amp, generator=pool_gen,
                    )
                label = batch["label"].to(device, non_blocking=True)
                # frozen backbone: features and last-block attention logits (or their cached copies)
                feats, attn_logits, feats_aug = backbone_outputs(model, batch, device, amp=s.amp,
                                                                 need_aug=s.loss.alpha > 0)
                with autocast(device, s.amp):
                    loss, parts = step_module(feats, attn_logits, feats_aug, label, pool_agnostic, pool_specific, lam)
                # EMA after the forward that used it, before the update (as the authors' featurizer)
                model.ema_head.ema_update(model.head, s.ema_m)

                for opt in optimizers.values():
                    opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizers["head"])
                grad_norm = nn.utils.clip_grad_norm_(model.head.parameters(), s.grad_clip)
                for opt in optimizers.values():
                    scaler.step(opt)
                scaler.update()
                state["iteration"] = it + 1

                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss at iteration {it}: {float(loss)}")
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{float(loss.detach()):.3f}", lam=f"{lam:.2f}")
                if it % s.log_freq == 0 or it + 1 == max_iters:
                    record = {
                        "iteration": it,
                        "epoch": epoch,
                        "loss": float(loss.detach()),
                        **{k: float(v) for k, v in parts.items()},
                        "lambda": lam,
                        "grad_norm": float(grad_norm),
                        "seconds": round(time.perf_counter() - t0, 3),
                    }
                    log_file.write(record)
                end_of_epoch = i + 1 == iters_per_epoch
                if (i + 1) % s.valid_freq == 0 or end_of_epoch or it + 1 == max_iters:
                    validate_and_select(epoch)
                    save_last()

    t0 = time.perf_counter()
    try:
        _loop()
    except KeyboardInterrupt:
        log.warning("interrupted at iteration %d: saving %s to resume from", state["iteration"], last_path)
        save_last()
        raise
    if progress is not None:
        progress.close()

    if dist.is_main():
        if s.validate is None or not (out / "best.pt").is_file():
            save_checkpoint(out / "best.pt", model, config=s.config, extra={"iteration": state["iteration"]})
        save_checkpoint(out / "final.pt", model, config=s.config, extra={"iteration": state["iteration"]})
        plot_training_curve(out / "metrics.jsonl", out / "training_curve.png")
        summary = {**_summary(state, max_iters, t0), **run_info}
        atomic_write_text(out / "train_summary.json", json.dumps(summary, indent=2))
    dist.barrier()
    return {**_summary(state, max_iters, t0), **run_info}


def _summary(state: dict[str, Any], max_iters: int, t0: float) -> dict[str, Any]:
    return {
        "iterations": state["iteration"],
        "max_iters": max_iters,
        "best_iteration": state["best_iteration"],
        "best_score": state["best_score"] if math.isfinite(state["best_score"]) else None,
        "best_metrics": state["best_metrics"],
        "seconds": round(time.perf_counter() - t0, 2),
    }


def plot_training_curve(jsonl: Path, png: Path) -> None:
    """Loss parts and validation mIoU against iterations, from ``metrics.jsonl``."""
    if not jsonl.is_file():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_rows: list[dict[str, Any]] = []
    val_rows: list[dict[str, Any]] = []
    for line in jsonl.read_text().splitlines():
        row = json.loads(line)
        (val_rows if "val" in row else train_rows).append(row)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for key in ("loss", "loss_hp", "loss_consistency", "loss_linear", "loss_cluster"):
        pts = [(r["iteration"], r[key]) for r in train_rows if key in r]
        if pts:
            axes[0].plot(*zip(*pts), label=key)
    axes[0].set_xlabel("iteration")
    axes[0].set_title("training losses")
    axes[0].legend(fontsize=7)
    for head in ("unsupervised", "linear"):
        pts = [(r["iteration"], r["val"][head]["miou"]) for r in val_rows]
        if pts:
            axes[1].plot(*zip(*pts), marker="o", label=f"{head} mIoU")
    axes[1].set_xlabel("iteration")
    axes[1].set_ylabel("%")
    axes[1].set_title("validation")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png)
