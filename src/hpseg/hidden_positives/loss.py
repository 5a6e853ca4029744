"""The Hidden Positives contrastive loss, GHP + LHP (docs/method.md §5), and the λ schedule.

How the loss is evaluated. With ``w = A + λ·T`` and ``W_i = Σ_j w_ij``, the reference's
per-image term ``mean_i(mean_pos[i]·pnm[i])`` over the ``K`` kept anchors of an image equals
``Σ_i Σ_j w_ij·log_p[i,j] / Σ_i W_i`` (reweighting on) or ``(1/K) Σ_i Σ_j w_ij·log_p[i,j] / W_i``
(off): every kept anchor gets a coefficient ``c_i`` and the loss is linear in the per-anchor
sums ``Σ_j w_ij·log_p[i,j]``. Their gradient with respect to ``logit[i,j]`` is
``c_i·(w_ij − W_i·softmax_den(i)_j)``, so the exact gradient of a chunk of anchors is available
while the chunk is being evaluated. :class:`_HiddenPositiveLoss` accumulates it there and keeps
only ``(N, D)`` gradients for the backward pass: no ``N×N`` matrix is ever retained by autograd
and nothing is recomputed. Anchors that are dropped (no task-agnostic positive) never enter a
logarithm, so neither values nor gradients can become NaN, even with ``rho = 0`` or an image
without any kept anchor (that image contributes 0).

Three paths evaluate the same sums (:data:`PATHS`):

* ``"dense"`` — per chunk, ``(M, N)`` boolean masks (:func:`~.masks.positive_masks`) and dense
  logits, softmax and gradient products (:func:`~.dense.dense_contrastive_chunk`): eight ``(M × N)``
  products per chunk, the reference the tests compare with;
* ``"sparse"`` — the positives of the batch as pair lists (:func:`~.masks.positive_pair_keys`:
  the two mask products, over the upper triangle only), the kept negatives drawn as index sets
  (:func:`~.negatives.negative_keys`), then per chunk the logits, log-sum-exps, weighted sums
  and both gradient products on the kept pairs alone (:mod:`~.sparse`). ``w`` and the softmax
  terms live on ``A ∪ T ∪ keep``, about ``ρ + 2/P`` of the pairs, so that is where the work goes;
* ``"fused"`` — two tiled Triton passes (:mod:`~.fused`): masks, kept negatives, online
  log-sum-exps and the gradient in registers, no ``(M, N)`` block in memory, bitwise deterministic.
  Needs triton and CUDA tensors (or ``TRITON_INTERPRET=1`` on CPU, for tests); opt-in: ``"auto"``
  does not pick it until a GPU measurement shows it faster than ``"dense"``.

``"auto"`` picks the sparse path on CPU while the kept negatives are sparse (ρ ≤
:data:`~.budget.SPARSE_MAX_KEEP_DENSITY`) and falls back to the dense one when the positives turn out not
to be rare; on CUDA it picks the dense path (float16 tensor-core products; the sparse path runs
there too but has not been measured on a GPU). Anchor chunks are sized from a memory budget
(:mod:`~.budget`).

Candidates across processes (``candidates``): ``"local"`` — the rows given are the batch;
``"global"`` — in a process group, the rows given are this process's share of a global batch,
its anchors, against the candidates of the whole global batch (:mod:`~.candidates`): the chunk
loop below runs over the anchors' row range only (``_LossOptions.anchor_images``; another
evaluation path needs only that range), and the value is ``world ×`` the share.

The kept negatives are a pure function of ``(seed, step, image, anchor, candidate)``
(:mod:`~.negatives`): the same on every device, chunking, path and number of processes. Nothing in a forward or backward
reads a value back to the host on the dense path: the batch statistics stay on the device until
:attr:`HiddenPositiveLoss.stats` is read (e.g. when a log line is written).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from hpseg import distributed as dist
from hpseg.errors import HPSegError
from hpseg.hidden_positives.budget import PATHS, LossPlan, default_memory_gb, plan_batch
from hpseg.hidden_positives.candidates import (
    CANDIDATES,
    gather_candidates,
    summed_over_ranks,
    use_global_candidates,
)
from hpseg.hidden_positives.dense import anchor_coefficients, compiled_dense_chunk_terms, dense_chunk_terms
from hpseg.hidden_positives.fused import draw_keep_bits, fused_chunk_terms, keep_bits_from_mask
from hpseg.hidden_positives.inputs import check_loss_inputs
from hpseg.hidden_positives.negatives import negative_keep_mask, negative_keys
from hpseg.hidden_positives.pools import default_matmul_dtype, pool_thresholds
from hpseg.hidden_positives.sparse import (
    chunk_pairs,
    explicit_negative_keys,
    slice_keys,
    sparse_contrastive_chunk,
)

log = logging.getLogger(__name__)

#: The loss is scaled by ``tau / BASE_TEMPERATURE`` (SupCon convention kept by the authors).
BASE_TEMPERATURE = 0.07
#: Former fixed anchor chunk (images); now chosen from ``memory_gb`` unless ``chunk_images`` is given.
DEFAULT_CHUNK_IMAGES = 8

def lambda_schedule(it: int, warmup: int, max_iters: int) -> float:
    """Weight λ of task-specific positives at training iteration ``it`` (docs/method.md §5).

    0 while ``it <= warmup``, then ``(it - warmup) / (max_iters - warmup)``, rising linearly to 1
    at ``it == max_iters``. Like the authors' code there is no clamp above 1; when
    ``max_iters <= warmup`` (no ramp possible) λ is 1 after the warm-up.
    """
    if it <= warmup:
        return 0.0
    if max_iters <= warmup:
        return 1.0
    return (it - warmup) / (max_iters - warmup)


# ------------------------------------------------------------------------------------------
# the per-chunk sums
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LossOptions:
    num_images: int  # images of the candidates (the global batch when gathered)
    anchor_images: tuple[int, int]  # this call's anchors: images [first, stop) of the candidates
    world: int  # the value is world × this share (1 unless gathered)
    tau: float
    lam: float
    rho: float
    reweight: bool
    chunk_images: int | None
    memory_bytes: float
    path: str
    matmul_dtype: torch.dtype
    seed: int
    step: int
    compile: bool
    need_grad: tuple[bool, bool]
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Batch:
    """The per-batch tensors every chunk reads (detached, float32) and the gradient accumulators."""

    embeddings: tuple[torch.Tensor, torch.Tensor]  # z, z_lhp (N, D)
    grads: list[torch.Tensor | None]  # their gradients (N, D), or None where not needed
    f: torch.Tensor  # backbone features (N, F)
    s: torch.Tensor  # EMA codes (N, D')
    thresholds: tuple[torch.Tensor, torch.Tensor]  # r_agnostic, r_specific (N,)
    negative_keep: torch.Tensor | None
    per_image: int
    scale: float  # −(τ/0.07)/(2B): the images' mean over both branches

    @property
    def n(self) -> int:
        return self.f.shape[0]


def _sparse_chunk(
    batch: _Batch, plan: LossPlan, rows: slice, images: int, opt: _LossOptions
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sparse path: the chunk's contribution to the loss, its counts ``(A, T, kept, |den|, truncated)``
    and its number of pairs."""
    n, m = batch.n, rows.stop - rows.start
    a_c = slice_keys(plan.agnostic_keys, rows, n)
    t_c = slice_keys(plan.specific_keys, rows, n)
    assert a_c is not None
    count_a = torch.bincount(a_c.div(n, rounding_mode="floor"), minlength=m).to(torch.float32)
    count_t = torch.zeros_like(count_a)
    if t_c is not None:
        count_t = torch.bincount(t_c.div(n, rounding_mode="floor"), minlength=m).to(torch.float32)
    weight_sum = count_a + opt.lam * count_t
    kept = count_a > 0
    coef = anchor_coefficients(kept, weight_sum, images, opt.reweight)
    if batch.negative_keep is not None:
        negatives, truncated = explicit_negative_keys(batch.negative_keep, rows, n), count_a.new_zeros(())
    else:
        negatives, truncated = negative_keys(rows, batch.per_image, n, rho=opt.rho, seed=opt.seed, step=opt.step,
                                             device=count_a.device)
    pairs = chunk_pairs(a_c, t_c, negatives, kept, m, n, opt.lam)
    total = sum(
        sparse_contrastive_chunk(e, rows, pairs, weight_sum, coef, kept, opt.tau, grad, batch.scale)
        for e, grad in zip(batch.embeddings, batch.grads)
    )
    counts = torch.stack([count_a.sum(), count_t.sum(), kept.sum(), count_a.new_tensor(pairs.denominator_size),
                          truncated.to(count_a.dtype)])
    return torch.as_tensor(total), counts.double(), pairs.count


def _dense_chunk(batch: _Batch, rows: slice, images: int, opt: _LossOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense path: the chunk's contribution to the loss and its counts ``(A, T, kept, |den|, truncated)``."""
    keep: torch.Tensor | None
    if batch.negative_keep is not None:
        keep, truncated = batch.negative_keep[rows], batch.f.new_zeros((), dtype=torch.int64)
    else:
        keep, truncated = negative_keep_mask(rows, batch.per_image, batch.n, rho=opt.rho, seed=opt.seed,
                                             step=opt.step, device=batch.f.device)
    r_ag, r_sp = batch.thresholds
    z, z_lhp = batch.embeddings
    terms = compiled_dense_chunk_terms() if opt.compile else dense_chunk_terms
    # compiled: λ as a 0-dim tensor (dynamo guards on a float's value) and a static flag, two graphs a run
    lam: float | torch.Tensor = torch.full((), opt.lam, dtype=torch.float32, device=z.device) if opt.compile else opt.lam
    total, counts, grads = terms(
        (z[rows], z_lhp[rows]), batch.embeddings, batch.f[rows], batch.f, batch.s[rows], batch.s,
        (r_ag[rows], r_sp[rows]), (r_ag, r_sp), torch.arange(rows.start, rows.stop, device=z.device), keep,
        images=images, lam=lam, tau=opt.tau, reweight=opt.reweight, dtype=opt.matmul_dtype,
        need_grad=(batch.grads[0] is not None, batch.grads[1] is not None), grad_scale=batch.scale,
        with_specific=opt.lam != 0.0,
    )
    for acc, grad in zip(batch.grads, grads):
        if acc is not None and grad is not None:
            acc[rows] += grad[0]
            acc += grad[1]
    return total, torch.cat([counts, truncated.to(counts.dtype).view(1)])


def _fused_chunk(batch: _Batch, rows: slice, images: int, opt: _LossOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused path (:mod:`~.fused`): the chunk's contribution to the loss and its counts
    ``(A, T, kept, |den|, truncated)``; its gradients (all ``N`` rows) are added to the accumulators."""
    if batch.negative_keep is not None:
        keep, truncated = keep_bits_from_mask(batch.negative_keep[rows]), batch.f.new_zeros((), dtype=torch.int64)
    else:
        keep, truncated = draw_keep_bits(rows, batch.per_image, batch.n, rho=opt.rho, seed=opt.seed, step=opt.step,
                                         device=batch.f.device)
    total, counts, grads = fused_chunk_terms(
        rows, batch.embeddings, batch.f, batch.s, batch.thresholds, keep, images=images, lam=opt.lam, tau=opt.tau,
        reweight=opt.reweight, dtype=opt.matmul_dtype,
        need_grad=(batch.grads[0] is not None, batch.grads[1] is not None), grad_scale=batch.scale,
    )
    for acc, grad in zip(batch.grads, grads):
        if acc is not None and grad is not None:
            acc += grad
    return total, torch.cat([counts, truncated.to(counts.dtype).view(1)])


class _HiddenPositiveLoss(torch.autograd.Function):
    """Chunked HP loss whose gradients are computed alongside the value (see module docstring)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        z: torch.Tensor,
        z_lhp: torch.Tensor,
        f: torch.Tensor,
        s: torch.Tensor,
        r_ag: torch.Tensor,
        r_sp: torch.Tensor,
        negative_keep: torch.Tensor | None,
        opt: _LossOptions,
    ) -> torch.Tensor:
        """``z``, ``z_lhp`` ``(N, D)``, ``f`` ``(N, F)``, ``s`` ``(N, D')`` (no gradient), the pool
        thresholds ``r_ag``, ``r_sp`` ``(N,)``: the candidates; the anchors are the images
        ``opt.anchor_images`` of them."""
        n, dtype, with_specific = z.shape[0], opt.matmul_dtype, opt.lam != 0.0
        embeddings = (z.detach().float(), z_lhp.detach().float())
        per_image = n // opt.num_images
        first_image, stop_image = opt.anchor_images
        batch = _Batch(
            embeddings=embeddings,
            grads=[torch.zeros_like(x) if need else None for x, need in zip(embeddings, opt.need_grad)],
            f=f.detach(), s=s.detach(), thresholds=(r_ag, r_sp), negative_keep=negative_keep, per_image=per_image,
            # loss = −(τ/0.07)/2 · mean over images of the per-image terms, for z and z_lhp (× world: the
            # mean over processes of their shares is the global loss)
            scale=-(opt.tau / BASE_TEMPERATURE) / (2.0 * opt.num_images) * opt.world,
        )
        anchors = slice(first_image * per_image, stop_image * per_image)
        plan = plan_batch(opt.path, batch.f, batch.s, (r_ag, r_sp), negative_keep, num_images=opt.num_images,
                          rho=opt.rho, with_specific=with_specific, memory_bytes=opt.memory_bytes,
                          chunk_images=opt.chunk_images, matmul_dtype=dtype, anchor_rows=anchors)
        total = torch.zeros((), dtype=torch.float32, device=z.device)
        counts = torch.zeros(5, dtype=torch.float64, device=z.device)  # A, T, kept, |den|, truncated
        kept_pairs = 0
        for first in range(first_image, stop_image, plan.chunk_images):
            images = min(plan.chunk_images, stop_image - first)
            rows = slice(first * batch.per_image, (first + images) * batch.per_image)
            if plan.path == "sparse":
                part, part_counts, pairs = _sparse_chunk(batch, plan, rows, images, opt)
                kept_pairs += pairs
            elif plan.path == "fused":
                part, part_counts = _fused_chunk(batch, rows, images, opt)
            else:
                part, part_counts = _dense_chunk(batch, rows, images, opt)
            total += part
            counts += part_counts
        # statistics stay on the device (no host synchronisation); loss_stats() reads them
        opt.stats.update(counts=counts, n=n, anchors=anchors.stop - anchors.start, distributed=opt.world > 1,
                         kept_pairs=kept_pairs if plan.path == "sparse" else None, path=plan.path,
                         chunk_images=plan.chunk_images)
        ctx.save_for_backward(*(g.to(x.dtype) if g is not None else None for g, x in zip(batch.grads, (z, z_lhp))))
        return (total * batch.scale).to(z.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        grad_z, grad_z_lhp = (None if g is None else grad_output * g for g in ctx.saved_tensors)
        return grad_z, grad_z_lhp, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------
# validation, functional form and module
# ------------------------------------------------------------------------------------------


def _hidden_positive_loss(
    z: torch.Tensor,
    z_lhp: torch.Tensor,
    feats: torch.Tensor,
    code_ema: torch.Tensor,
    pool_agnostic: torch.Tensor,
    pool_specific: torch.Tensor,
    *,
    num_images: int,
    tau: float,
    lam: float,
    rho: float,
    negative_keep: torch.Tensor | None,
    reweight: bool,
    chunk_images: int | None,
    memory_gb: float | None,
    path: str,
    seed: int,
    step: int,
    matmul_dtype: torch.dtype | None,
    compile_chunks: bool = False,
    candidates: str = "local",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The loss and its raw batch statistics (:func:`loss_stats`); the one implementation."""
    if candidates not in CANDIDATES:
        raise HPSegError(f"hidden_positive_loss: candidates must be local or global, got {candidates!r}")
    gather = use_global_candidates(candidates)
    keep_rows = z.shape[0] * dist.world_size() if gather else None
    check_loss_inputs(z, z_lhp, feats, code_ema, pool_agnostic, pool_specific, negative_keep, num_images, tau,
                       lam, rho, chunk_images, memory_gb, path, keep_rows=keep_rows)
    budget_gb = memory_gb if memory_gb is not None else default_memory_gb(z.device)
    dtype = matmul_dtype or default_matmul_dtype(z.device)
    f, s = feats.detach().float(), code_ema.detach().float()
    with torch.autocast(z.device.type, enabled=False):
        r_ag = pool_thresholds(f, pool_agnostic.detach(), matmul_dtype=dtype)
        r_sp = pool_thresholds(s, pool_specific.detach(), matmul_dtype=dtype) if lam != 0.0 else r_ag
    inputs: tuple[torch.Tensor, ...] = (z, z_lhp, f, s, r_ag, r_sp)
    images, anchors, world = num_images, (0, num_images), 1
    if gather:
        inputs, images, anchors, world = gather_candidates(z, z_lhp, f, s, r_ag, r_sp, num_images, dtype)
    opt = _LossOptions(
        num_images=images,
        anchor_images=anchors,
        world=world,
        tau=float(tau),
        lam=float(lam),
        rho=float(rho),
        reweight=bool(reweight),
        chunk_images=None if chunk_images is None else int(chunk_images),
        memory_bytes=float(budget_gb) * 2**30,
        path=path,
        matmul_dtype=dtype,
        seed=int(seed),
        step=int(step),
        compile=bool(compile_chunks),
        need_grad=(
            torch.is_grad_enabled() and z.requires_grad,
            torch.is_grad_enabled() and z_lhp.requires_grad,
        ),
    )
    # an enclosing autocast region must not lower the precision of our float32 reductions: the
    # products' dtype is chosen explicitly above
    with torch.autocast(z.device.type, enabled=False):
        out = _HiddenPositiveLoss.apply(*inputs, negative_keep, opt)
    return out, dict(opt.stats)


def hidden_positive_loss(
    z: torch.Tensor,
    z_lhp: torch.Tensor,
    feats: torch.Tensor,
    code_ema: torch.Tensor,
    pool_agnostic: torch.Tensor,
    pool_specific: torch.Tensor,
    *,
    num_images: int,
    tau: float,
    lam: float,
    rho: float = 1.0,
    negative_keep: torch.Tensor | None = None,
    reweight: bool = True,
    chunk_images: int | None = None,
    memory_gb: float | None = None,
    path: str = "auto",
    seed: int = 0,
    step: int = 0,
    generator: torch.Generator | None = None,
    matmul_dtype: torch.dtype | None = None,
    compile_chunks: bool = False,
    candidates: str = "local",
) -> torch.Tensor:
    """The Hidden Positives contrastive loss, GHP + LHP (docs/method.md §4–5), ``(L(z) + L(z_lhp))/2``.

    Functional form of :class:`HiddenPositiveLoss` (same computation, without the statistics).

    For ``e ∈ {z, z_lhp}``, anchors ``i`` and candidates ``j ≠ i`` over the whole batch:
    ``log_p[i,j] = e_i·e_j/τ − log Σ_{j∈den(i)} exp(e_i·e_j/τ)``, ``den(i) = A_i | keep_i``,
    ``w = A + λT``; anchors without task-agnostic positives are dropped; per image
    ``−(τ/0.07)·mean_i(Σ_j w_ij·log_p[i,j] / W_i · pnm_i)``, ``pnm_i = W_i / mean_k W_k``
    (1 without reweighting); images are averaged (an image with no kept anchor adds 0).
    Both branches share masks, weights and denominators.

    Args:
        z: projected, L2-normalised codes ``(N, D)``, ``N = num_images·S²``, image by image.
        z_lhp: the same for the LHP-propagated codes ``(N, D)``.
        feats: L2-normalised (dropped-out) backbone features ``f`` ``(N, F)``; no gradient.
        code_ema: L2-normalised EMA-head codes ``s`` ``(N, D')``; no gradient.
        pool_agnostic: task-agnostic pool ``(P, F)``; pool_specific: task-specific pool ``(P', D')``.
        num_images: images in the batch (B).
        tau: temperature τ. lam: weight λ of task-specific positives (see :func:`lambda_schedule`).
        rho: probability that a non-positive candidate is kept in the denominator (i.i.d. per
            anchor–candidate pair, fresh for every ``(seed, step)``; :mod:`~.negatives`).
        negative_keep: explicit ``(N, N)`` bool keep matrix replacing the Bernoulli(rho) draw.
        reweight: the authors' ``pnm`` reweighting of anchors.
        chunk_images: images whose anchors are processed together; ``None`` (default) chooses it
            from ``memory_gb``. The result does not depend on it.
        memory_gb: budget of the loss's working set in GiB; ``None``: :func:`default_memory_gb`.
        path: ``"auto"`` (default), ``"dense"``, ``"sparse"`` or ``"fused"`` (module docstring);
            the result does not depend on it (up to rounding).
        seed, step: the negatives are a pure function of ``(seed, step, image, anchor,
            candidate)``: pass the run's seed and the training iteration.
        generator: convenience for callers without a step counter: when given, ``seed`` is drawn
            from it (one integer per call), so every call draws fresh negatives.
        matmul_dtype: dtype of the similarity products; default float16 on CUDA (the
            authors' autocast; dense gradient products then use bfloat16, fused ones float16 with
            a power-of-two scale), float32 elsewhere.
        compile_chunks: run the dense path's chunks through ``torch.compile`` (fused element-wise
            kernels; :func:`~.dense.compiled_dense_chunk_terms`); same values up to rounding.
        candidates: ``"local"`` (default): the rows given are the whole batch. ``"global"``: in a
            process group of ``w > 1`` processes the rows given are this process's share of a
            global batch of ``w·num_images`` images (every rank calls it, with the same sizes: a
            collective, in the backward pass too); the anchors are these rows, the candidates the
            whole global batch (module docstring). ``negative_keep`` is then ``(w·N, w·N)`` and
            ``seed`` must be the same on every rank. Without a process group, as ``"local"``.

    Returns:
        Scalar loss. Differentiable w.r.t. ``z`` and ``z_lhp`` (first order only). With
        ``candidates="global"`` across ``w`` processes: ``w ×`` this process's share of the
        global loss — the mean over processes is the loss (and gradient) of one process holding
        the global batch; the gradient reaching this process's ``z`` is ``w ×`` ∂loss/∂z, which
        DistributedDataParallel's averaging over processes brings back to the exact gradient.
    """
    loss, _ = _hidden_positive_loss(
        z, z_lhp, feats, code_ema, pool_agnostic, pool_specific, num_images=num_images, tau=tau, lam=lam, rho=rho,
        negative_keep=negative_keep, reweight=reweight, chunk_images=chunk_images, memory_gb=memory_gb, path=path,
        seed=_seed_from(generator, seed), step=step, matmul_dtype=matmul_dtype, compile_chunks=compile_chunks,
        candidates=candidates,
    )
    return loss


def _seed_from(generator: torch.Generator | None, seed: int) -> int:
    """``seed``, or a fresh one drawn from ``generator`` (one integer; a host read on its device)."""
    if generator is None:
        return int(seed)
    return int(torch.randint(2**62, (1,), generator=generator, device=generator.device).item())


def loss_stats(raw: dict[str, Any]) -> dict[str, Any]:
    """Plain Python statistics of one batch from the loss's raw (on-device) record.

    Reading them synchronises with the device once; do it when a log line is written, not at
    every step. Keys: see :attr:`HiddenPositiveLoss.stats`. A record of one process's share of a
    global batch (``candidates="global"``) describes its anchors; :func:`summed_over_ranks`
    turns the shares' records into the global batch's.
    """
    if not raw:
        return {}
    a_total, t_total, kept_total, den_total, truncated = raw["counts"].tolist()
    n, pairs, anchors = raw["n"], raw["kept_pairs"], raw.get("anchors", raw["n"])
    return {
        "positives_per_anchor": a_total / anchors,
        "specific_per_anchor": t_total / anchors,
        "kept_anchor_fraction": kept_total / anchors,
        "denominator_fraction": den_total / anchors / n,
        "pair_fraction": pairs / anchors / n if pairs is not None else float("nan"),
        "negative_draw_truncated": int(truncated),
        "path": raw["path"],
        "chunk_images": raw["chunk_images"],
    }


class HiddenPositiveLoss(nn.Module):
    """The Hidden Positives contrastive loss (GHP + LHP, docs/method.md §4–5) as a module.

    ``loss = HiddenPositiveLoss(tau=0.8, rho=0.02, seed=run_seed)(z, z_lhp, f, s, pool_ag, pool_sp,
    num_images=B, lam=λ, step=iteration)``; afterwards :attr:`stats` describes that batch.

    Args:
        tau: temperature τ. rho: keep probability of a negative in the denominator.
        reweight: the authors' ``pnm`` anchor reweighting.
        memory_gb: budget of the loss's working set in GiB (``None``:
            :func:`~hpseg.hidden_positives.budget.default_memory_gb`); sets the anchor chunk.
        chunk_images: explicit anchor chunk in images; overrides ``memory_gb``.
        path: ``"auto"``, ``"dense"``, ``"sparse"`` or ``"fused"`` (see :mod:`~hpseg.hidden_positives.loss`).
        matmul_dtype: dtype of the similarity products (default float16 on CUDA, float32 elsewhere).
        seed: the run's seed of the negatives draw (with the ``step`` of each forward).
        compile_chunks: the dense path's chunks through ``torch.compile`` (see :func:`hidden_positive_loss`).
        candidates: ``"local"`` or ``"global"`` (see :func:`hidden_positive_loss`): with
            ``"global"`` in a process group, every forward, backward and reading of :attr:`stats`
            is a collective.

    Attributes:
        stats: plain Python values about the last batch, read from the device when accessed
            (reading synchronises once; a training loop reads it when it logs):
            ``positives_per_anchor`` (mean number of task-agnostic positives per anchor),
            ``specific_per_anchor`` (task-specific ones; 0 when λ = 0),
            ``kept_anchor_fraction`` (anchors with at least one task-agnostic positive),
            ``denominator_fraction`` (mean ``|den(i)| / N``), ``pair_fraction`` (pairs evaluated
            by the sparse path per ``N²``; NaN on the dense path), ``negative_draw_truncated``
            (images whose negatives stream ran out: 0 in practice, :mod:`~.negatives`),
            ``path`` (``"dense"``, ``"sparse"`` or ``"fused"``) and ``chunk_images``. With
            ``candidates="global"`` across processes they describe the global batch (the
            ranks' counts summed: reading them is a collective, every rank reads them).
    """

    def __init__(
        self,
        tau: float,
        rho: float,
        *,
        reweight: bool = True,
        memory_gb: float | None = None,
        chunk_images: int | None = None,
        path: str = "auto",
        matmul_dtype: torch.dtype | None = None,
        seed: int = 0,
        compile_chunks: bool = False,
        candidates: str = "local",
    ) -> None:
        super().__init__()
        if path not in PATHS:
            raise HPSegError(f"HiddenPositiveLoss: path must be one of {', '.join(PATHS)}, got {path!r}")
        if candidates not in CANDIDATES:
            raise HPSegError(f"HiddenPositiveLoss: candidates must be local or global, got {candidates!r}")
        self.candidates = candidates
        self.tau = float(tau)
        self.rho = float(rho)
        self.reweight = bool(reweight)
        self.memory_gb = memory_gb
        self.chunk_images = chunk_images
        self.path = path
        self.matmul_dtype = matmul_dtype
        self.seed = int(seed)
        self.compile_chunks = bool(compile_chunks)
        self._raw_stats: dict[str, Any] = {}

    @property
    def stats(self) -> dict[str, Any]:
        """The last batch's statistics as plain Python values (see the class docstring)."""
        return loss_stats(summed_over_ranks(self._raw_stats))

    def extra_repr(self) -> str:
        return (
            f"tau={self.tau}, rho={self.rho}, reweight={self.reweight}, memory_gb={self.memory_gb}, "
            f"chunk_images={self.chunk_images}, path={self.path!r}, seed={self.seed}, compile_chunks={self.compile_chunks}, "
            f"candidates={self.candidates!r}"
        )

    def forward(
        self,
        z: torch.Tensor,
        z_lhp: torch.Tensor,
        feats: torch.Tensor,
        code_ema: torch.Tensor,
        pool_agnostic: torch.Tensor,
        pool_specific: torch.Tensor,
        *,
        num_images: int,
        lam: float,
        step: int = 0,
        negative_keep: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The scalar loss ``(L(z) + L(z_lhp)) / 2``.

        Args:
            z: projected, L2-normalised codes ``(N, D)``, ``N = num_images·S²``, image by image.
            z_lhp: the LHP-propagated codes through the same projection ``(N, D)``.
            feats: L2-normalised backbone features ``f`` ``(N, F)`` (no gradient).
            code_ema: L2-normalised EMA-head codes ``s`` ``(N, D')`` (no gradient).
            pool_agnostic: ``(P, F)``; pool_specific: ``(P', D')`` reference pools.
            num_images: images in the batch. lam: weight λ of task-specific positives.
            step: the training iteration (the negatives are a function of ``(seed, step)``).
            negative_keep: explicit ``(N, N)`` bool keep matrix (parity checks).
            generator: when given, the seed of this call is drawn from it instead.
        """
        loss, self._raw_stats = _hidden_positive_loss(
            z, z_lhp, feats, code_ema, pool_agnostic, pool_specific, num_images=num_images, tau=self.tau, lam=lam,
            rho=self.rho, negative_keep=negative_keep, reweight=self.reweight, chunk_images=self.chunk_images,
            memory_gb=self.memory_gb, path=self.path, seed=_seed_from(generator, self.seed), step=step,
            matmul_dtype=self.matmul_dtype, compile_chunks=self.compile_chunks, candidates=self.candidates,
        )
        return loss
