"""Random inputs of the hidden-positive loss shared by its test files (dense, sparse and fused paths)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unit(*shape: int, gen: torch.Generator) -> torch.Tensor:
    """Random unit vectors along the last dimension."""
    return F.normalize(torch.randn(*shape, generator=gen), dim=-1)


def clustered_problem(b: int, s: int, d: int, f: int, p: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random L2-normalised inputs of ``b`` images of ``s × s`` patches (``N = b·s²``), features and
    EMA codes around four shared directions so that positives exist; pools of ``p`` entries."""
    gen = torch.Generator().manual_seed(seed)
    n = b * s * s
    centres_f, centres_s = unit(4, f, gen=gen), unit(4, d, gen=gen)
    label = torch.randint(4, (n,), generator=gen)
    feats = F.normalize(centres_f[label] + 0.6 * torch.randn(n, f, generator=gen), dim=1)
    code_ema = F.normalize(centres_s[label] + 0.6 * torch.randn(n, d, generator=gen), dim=1)
    return {
        "z": unit(n, d, gen=gen),
        "z_lhp": unit(n, d, gen=gen),
        "feats": feats,
        "code_ema": code_ema,
        "pool_agnostic": unit(p, f, gen=gen),
        "pool_specific": unit(p, d, gen=gen),
    }
