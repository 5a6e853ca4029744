"""A straightforward per-image formulation of the HP loss and of LHP (docs/method.md §4–6).

This is the baseline for ``bench_loss.py`` and an independent check for the tests. It follows
the structure of the authors' implementation in spirit (our own code): one Python iteration per
image, each building its ``(S², N)`` similarity block, float masks, ``exp · mask``, a plain
``log(sum)``, boolean row selection of the kept anchors and the ``pnm`` reweighting, summed over
images and differentiated by autograd (which therefore keeps every image's blocks until the
backward pass). On CUDA the products run under float16 autocast, as the authors' code does.

Known behaviours it shares with the authors' code on purpose (``hpseg.hidden_positives`` avoids
them): an image without any anchor that has a task-agnostic positive gives a NaN loss (mean of
an empty tensor), and an anchor whose denominator set is empty (possible with ``rho = 0``)
gives NaN gradients even though it is dropped from the loss (``log(0) = −inf`` times 0 in
backward).
"""

from __future__ import annotations

import contextlib

import torch

BASE_TEMPERATURE = 0.07


def _amp(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """float16 autocast on CUDA (the authors' setting), nothing elsewhere."""
    if t.is_cuda:
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def reference_hidden_positive_loss(
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
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """HP loss ``(L(z) + L(z_lhp)) / 2``, one image at a time (see the module docstring).

    Shapes as in :func:`hpseg.hidden_positives.hidden_positive_loss`: ``z, z_lhp, code_ema``
    ``(N, D)``, ``feats`` ``(N, F)``, pools ``(P, F)`` and ``(P, D)``, ``N = num_images·S²``.
    Without ``negative_keep`` one ``(S², N)`` Bernoulli(rho) matrix is drawn and shared by all
    images, as the authors do.
    """
    n = z.shape[0]
    per_image = n // num_images
    device = z.device
    with _amp(z):
        r_ag = torch.max(feats @ pool_agnostic.t(), dim=1).values  # (N,)
        r_sp = torch.max(code_ema @ pool_specific.t(), dim=1).values
    if negative_keep is None:
        shared_keep = torch.rand(per_image, n, generator=generator, device=device) < rho
    loss = z.new_zeros(())
    for b in range(num_images):
        lo, hi = b * per_image, (b + 1) * per_image
        not_self = torch.ones(per_image, n, device=device)
        not_self[torch.arange(per_image, device=device), torch.arange(lo, hi, device=device)] = 0.0
        keep = negative_keep[lo:hi] if negative_keep is not None else shared_keep

        with _amp(z):
            sim_f = feats[lo:hi] @ feats.t()  # (S², N)
            sim_s = code_ema[lo:hi] @ code_ema.t()
        agnostic = ((sim_f > r_ag[lo:hi].unsqueeze(1)) | (sim_f > r_ag.unsqueeze(0))).float()
        denominator = ((agnostic > 0) | keep).float() * not_self
        agnostic = agnostic * not_self
        specific = ((sim_s > r_sp[lo:hi].unsqueeze(1)) | (sim_s > r_sp.unsqueeze(0))).float() * not_self

        kept = torch.nonzero(agnostic.sum(dim=1) != 0).view(-1)
        weights = agnostic[kept] + lam * specific[kept]
        if reweight:
            pnm = weights.sum(dim=1)
            pnm = pnm / pnm.sum()
            pnm = pnm / pnm.mean()
        else:
            pnm = torch.ones(kept.numel(), device=device)

        for e in (z, z_lhp):
            with _amp(z):
                logits = (e[lo:hi] @ e.t()) / tau
            logits = logits.float()
            logits = logits - logits.max(dim=1, keepdim=True).values.detach()
            log_prob = logits - torch.log((torch.exp(logits) * denominator).sum(dim=1, keepdim=True))
            mean_pos = (weights * log_prob[kept]).sum(dim=1) / weights.sum(dim=1)
            loss = loss - torch.mean((tau / BASE_TEMPERATURE) * mean_pos * pnm)
    return loss / num_images / 2


def reference_local_propagation(
    attn_logits: torch.Tensor, code: torch.Tensor, sigma: float = 28.0
) -> torch.Tensor:
    """LHP with a dense ``(S², S²)`` neighbourhood mask, one image at a time (docs/method.md §6).

    ``attn_logits`` ``(B, H, 1+S², 1+S²)``, ``code`` ``(B, D, S, S)`` → ``(B, D, S, S)``.
    """
    b, d, s, _ = code.shape
    with torch.no_grad():
        attn = attn_logits[:, :, 1:, 1:].float().mean(dim=1)
        high = torch.quantile(attn, 0.9, dim=2, keepdim=True)
        low = torch.quantile(attn, 0.1, dim=2, keepdim=True)
        attn = torch.max(torch.min(attn, high), low)
        attn = attn.softmax(dim=-1) * sigma
        attn[attn < attn.mean(dim=2, keepdim=True)] = 0.0
        window = torch.zeros(s * s, s * s)
        for i in range(s * s):
            r, c = divmod(i, s)
            for rr in range(max(0, r - 1), min(s, r + 2)):
                for cc in range(max(0, c - 1), min(s, c + 2)):
                    window[i, rr * s + cc] = 1.0
        counts = window.sum(dim=1, keepdim=True).to(code.device)
        attn = attn * window.to(code.device)
    flat = code.reshape(b, d, s * s).permute(0, 2, 1)  # (B, S², D)
    out = []
    for i in range(b):
        out.append((attn[i] @ flat[i]) / counts)
    return torch.stack(out).permute(0, 2, 1).reshape(b, d, s, s)
