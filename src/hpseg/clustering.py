"""Spherical k-means: the baseline on frozen features, k-means on the learned code (a training
diagnostic) and the optional refitted cluster probe all use this one implementation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hpseg.errors import HPSegError

__all__ = ["kmeans"]


def kmeans(x: torch.Tensor, k: int, *, iters: int = 50, seed: int = 0, cosine: bool = True) -> torch.Tensor:
    """Lloyd's k-means with k-means++ initialisation. ``(N, F) -> centroids (k, F)``.

    With ``cosine`` the rows and centroids are L2-normalised (spherical k-means), as is usual
    for ViT features.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = F.normalize(x.float(), dim=1) if cosine else x.float()
    n = x.shape[0]
    if n < k:
        raise HPSegError(f"k-means needs at least k={k} samples, got {n}: use fewer clusters or more images")
    first = int(torch.randint(n, (1,), generator=g))
    centroids = [x[first]]
    d2 = torch.full((n,), float("inf"), device=x.device)
    for _ in range(1, k):
        d2 = torch.minimum(d2, ((x - centroids[-1]) ** 2).sum(1))
        probs = (d2 / d2.sum().clamp_min(1e-12)).cpu()
        centroids.append(x[int(torch.multinomial(probs, 1, generator=g))])
    c = torch.stack(centroids)
    for _ in range(iters):
        assign = (x @ c.T).argmax(1) if cosine else torch.cdist(x, c).argmin(1)
        new = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        empty = counts.squeeze(1) == 0
        new = new / counts.clamp_min(1)
        new[empty] = c[empty]
        if cosine:
            new = F.normalize(new, dim=1)
        if torch.allclose(new, c, atol=1e-6):
            c = new
            break
        c = new
    return c
